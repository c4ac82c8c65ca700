"""``make demo``: train a small CNN on scikit-learn's digits, then look inside it.

Everything runs offline on a CPU in about a minute: the data ships with scikit-learn,
the model trains in seconds, and the outputs land in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lurker
from lurker.examples import digits_tensors, train_digits
from lurker.probe import UnitImages, probe
from lurker.probe.data import digits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print("1. training DigitsNet on scikit-learn's bundled digits")
    model, acc = train_digits(a.epochs)
    weights = out / "digits_net.pt"
    torch.save(model.state_dict(), weights)

    print("\n2. tracing one forward pass (every tensor op, not only modules)")
    x, _ = digits_tensors()
    tr = lurker.trace(model, x[:1])
    print(tr.summary())
    print(f"validation: {tr.validate()}")
    (out / "summary.txt").write_text(tr.summary() + "\n")
    tr.to_json(out / "trace.json")
    graph = tr.render(out / "graph.svg")
    collapsed = tr.render(out / "graph-depth1.svg", depth=1)

    print("\n3. probing every unit of every layer over all 1,797 digits")
    data = digits(16)
    run = probe(model, data, out=out / "run", k=9, batch_size=256, overwrite=True)
    layer = "features.8"
    print(f"what the units of {layer} (the last conv) respond to:")
    for unit in run.units(layer, order_by="max", limit=5):
        top = unit.top("max")
        classes = ", ".join(e.class_name for e in top)
        print(f"  unit {unit.index:2d}: peak {unit.max:6.2f}; top-9 images are digits {classes}")
    images = UnitImages(run, model=model, dataset=data)
    made = images.write_all(layers=[layer], kinds=("input", "grad", "crop"), progress=False)
    print(
        f"{made.total} images (each top sample once, guided gradients, receptive-field crops) "
        f"in {run.path / 'cache'}"
    )

    elapsed = time.perf_counter() - t0
    print(f"\ndone in {elapsed:.0f} s (test accuracy {acc:.1%}). Open these:")
    for p in (graph, collapsed, out / "summary.txt", out / "trace.json", run.path / "run.db"):
        print(f"  {p}")
    print(
        "The same from the command line:\n"
        f"  lurker trace lurker.examples:DigitsNet --weights {weights} -i 1,1,16,16 "
        f"--out {out / 'graph-cli.svg'}\n"
        f"  lurker probe lurker.examples:DigitsNet --weights {weights} --data digits "
        f"--image-size 16 --out {out / 'run-cli'}"
    )


if __name__ == "__main__":
    main()
