"""``make demo``: train a small CNN on scikit-learn's digits, look inside it, open the explorer.

Everything runs offline on a CPU in well under a minute: the data ships with scikit-learn,
the model trains in seconds, the outputs land in ``--out``, and the explorer serves the
probe run (with the model attached, so the live page works) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lurker
from lurker.examples import digits_tensors, train_digits
from lurker.map import make_map
from lurker.probe import UnitImages, probe
from lurker.probe.data import digits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--port", type=int, default=None, help="explorer port (default 8765, else free)"
    )
    ap.add_argument("--host", default="127.0.0.1", help="explorer address (default: this machine)")
    ap.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    ap.add_argument("--no-serve", action="store_true", help="stop after writing the outputs")
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
    # The run records how to rebuild its model and data, so `lurker serve` can attach them.
    config = {"model_spec": "lurker.examples:DigitsNet", "weights": str(weights.resolve())}
    run = probe(
        model,
        data,
        out=out / "run",
        k=9,
        batch_size=256,
        overwrite=True,
        relevance=True,  # the unit pages then show where each unit carried the decision
        embed=True,  # every digit's penultimate-layer features, for the dataset map
        meta={**config, "data": "digits"},
    )
    layer = "features.8"
    print(f"what the units of {layer} (the last conv) respond to:")
    for unit in run.units(layer, order_by="max", limit=5):
        top = unit.top("max")
        classes = ", ".join(e.class_name for e in top)
        print(f"  unit {unit.index:2d}: peak {unit.max:6.2f}; top-9 images are digits {classes}")
    print("\n4. the dataset map: every digit placed by t-SNE of its penultimate-layer features")
    run = make_map(run, method="tsne")
    m = run.map()
    wrong = int(((m.label != m.pred) & (m.pred >= 0)).sum())
    print(
        f"{len(m)} points from {m.meta['layer']} in {m.meta['seconds']:.1f} s "
        f"({m.meta['engine']}); {wrong} misclassified digits to find on the Map page"
    )
    images = UnitImages(run, model=model, dataset=data)
    made = images.write_all(progress=False)
    print(
        f"{made.total} images of every layer's units (each top sample once, guided gradients; "
        f"the explorer cuts the receptive-field crops from them) in {run.path / 'cache'}"
    )

    t1 = time.perf_counter()
    viz = lurker.featviz(model, layer, steps=128, run=run)
    viz.save(run.path)
    beat = sum(
        float(a) > run.unit(layer, u).top("mean")[0].value
        for u, a in zip(viz.units, viz.activations.reshape(len(viz.units), -1)[:, 0].tolist())
    )
    print(
        f"feature visualizations of {layer}'s {len(viz.units)} units in "
        f"{time.perf_counter() - t1:.0f} s: {beat} excite their unit more than its best digit"
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
        f"--image-size 16 --out {out / 'run-cli'} --embed\n"
        f"  lurker map {out / 'run-cli'}\n"
        f"  lurker serve {run.path}"
    )
    if a.no_serve:
        return
    from lurker.server.serve import serve_forever

    print("\n5. the explorer (graph, layers, units, samples, live) at:", flush=True)
    try:
        serve_forever(str(run.path), host=a.host, port=a.port, browser=not a.no_browser)
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    main()
