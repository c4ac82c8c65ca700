"""lurker's feature visualization against torch-lucent (0.1.8, the PyTorch port of Lucid) as
an oracle: given the same spectrum, the same image; given the same warp, the same
transformed image; on the same model and image, the same objective. Each test is skipped
where the lucent part it needs does not import (its parametrization needs torch alone,
its objectives the tiny ``decorator`` package, its transforms kornia 0.4.1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lurker
from lurker.featviz import FourierImage, Transforms


def _lucent(module: str):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():  # kornia 0.4.1 warns about torch's version
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


@pytest.mark.parametrize(
    ("h", "w", "channels"), [(16, 16, 3), (15, 21, 3), (20, 13, 3), (12, 9, 1)]
)
def test_the_fourier_image_is_lucents_given_the_same_spectrum(h, w, channels):
    """Lucent's ``param.image`` (FFT, 1/f scale capped at 1/max(h, w), magic 4, colour
    decorrelated by Lucid's matrix over its largest column norm for 3 channels, none for
    others, sigmoid) on the spectrum lurker optimizes: the same image. For an odd width
    Lucent keeps one more frequency column, which its inverse FFT drops: filled with noise
    here, it changes nothing."""
    images = _lucent("lucent.optvis.param.images")
    torch.manual_seed(0)
    params, image_f = images.image(
        w, h, batch=2, channels=None if channels == 3 else channels, decorrelate=True
    )
    (theirs,) = params
    with torch.no_grad():
        theirs.copy_(torch.randn_like(theirs))
    ours = FourierImage(theirs.detach()[:, :, :, : w // 2 + 1].clone(), h, w)
    want = image_f().detach().cpu()
    assert want.shape == (2, channels, h, w)
    got = ours().detach()
    assert torch.allclose(got, want, atol=2e-6), (got - want).abs().max()
    assert (want - 0.5).abs().max() > 0.1  # the spectrum is not so small that all is grey


def test_rotation_and_zoom_are_kornias_about_the_centre():
    """lurker's warp of ``(scale, angle)`` is Lucent's rotation (kornia's
    ``get_rotation_matrix2d`` about the centre, ``warp_affine``) by ``-angle`` with that
    zoom: lurker's positive angle turns the image clockwise on screen, kornia's
    anticlockwise; the angles are drawn from a symmetric set, so the distribution is
    Lucent's. Compared inside the frame (lurker fills the outside with the border's grey,
    Lucent with black)."""
    _lucent("lucent.optvis.transform")
    import kornia

    torch.manual_seed(0)
    x = torch.rand(2, 3, 41, 41)
    plain = Transforms(pad=0, jitter=0, jitter2=0)
    inner = (..., slice(10, 31), slice(10, 31))
    for scale, angle in ((1.0, 7.0), (1.0, -10.0), (0.9, 4.0), (1.1, 0.0), (1.06, -3.0)):
        got = plain.apply(x, [(0, 0, scale, angle, 0, 0)] * 2)
        center = torch.full((2, 2), 20.0)
        m = kornia.get_rotation_matrix2d(
            center, torch.full((2,), -angle), torch.full((2, 2), scale)
        )
        want = kornia.warp_affine(x, m, dsize=(41, 41))
        assert torch.allclose(got[inner], want[inner], atol=1e-5), (scale, angle)


def test_jitter_is_a_whole_pixel_shift():
    """lurker's jitter moves the image by whole pixels (the oracle: slicing), both ways,
    ``[-d, d]``; Lucent's moves it by ``[0, d - 1]`` only (down and right), and with kornia
    0.4.1 on torch >= 1.3 by ``d * w / (w - 1)`` pixels (its grids assume
    ``align_corners=True``): docs/featviz.md says why lurker's differs."""
    x = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    plain = Transforms(pad=0, jitter=0, jitter2=0)
    for dy, dx in ((3, 5), (-2, 4), (0, -6)):
        got = plain.apply(x, [(dy, dx, 1.0, 0.0, 0, 0)])
        want = torch.roll(x, (dy, dx), dims=(2, 3))
        ys = slice(max(dy, 0), 20 + min(dy, 0))
        xs = slice(max(dx, 0), 24 + min(dx, 0))
        assert torch.allclose(got[..., ys, xs], want[..., ys, xs], atol=1e-12)
        again = plain.apply(x, [(0, 0, 1.0, 0.0, dy, dx)])  # the second jitter alike
        assert torch.allclose(again[..., ys, xs], want[..., ys, xs], atol=1e-12)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


def _objectives_and_acts(size: tuple[int, int], **kw):  # type: ignore[no-untyped-def]
    """lucent's objectives module, and a function giving lurker's result for ``kw`` with
    the model's ``conv2`` output on its images (the oracle's input, by a forward hook)."""
    objectives = _lucent("lucent.optvis.objectives")
    torch.manual_seed(0)
    net = _Net().eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)

    def run(**more):  # type: ignore[no-untyped-def]
        fv = lurker.featviz(net, "conv2", steps=3, size=size, mean=mean, std=std, **{**kw, **more})
        got = {}
        h = net.conv2.register_forward_hook(lambda m, i, o: got.__setitem__("a", o.clone()))
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            net((fv.images - m) / s)
        h.remove()
        return fv, got["a"]

    return objectives, run


def test_channel_neuron_and_direction_objectives_are_lucents():
    """On the same model and image, lurker's value of each image is minus Lucent's loss
    (Lucent minimizes ``-objective``): ``channel`` the unit's mean over its map;
    ``neuron`` the unit at the map's centre ``(h // 2, w // 2)``, given to Lucent as
    ``x=w // 2, y=h // 2`` (Lucent's default swaps the two on a map that is not square);
    ``direction`` the dot product over channels, mean over positions, which is Lucid's
    ``direction`` and Lucent's ``channel_weight`` times the channel count (Lucent's own
    ``direction`` is the cosine similarity, which ignores the activation's size)."""
    objectives, run = _objectives_and_acts((14, 22))
    fv, act = run(units=[1, 4])
    assert act.shape[2:] == (6, 10)
    for i, u in enumerate([1, 4]):
        loss = objectives.channel("conv2", u)(lambda _, i=i: act[i : i + 1])
        assert torch.allclose(-loss, fv.activations[i].to(loss.dtype), rtol=1e-5, atol=1e-6)

    fv, act = run(units=[0, 5], objective="neuron")
    assert fv.settings["position"] == [3, 5]
    for i, u in enumerate([0, 5]):
        loss = objectives.neuron("conv2", u, x=5, y=3)(lambda _, i=i: act[i : i + 1])
        assert torch.allclose(-loss, fv.activations[i].to(loss.dtype), rtol=1e-5, atol=1e-6)
        # Lucent's default on this 6x10 map is x=6 // 2, y=10 // 2: row 5, column 3
        other = objectives.neuron("conv2", u)(lambda _, i=i: act[i : i + 1])
        assert torch.allclose(-other, act[i, u, 5, 3])

    dirs = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    fv, act = run(units=[0, 2], objective="direction", directions=dirs)
    for i, d in enumerate([0, 2]):
        weight = dirs[d].to(act.dtype)
        loss = objectives.channel_weight("conv2", weight)(lambda _, i=i: act[i : i + 1])
        assert torch.allclose(-6 * loss, fv.activations[i].to(loss.dtype), rtol=1e-5, atol=1e-6)
