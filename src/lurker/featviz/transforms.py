"""The random transforms applied at every optimization step (Lucid's standard set).

An image that excites a unit only at one exact pixel alignment is an adversarial
pattern, not a feature; asking it to survive small shifts, zooms and rotations leaves
the features that the unit responds to wherever they appear. As Lucid: pad (constant
grey), jitter, random scale, random rotation, jitter again; here the last four are one
affine warp per image (one bilinear resampling instead of four), at the image's own size
(Lucid and Lucent resize it), filling what comes in from outside with the border's grey
(Lucent: black), jittering by whole pixels either way (Lucent: down and right only);
docs/featviz.md compares them.

Each image draws its own transform from its own generator, so an image's sequence of
transforms does not depend on which other images share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Shifts", "Transforms"]


@dataclass(frozen=True)
class Transforms:
    """Lucid's ``standard_transforms`` for an image of ``size`` pixels: at 128 px, pad 12
    (grey 0.5), jitter 8, scale 0.9 to 1.1, rotate -10 to 10 degrees (0 five times as
    often as another angle), jitter 4. Pad and jitter scale with the image's size (Lucid
    chose them for 128-224 px; 12 pixels of padding would swamp a 16-pixel digit)."""

    pad: int
    jitter: int
    jitter2: int
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
    angles: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5
    #: cut the padding off again after the warp, for a model that takes one image size
    #: only (a ViT's patch grid): the borders still move in and out of view
    crop: bool = False

    @classmethod
    def standard(cls, size: int) -> Transforms:
        f = size / 128
        return cls(
            pad=max(1, round(12 * f)), jitter=max(1, round(8 * f)), jitter2=max(1, round(4 * f))
        )

    @classmethod
    def none(cls) -> Transforms:
        return cls(pad=0, jitter=0, jitter2=0, scales=(1.0,), angles=(0.0,))

    def draw(self, rng: np.random.Generator) -> tuple[float, ...]:
        """One image's transform for one step: ``(dy1, dx1, scale, angle, dy2, dx2)``."""
        j1 = rng.integers(-self.jitter, self.jitter + 1, size=2)
        s = self.scales[rng.integers(len(self.scales))]
        a = self.angles[rng.integers(len(self.angles))]
        j2 = rng.integers(-self.jitter2, self.jitter2 + 1, size=2)
        return (float(j1[0]), float(j1[1]), float(s), float(a), float(j2[0]), float(j2[1]))

    def apply(self, images: Tensor, params: Sequence[tuple[float, ...]]) -> Tensor:
        """Pad, then warp each image by its own ``params`` row (as :meth:`draw` gives)."""
        x = F.pad(images, [self.pad] * 4, value=0.5) if self.pad else images
        if self.is_identity:
            return images if self.crop else x
        h, w = x.shape[-2:]
        theta = torch.as_tensor(
            [_inverse_affine(p, h, w) for p in params], dtype=x.dtype, device=x.device
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.crop and self.pad:
            p = self.pad
            x = x[..., p : h - p, p : w - p]
        return x

    @property
    def is_identity(self) -> bool:
        return (
            self.jitter == 0 and self.jitter2 == 0 and set(self.scales) | set(self.angles) <= {0, 1}
        )


def _inverse_affine(p: tuple[float, ...], h: int, w: int) -> list[list[float]]:
    """``affine_grid``'s theta (output -> input, normalised coordinates) for: shift by
    ``(dy1, dx1)`` pixels, zoom by ``scale``, rotate by ``angle`` degrees about the centre,
    shift by ``(dy2, dx2)``. Worked in pixels, then normalised per axis, so a rotation of
    a non-square image stays a rotation."""
    dy1, dx1, s, a, dy2, dx2 = p
    c, si = math.cos(math.radians(a)), math.sin(math.radians(a))
    # input = R(-a) (out - d2) / s - d1, in pixel coordinates (x, y) about the centre
    m = [[c / s, si / s], [-si / s, c / s]]
    tx = -(m[0][0] * dx2 + m[0][1] * dy2) - dx1
    ty = -(m[1][0] * dx2 + m[1][1] * dy2) - dy1
    # to normalised coordinates: u = 2 x / w, v = 2 y / h
    return [
        [m[0][0], m[0][1] * h / w, 2 * tx / w],
        [m[1][0] * w / h, m[1][1], 2 * ty / h],
    ]


@dataclass(frozen=True)
class Shifts:
    """The transforms of a signal ``(N, C, 1, T)`` (a :class:`Transforms` of height 1):
    two whole-sample shifts along time, of ``-jitter`` to ``jitter`` and ``-jitter2`` to
    ``jitter2`` samples, what comes in from outside being ``fill`` (the model's 0), cut back to
    ``T`` samples. The signal must excite its unit wherever the pattern lands in time, as
    an image must wherever its feature lands; the model sees the length it was probed at
    (a model that flattens time into a ``Linear`` takes that one only). No zoom or
    rotation: they have no meaning along time."""

    jitter: int
    jitter2: int
    #: the same interface as :class:`Transforms`: nothing padded, always cut back
    pad: int = 0
    crop: bool = True
    #: per channel, the value (in [0, 1]) that comes in from outside: the one that feeds
    #: the model its 0 (a signal bounded to its dataset's range); None: 0.5 (±amplitude's 0)
    fill: Tensor | None = None

    @classmethod
    def standard(cls, length: int) -> Shifts:
        """Lucid's jitters (8 and 4 at 128 px) scaled to the signal's length."""
        f = length / 128
        return cls(jitter=max(1, round(8 * f)), jitter2=max(1, round(4 * f)))

    @classmethod
    def none(cls) -> Shifts:
        return cls(jitter=0, jitter2=0)

    def draw(self, rng: np.random.Generator) -> tuple[float, ...]:
        """One signal's shift for one step: the two shifts' sum, in samples."""
        a = rng.integers(-self.jitter, self.jitter + 1)
        b = rng.integers(-self.jitter2, self.jitter2 + 1)
        return (float(a + b),)

    def apply(self, images: Tensor, params: Sequence[tuple[float, ...]]) -> Tensor:
        """Each signal shifted by its own ``params`` row (as :meth:`draw` gives)."""
        if self.is_identity:
            return images
        t = images.shape[-1]
        m = self.jitter + self.jitter2
        if self.fill is None:
            x = F.pad(images, [m, m], value=0.5)
        else:
            fill = self.fill.to(images)[:, None, None]
            x = F.pad(images - fill, [m, m]) + fill
        # shifted right by d: sample i of the result is sample i - d of the signal
        return torch.stack(
            [x[i, ..., m - int(p[0]) : m - int(p[0]) + t] for i, p in enumerate(params)]
        )

    @property
    def is_identity(self) -> bool:
        return self.jitter == 0 and self.jitter2 == 0
