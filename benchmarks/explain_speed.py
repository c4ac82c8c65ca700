"""Time per attribution of each ``lurker.explain`` method, as a ratio to one forward +
backward of the same batch, side by side with Captum doing the same math in the same
loop (interleaved, so both see the same machine state); LRP beside Zennit (the same
composite, epsilon-plus-flat, with Zennit's VGG or ResNet canonizer).

Models: torchvision vgg11 and resnet50, random init (the cost does not depend on the
weights), batch 1 and 8. Captum is given its batched options where it has them
(``internal_batch_size`` None for integrated gradients: all steps at once, as lurker;
``perturbations_per_eval`` for occlusion matched to lurker's rows per forward), so the
comparison is of equal work. Grad-CAM++ has no Captum counterpart. The ``library``
column is Captum's time, Zennit's for ``lrp``.

    python benchmarks/explain_speed.py                       # 224 px, the issue's setting
    python benchmarks/explain_speed.py --small               # CPU: 64 px, fewer steps/repeats
    python benchmarks/explain_speed.py --size 128 --repeats 3 --device cuda
    python benchmarks/explain_speed.py --batches 8 --steps 8 --samples 8   # a small machine
    python benchmarks/explain_speed.py --models resnet18 --batches 1 --methods occlusion \
        --size 64 --window 8 --stride 4 --threads 1 --repeats 9   # occlusion's defaults

Occlusion's maps are checked equal to Captum's (``torch.testing.assert_close``) before
they are timed: a faster map that differs is no comparison.

Integrated gradients runs its steps as one batch in both libraries: batch 8 with 50 steps
holds 400 images' activations at once (vgg11 at 224 px: about 18 GB on the CPU), so on a
small machine lower ``--steps`` and ``--samples`` (the same for both libraries).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from captum import attr as ca
from torch import nn

import lurker


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _no_inplace(model: nn.Module) -> nn.Module:
    """Captum's ReLU backward hooks refuse in-place ReLUs; both libraries get this copy."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


def fwd_bwd(model: nn.Module, x: torch.Tensor, t: list[int]) -> None:
    """The unit of cost: one forward and the backward to the input only (what a gradient
    attribution needs at least; no weight gradients, as neither library computes them)."""
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    torch.autograd.grad(out[torch.arange(len(t)), t].sum(), xi)


def zennit_lrp(model: nn.Module, name: str) -> Callable[[torch.Tensor, list[int]], object]:
    """Zennit's epsilon-plus-flat LRP with the canonizer for the architecture."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    def run(x: torch.Tensor, t: list[int]) -> object:
        can = ResNetCanonizer() if name.startswith("resnet") else VGGCanonizer()
        idx = torch.tensor(t, device=x.device)[:, None]
        with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[can])) as attr:
            # the relevance starts at the target's logit, as lurker's
            return attr(x, lambda o: torch.zeros_like(o).scatter(1, idx, 1.0) * o)

    return run


def cases(model: nn.Module, layer: str, a: argparse.Namespace, batch: int, name: str) -> dict:
    """method -> (lurker call, Captum's (Zennit's for LRP) call or None)."""
    steps, samples, win, stride = a.steps, a.samples, a.window, a.stride
    windows_per_eval = max(1, a.occlusion_rows // batch)
    occ_rows = windows_per_eval * batch
    mod = model.get_submodule(layer)

    def lk(method: str, **o: object) -> Callable[[object, object], object]:
        return lambda x, t: lurker.explain(model, x, target=t, method=method, **o)

    def noise_tunnel(x: torch.Tensor, t: list[int]) -> object:
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=0.15, target=t, abs=False
        )

    return {
        "saliency": (lk("saliency"), lambda x, t: ca.Saliency(model).attribute(x, target=t)),
        "input_x_gradient": (
            lk("input_x_gradient"),
            lambda x, t: ca.InputXGradient(model).attribute(x, target=t),
        ),
        "guided_backprop": (
            lk("guided_backprop"),
            lambda x, t: ca.GuidedBackprop(model).attribute(x, target=t),
        ),
        "deconvnet": (
            lk("deconvnet"),
            lambda x, t: ca.Deconvolution(model).attribute(x, target=t),
        ),
        "integrated_gradients": (
            lk("integrated_gradients", n_steps=steps),
            lambda x, t: ca.IntegratedGradients(model).attribute(
                x, target=t, n_steps=steps, return_convergence_delta=True
            ),
        ),
        "smoothgrad": (lk("smoothgrad", n_samples=samples, stdev=0.15), noise_tunnel),
        "gradcam": (
            lk("gradcam", layer=layer),
            lambda x, t: ca.LayerGradCam(model, mod).attribute(x, target=t, relu_attributions=True),
        ),
        "gradcam_plus_plus": (lk("gradcam_plus_plus", layer=layer), None),
        "occlusion": (
            lk("occlusion", window=win, strides=stride, internal_batch_size=occ_rows),
            lambda x, t: ca.Occlusion(model).attribute(
                x,
                sliding_window_shapes=(3, win, win),
                strides=(3, stride, stride),
                target=t,
                perturbations_per_eval=windows_per_eval,
            ),
        ),
        "lrp": (lk("lrp", composite="epsilon_plus_flat"), zennit_lrp(model, name)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64 px, 8 steps/samples, 2 repeats")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--models", default="vgg11,resnet50")
    p.add_argument("--methods", default=None, help="comma-separated; default all")
    p.add_argument("--steps", type=int, default=None, help="integrated gradients steps")
    p.add_argument("--samples", type=int, default=None, help="smoothgrad samples")
    p.add_argument("--window", type=int, default=None, help="occlusion window (px)")
    p.add_argument("--stride", type=int, default=None, help="occlusion stride (px)")
    p.add_argument("--occlusion-rows", type=int, default=64, help="occluded copies per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared box: 1)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    size = a.size or (64 if a.small else 224)
    a.repeats = a.repeats or (2 if a.small else 5)
    a.steps = a.steps or (8 if a.small else 50)
    a.samples = a.samples or (8 if a.small else 25)
    a.window = a.window or max(1, size // 8)
    a.stride = a.stride or a.window
    # Grad-CAM's layer: the last block of a ResNet (any depth), vgg11's last ReLU
    layers = {"vgg11": "features.19"}
    names = a.models.split(",")
    unknown = [n for n in names if n not in layers and not n.startswith("resnet")]
    if unknown:
        p.error(f"--models: no Grad-CAM layer known for {unknown}; use resnet18/34/50/... or vgg11")
    print(
        f"{size} px, {a.device}, median of {a.repeats}; IG {a.steps} steps, SmoothGrad "
        f"{a.samples} samples, occlusion {a.window} px window / {a.stride} stride"
    )
    print("times as multiples of one forward + backward to the input, same batch")
    print(f"{'model':9} {'B':>2} {'method':21} {'lurker':>8} {'library':>8}  lurker/library")
    for name in names:
        torch.manual_seed(0)
        model = _no_inplace(getattr(torchvision.models, name)(num_classes=1000).eval()).to(a.device)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, 3, size, size, device=a.device)
            t = [int(i) for i in torch.randint(0, 1000, (b,))]

            unit = functools.partial(fwd_bwd, model, x, t)
            unit()  # warm-up
            table = cases(model, layers.get(name, "layer4"), a, b, name)
            for method in a.methods.split(",") if a.methods else table:
                ours, theirs = table[method]
                mine = ours(x, t)  # warm-up (and the trace of a layer tap, made once per call)
                if theirs is not None:
                    other = theirs(x, t)
                    if method == "occlusion":  # the same maps, or the times compare nothing
                        torch.testing.assert_close(mine.attribution, other)
                lt, ct, bt = [], [], []
                for _ in range(a.repeats):  # interleaved: the unit of cost measured alongside
                    bt.append(_time(unit, a.device))
                    lt.append(_time(functools.partial(ours, x, t), a.device))
                    if theirs is not None:
                        ct.append(_time(functools.partial(theirs, x, t), a.device))
                base = statistics.median(bt)
                lr = statistics.median(lt) / base
                cr = statistics.median(ct) / base if ct else float("nan")
                vs = f"{lr / cr:.2f}" if ct else "-"
                print(f"{name:9} {b:>2} {method:21} {lr:8.2f} {cr:8.2f}  {vs:>13}", flush=True)
            model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    main()
