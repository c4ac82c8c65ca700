"""Feature visualization speed and quality.

1. Images per second for one full layer of vgg11 (random init: the speed does not depend
   on the weights), all units optimized in one batch per step vs one unit at a time (the
   per-unit rate is measured on the first ``--alone`` units), and vs torch-lucent's
   ``render_vis`` for the same layer, units, steps and size (all units as one batch), when
   ``import lucent`` succeeds (else the reason is printed). Beside each rate, the median
   activation the images reached, measured alike for both (the unit's channel mean on the
   final image, ImageNet-normalised, no transforms).
2. The fraction of units of the trained digits model whose optimized image excites the
   unit more than the unit's best dataset image (its best of all 1,797 digits), and how far
   above random images the optimized ones are.

    PYTHONPATH=src python benchmarks/featviz_speed.py [--device cuda] [--size 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import torch

import lurker


def vgg_rates(args: argparse.Namespace) -> None:
    from torchvision.models import vgg11

    torch.manual_seed(0)
    model = vgg11().eval().to(args.device)
    layer = args.layer
    units = dict(model.named_modules())[layer].out_channels
    kw = dict(steps=args.steps, size=args.size, device=args.device)
    lurker.featviz(model, layer, units=[0], steps=1, size=args.size, device=args.device)  # warm
    _sync(args.device)
    t = time.perf_counter()
    fv = lurker.featviz(model, layer, **kw)
    _sync(args.device)
    batched = time.perf_counter() - t
    n_alone = min(args.alone, units)
    t = time.perf_counter()
    for u in range(n_alone):
        lurker.featviz(model, layer, units=[u], **kw)
    _sync(args.device)
    alone = time.perf_counter() - t
    rate_b, rate_a = units / batched, n_alone / alone
    print(
        f"vgg11 {layer} ({units} units), {args.size} px, {args.steps} steps on {args.device}: "
        f"batched {rate_b:.2f} images/s ({batched:.1f} s for the layer); one unit at a time "
        f"{rate_a:.2f} images/s (over {n_alone} units); batched / alone = {rate_b / rate_a:.1f}x"
    )
    per_step = batched / args.steps
    print(f"  a full layer at 256 steps would take about {per_step * 256:.0f} s batched")
    assert fv.images.shape[0] == units
    ours = _reached(model, layer, fv.images.to(args.device)).median().item()
    print(f"  lurker: {rate_b:.2f} images/s, median activation reached {ours:.3f}")
    lucent_rate(args, model, layer, units)


def lucent_rate(args: argparse.Namespace, model: torch.nn.Module, layer: str, units: int) -> None:
    """torch-lucent's render_vis on the same layer, units, steps and size: its defaults
    otherwise (Fourier image, decorrelated colour, its standard transforms, Adam 0.05), at
    the image size itself (``fixed_image_size``: it would upsample to 224 px otherwise)."""
    try:
        from lucent.optvis import objectives, param, render
    except Exception as e:  # any import failure: print it
        print(f"  torch-lucent: skipped, `import lucent` failed: {type(e).__name__}: {e}")
        return
    name = layer.replace(".", "_")  # lucent names modules by their path with underscores
    objective = sum(objectives.channel(name, u, batch=u) for u in range(units))
    kw = dict(thresholds=(args.steps,), show_image=False, progress=False)
    try:
        torch.manual_seed(0)
        render.render_vis(  # warm-up, as for lurker
            model, objectives.channel(name, 0), param_f=lambda: param.image(args.size),
            fixed_image_size=args.size, **{**kw, "thresholds": (1,)},
        )  # fmt: skip
        _sync(args.device)
        t = time.perf_counter()
        images = render.render_vis(
            model, objective, param_f=lambda: param.image(args.size, batch=units),
            fixed_image_size=args.size, **kw,
        )[-1]  # fmt: skip
        _sync(args.device)
        took = time.perf_counter() - t
    except Exception as e:  # an old lucent on a new torch: print why
        print(f"  torch-lucent: render_vis failed on torch {torch.__version__}: "
              f"{type(e).__name__}: {e}")  # fmt: skip
        return
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(args.device)
    reached = _reached(model, layer, x).median().item()
    print(
        f"  torch-lucent {_version('torch-lucent')} (kornia {_version('kornia')}): "
        f"{units / took:.2f} images/s ({took:.1f} s for the layer), median activation reached "
        f"{reached:.3f}"
    )


def _reached(model: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Row i's channel-i mean at ``layer`` for images in [0, 1], ImageNet-normalised."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device)[:, None, None]
    means = _means(model, layer, (images - mean) / std)
    return means[torch.arange(len(means)), torch.arange(len(means))].cpu()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def digits_quality(args: argparse.Namespace) -> None:
    from lurker.examples import digits_tensors, train_digits

    torch.manual_seed(0)
    model, acc = train_digits(3, log=lambda *_: None)
    x, _ = digits_tensors(16, "all")
    for layer in ("features.4", "features.8"):
        t = time.perf_counter()
        fv = lurker.featviz(model, layer, steps=args.digit_steps, size=16)
        took = time.perf_counter() - t
        best = _means(model, layer, x).max(0).values
        noise = _means(model, layer, torch.rand(512, 1, 16, 16))
        beats = (fv.activations > best).float().mean().item()
        ratio = (fv.activations / best).median().item()
        z = ((fv.activations - noise.mean(0)) / noise.std(0)).median().item()
        print(
            f"digits {layer} ({len(fv.units)} units, test accuracy {acc:.1%}, "
            f"{args.digit_steps} steps, {took:.1f} s): {beats:.0%} of units beat their best "
            f"dataset image; median reached / best digit = {ratio:.2f}x; median "
            f"{z:.1f} deviations above random images"
        )


def _means(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    got = {}
    # a clone: an in-place ReLU after the layer (vgg's, the digits model's features.8)
    # would overwrite the output the hook holds, and the means be the ReLU's
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: got.__setitem__("a", o.detach().clone())
    )
    with torch.no_grad():
        model(x)
    h.remove()
    a = got["a"]
    return a.reshape(a.shape[0], a.shape[1], -1).mean(2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layer", default="features.3", help="a conv of vgg11 (features.3: 128)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--alone", type=int, default=8, help="units timed one at a time")
    p.add_argument("--digit-steps", type=int, default=128)
    p.add_argument("--skip-vgg", action="store_true")
    args = p.parse_args()
    if not args.skip_vgg:
        vgg_rates(args)
    digits_quality(args)


if __name__ == "__main__":
    main()
