"""Image parametrizations: what the optimizer changes, and how it becomes an image.

Optimizing pixels directly lets the high frequencies win (the gradient of a deep unit is
mostly noise), and the result is an adversarial pattern. Lucid's answer (Olah et al.,
2017, distill.pub/2017/feature-visualization) is to optimize in a decorrelated space: the
image's 2-D Fourier spectrum, scaled by ``1/f`` so that every frequency starts with the
energy natural images have there, and a colour basis in which ImageNet's channels are
uncorrelated; a sigmoid maps the result into [0, 1]. MACO (Fel et al., 2023,
arXiv:2306.06805) goes further and optimizes only the spectrum's phase, its magnitude held
at a natural-image profile, which keeps images natural in deeper networks.

Each image of a batch is its own parameter slice: nothing here mixes images, so an image
optimized within a batch is the one optimized alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "COLOR_CORRELATION",
    "FourierImage",
    "MacoImage",
    "color_matrix",
    "spectrum_scale",
]

#: Square root of ImageNet's colour covariance (Lucid's ``color_correlation_svd_sqrt``):
#: maps decorrelated colour to RGB.
COLOR_CORRELATION = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64
)
#: The Fourier-space image is divided by this (Lucid's "magic" constant), so that the
#: initial image's sigmoid stays near 0.5 and its gradients are of a useful size.
SPECTRUM_MAGIC = 4.0


def color_matrix(channels: int) -> np.ndarray:
    """Decorrelated colour -> model channels: Lucid's matrix, scaled so that its largest
    column has norm 1, for 3 channels; the identity for any other number."""
    if channels != 3:
        return np.eye(channels)
    return COLOR_CORRELATION / np.linalg.norm(COLOR_CORRELATION, axis=0).max()


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> np.ndarray:
    """Per-frequency amplitude of the ``rfft2`` grid ``(height, width // 2 + 1)``: ``1/f``
    (``f`` in cycles per pixel), capped at the lowest nonzero frequency so that the DC
    term is finite."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freqs = np.sqrt(fy * fy + fx * fx)
    return 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power


class _Param(nn.Module):
    """A batch of images kept as parameters; ``forward()`` gives them ``(N, C, H, W)`` in [0, 1]."""

    #: the name of the optimized tensor ``init`` starts, and its shape past ``(N, C)``
    _holds = ""

    def _shape(self, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def __init__(
        self,
        init: Tensor,
        height: int,
        width: int,
        decorrelate: bool = True,
        offset: Tensor | None = None,
    ) -> None:
        super().__init__()
        channels, dtype = init.shape[1], init.dtype
        if init.shape[2:] != self._shape(height, width):
            raise ValueError(
                f"{self._holds} shape {tuple(init.shape)} does not fit {height}x{width}"
            )
        setattr(self, self._holds, nn.Parameter(init.clone()))
        # per channel, added before the sigmoid: where a channel starts (a signal bounded
        # to its dataset's range starts at the model's 0 there, not at the range's middle)
        self.register_buffer(
            "offset",
            torch.zeros(channels, dtype=dtype) if offset is None else offset.to(dtype),
            persistent=False,
        )
        self.channels, self.height, self.width = channels, height, width
        scale = spectrum_scale(height, width)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=dtype), persistent=False)
        # a signal's channels (electrodes) have no colour covariance: the identity
        color = color_matrix(channels) if decorrelate else np.eye(channels)
        self.register_buffer("color", torch.as_tensor(color, dtype=dtype), persistent=False)

    def _to_image(self, spatial: Tensor) -> Tensor:
        """Decorrelated, unbounded ``(N, C, H, W)`` -> model channels in [0, 1]."""
        rgb = torch.einsum("nchw,dc->ndhw", spatial, self.color)
        return torch.sigmoid(rgb + self.offset[:, None, None])


class FourierImage(_Param):
    """Lucid's parametrization: each image is a complex ``rfft2`` spectrum per channel,
    multiplied by :func:`spectrum_scale`, transformed back (orthonormal inverse FFT),
    divided by :data:`SPECTRUM_MAGIC`, mapped through :func:`color_matrix` and a sigmoid.

    ``init`` holds the starting spectra, ``(N, C, H, W // 2 + 1, 2)`` (real, imaginary);
    Lucid starts from normal noise of standard deviation 0.01. A signal ``(C, T)`` is the
    image of height 1 (``spectrum_scale(1, T)`` is ``1/f`` along time), with
    ``decorrelate=False``: its channels are not colours.
    """

    _holds = "spectrum"
    spectrum: nn.Parameter

    def _shape(self, height: int, width: int) -> tuple[int, ...]:
        return (height, width // 2 + 1, 2)

    def forward(self) -> Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        spatial = torch.fft.irfft2(spec, s=(self.height, self.width), norm="ortho")
        return self._to_image(spatial / SPECTRUM_MAGIC)


class MacoImage(_Param):
    """MACO's parametrization (Fel et al., 2023): only the spectrum's phase is optimized;
    its magnitude is fixed to the ``1/f`` profile of natural images (the paper uses
    ImageNet's mean magnitude spectrum, which lurker does not ship; ``1/f`` is its power
    law). The image is standardized (zero mean, unit deviation per image), then mapped
    through the colour matrix and a sigmoid, so its contrast cannot grow without bound:
    only where the energy sits (the phase) can change.

    ``init`` holds the starting phases, ``(N, C, H, W // 2 + 1)``.
    """

    _holds = "phase"
    phase: nn.Parameter

    def _shape(self, height: int, width: int) -> tuple[int, ...]:
        return (height, width // 2 + 1)

    def forward(self) -> Tensor:
        spec = torch.polar(self.scale.expand_as(self.phase), self.phase)
        spatial = torch.fft.irfft2(spec, s=(self.height, self.width), norm="ortho")
        flat = spatial.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1)
        return self._to_image((spatial - mean) / (std + 1e-4))
