"""``make demo``: train a small CNN on scikit-learn's digits, then look inside it.

Everything runs offline on a CPU in well under a minute: the data ships with
scikit-learn, the model trains in seconds, and the outputs land in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lurker
from lurker.examples import digits_tensors, train_digits


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
    report = tr.validate()
    print(f"validation: {report}")
    (out / "summary.txt").write_text(tr.summary() + "\n")
    tr.to_json(out / "trace.json")
    graph = tr.render(out / "graph.svg")
    collapsed = tr.render(out / "graph-depth1.svg", depth=1)

    elapsed = time.perf_counter() - t0
    print(f"\ndone in {elapsed:.0f} s (test accuracy {acc:.1%}). Open these:")
    for p in (graph, collapsed, out / "summary.txt", out / "trace.json", weights):
        print(f"  {p}")
    print(
        "Same from the command line:\n"
        f"  lurker trace lurker.examples:DigitsNet --weights {weights} -i 1,1,16,16 "
        f"--out {out / 'graph-cli.svg'}"
    )


if __name__ == "__main__":
    main()
