"""``lurker.featviz``: images optimized to excite units, Lucid / Microscope style.

Every image of a layer is optimized in one batch: one forward and one backward per step
for the whole layer (chunked to a memory budget), each unit's images scored by their own
unit. Nothing couples two units' images: the loss is a sum of per-image terms (plus a
diversity term within a unit's own images), Adam is elementwise, the model runs in eval
mode, and each image draws its start and its transforms from its own generator, seeded
by ``(seed, unit, copy)``. So a unit's image is the same whether it was optimized alone
or with its layer (to float rounding), and batching is purely a speed-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LurkerError, OpKeyError, close_names
from ..store.featviz import preview_grid_png
from .param import FourierImage, MacoImage
from .transforms import Shifts, Transforms

if TYPE_CHECKING:
    from PIL import Image

    from ..store import Run

__all__ = ["OBJECTIVES", "PARAMS", "FeatViz", "featviz"]

OBJECTIVES = ("channel", "neuron", "direction")
PARAMS = ("fourier", "maco")

#: Defaults: Lucid's (Adam at 0.05 on the Fourier parametrization, 512 steps in its
#: notebooks; 256 already give recognisable images of torchvision models at 128 px).
DEFAULT_STEPS = 256
DEFAULT_SIZE = 128
DEFAULT_LR = 0.05
#: Weight of the diversity term when a unit gets several images (Lucid's notebooks use
#: 1e2 to 1e3 against activations of order 10; lurker's term is per image, see
#: :func:`_diversity`).
DEFAULT_DIVERSITY = 1e2


@dataclass
class FeatViz:
    """Feature visualizations of units of one layer.

    ``images``: ``(units, C, H, W)`` in [0, 1] (``(units, n, C, H, W)`` with
    ``images_per_unit=n > 1``), in the model's input channels before its normalisation
    (what a person looks at). ``activations``: the objective each image reached,
    evaluated on the image itself without transforms, ``(units,)`` or ``(units, n)``.
    ``units``: the unit index of each row (the direction's index for ``"direction"``).
    ``start``: the objective of each image before the first step (its random start).
    """

    images: Tensor
    activations: Tensor
    layer: str
    units: list[int]
    objective: str
    start: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    #: with ``resume=True``: the units left out because the run already holds them, made
    #: with these settings (their images are in the run, not here)
    skipped: list[int] = field(default_factory=list)
    #: on a model of signals: where along the unit's map (time) each signal excites it
    #: most, shaped as ``activations``; None for images or a unit with no positions
    peaks: Tensor | None = None

    @property
    def signals(self) -> Tensor | None:
        """On a model of signals, ``(units, C, T)`` (``(units, n, C, T)``): the signals as
        the model takes them, each channel's [0, 1] mapped onto its bounds (the run's
        dataset range for it, or ``±amplitude``; as the store decodes them,
        :func:`lurker.store.featviz.signal_values`); None for images."""
        from ..store.featviz import signal_values

        values = signal_values(self.images.detach().cpu().numpy(), self.settings)
        return None if values is None else torch.from_numpy(values)

    def image(self, index: int, copy: int = 0) -> Image.Image:
        """Row ``index`` (and copy ``copy``) as a PIL image (grey for 1 channel, RGB for 3)."""
        from PIL import Image

        img = self.images[index]
        if img.dim() == 4:
            img = img[copy]
        arr = _to_uint8(img)
        if arr.shape[0] == 1:
            return Image.fromarray(arr[0], "L")
        if arr.shape[0] == 3:
            return Image.fromarray(arr.transpose(1, 2, 0), "RGB")
        return Image.fromarray(arr.reshape(-1, arr.shape[-1]), "L")  # channels stacked

    def save(self, run: str | os.PathLike[str] | Run) -> Path:
        """Store the images and activations in ``run`` (see ``Run.featviz``); returns the run's
        path. The layer must be one of the run's layers."""
        from ..store.featviz import write_featviz

        path = Path(run.path if hasattr(run, "path") else run)  # type: ignore[union-attr]
        images = self.images if self.images.dim() == 5 else self.images[:, None]
        acts = self.activations if self.activations.dim() == 2 else self.activations[:, None]
        rows = [
            (unit, c, float(acts[i, c]), _to_uint8(images[i, c]))
            for i, unit in enumerate(self.units)
            for c in range(images.shape[1])
        ]
        extra = None
        if self.peaks is not None:  # each unit's own: where its signals peak
            peaks = self.peaks if self.peaks.dim() == 2 else self.peaks[:, None]
            extra = {u: {"peaks": peaks[i].tolist()} for i, u in enumerate(self.units)}
        write_featviz(path, self.layer, self.objective, rows, self.settings, extra)
        return path

    def _repr_png_(self) -> bytes | None:
        """What a notebook shows for ``fv`` at the end of a cell: the images as a grid
        (:func:`lurker.store.featviz.preview_grid_png`: a row per unit with
        ``images_per_unit > 1``, else 8 units a row, the first 128, scaled up
        to at least 64 px). None for signals: the notebook shows the repr, which gives
        their shape."""
        if self.signals is not None:
            return None
        copies = self.images.shape[1] if self.images.dim() == 5 else 1
        tiles = [self.image(i, c) for i in range(len(self.units)) for c in range(copies)]
        return preview_grid_png(tiles, copies)

    def __repr__(self) -> str:
        return f"FeatViz({self.layer!r}, {self.objective}, {len(self.units)} units, " + (
            f"signals {tuple(sig.shape)})"
            if (sig := self.signals) is not None
            else f"images {tuple(self.images.shape)})"
        )


def featviz(
    model: nn.Module,
    layer: str,
    units: Sequence[int] | int | None = None,
    *,
    objective: str = "channel",
    steps: int = DEFAULT_STEPS,
    size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    lr: float = DEFAULT_LR,
    param: str = "fourier",
    transforms: bool = True,
    images_per_unit: int = 1,
    diversity: float | None = None,
    position: tuple[int, int] | None = None,
    directions: Tensor | np.ndarray | Sequence[Sequence[float]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    amplitude: float | None = None,
    run: str | os.PathLike[str] | Run | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    max_memory: float | str | None = "auto",
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    unit_dim: int | None = None,
    on_chunk: Callable[[FeatViz], None] | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> FeatViz:
    """Optimize images that excite ``units`` of ``layer``; see docs/featviz.md.

    Args:
        layer: a module path (``"features.8"``) or a trace label (``"relu_4"``,
            ``"add_2"``: functional ops too); with ``run``, any name the run knows.
        units: unit indices (channels of the layer's output); None: every unit.
        objective: ``"channel"`` (the unit's mean over positions, the value the probe ranks
            by), ``"neuron"`` (the unit at one ``position`` (y, x) of the map, default its
            centre; on tokens of image patches, a ViT's, the patch token at that place of
            the patch grid, default its centre) or ``"direction"`` (the dot product of the channel vector with each row
            of ``directions``, mean over positions; ``units`` then index those rows).
        steps, lr: Adam steps and learning rate.
        size: image side (or ``(H, W)``); default the run's image size, else 128.
        channels: the model's input channels; default the run's, else the first conv's.
        param: ``"fourier"`` (Lucid: 1/f-scaled spectrum, decorrelated colour, sigmoid) or
            ``"maco"`` (phase only, fixed 1/f magnitude: Fel et al., 2023).
        transforms: pad, jitter, scale and rotate at every step (Lucid's standard set).
        images_per_unit, diversity: several images per unit, pushed apart by a diversity
            term of this weight (default 100 when there are several).
        mean, std: the normalisation the model expects; default the run's, else
            :func:`lurker.probe.data.default_normalize`'s (ImageNet's for 3 channels, none
            for others), as the probe and ``lurker explain`` feed an image.
        amplitude: on a model of signals ``(C, T)`` (a Conv1d stack, a signal run), the
            most a signal's value may reach either way on every channel, in the model's
            input units. Default: on a run that recorded its channels' ranges, each
            channel within the dataset's own ``[min, max]`` for it; else 3 (a
            standardized signal's three deviations). Signals only.
        run: a probe run (directory or :class:`~lurker.store.Run`) supplying layer names,
            input size, channels and normalisation.
        seed: images are seeded per ``(seed, unit, copy)``: the same for a unit alone or
            in a batch.
        batch_size: images per forward; None: as many as fit ``max_memory``.
        max_memory: bytes for one chunk's activations: ``"auto"`` (half the free GPU memory,
            or a quarter of the free RAM, at most 4 GiB), a number of bytes, a fraction of
            the free memory, or None (the whole layer at once).
        device: where to optimize (default: where the model is).
        progress: called as ``progress(images_done, images_total)`` after each chunk.
        unit_dim: without ``run``, the layer's units are on the axis lurker finds for it
            (as the probe does: the channels of a convolution, the last axis of tokens or
            channels-last maps); for a layer it cannot read, name the axis here (counting
            the batch axis).
        on_chunk: called with each chunk's result (a :class:`FeatViz` of its units) as soon
            as it is done, e.g. ``lambda part: part.save(run)``: an interrupted run keeps
            the chunks it finished (``lurker featviz`` does this).
        resume: with ``run``, leave out the units the run already holds for this objective,
            made with these very settings (and this model): a rerun of an interrupted
            ``on_chunk=lambda part: part.save(run)`` makes only the rest. The result holds
            the units made; ``skipped`` lists the others. A unit stored with other settings
            is made again (and its save replaces it whole).
        log: called with a line saying which units ``resume`` left out.
    """
    if run is not None:  # a channels-last model is fed as its probe fed it
        from ..models import channels_first_view
        from ..store import Run

        held = run if isinstance(run, Run) else Run.open(run)
        model = channels_first_view(model, (held.meta.get("config") or {}).get("channel_dim"))
        # another model's images would be stored (or shown) as the run's units': refused
        # before any step, as `lurker featviz RUN` refuses it (a run that records no
        # fingerprint is not checked)
        from ..probe.identity import model_mismatch

        why = model_mismatch(model, held.meta, held.path)
        if why is not None:
            raise LurkerError(why[0].upper() + why[1:])
    rate = held.sample_rate if run is not None else None
    cfg = _Config.make(
        model, layer, units, objective, steps, size, channels, lr, param, images_per_unit,
        diversity, position, directions, mean, std, run, batch_size, max_memory, device,
        amplitude,
    )  # fmt: skip
    if cfg.layout is not None and unit_dim is not None:
        raise LurkerError(
            "unit_dim= is for a layer without a run: with run=, the run's layout of the "
            "layer says where its units are"
        )
    from ..probe.sweep import fingerprint  # the probe's: a run records its model's

    tf: Any
    offset = _start_offset(cfg)  # where a bounded signal's channels start (else None)
    if cfg.signal:
        tf = Shifts.standard(cfg.width) if transforms else Shifts.none()
        if offset is not None:  # what comes in from outside feeds the model its 0 too
            tf = replace(tf, fill=torch.sigmoid(offset))
    else:
        tf = Transforms.standard(max(cfg.height, cfg.width)) if transforms else Transforms.none()
    with _evaluating(model) as dev:
        dev = torch.device(device) if device is not None else dev
        if device is not None:
            model.to(dev)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        x0 = torch.full((1, cfg.channels, cfg.height, cfg.width), 0.5, dtype=dtype, device=dev)
        tap = _Tap(model, cfg.target, x0, cfg.layout, cfg.layer, unit_dim, _feed(cfg))
        refused = (
            _refuses(tap, tf.apply(x0, [tf.draw(np.random.default_rng(0))])) if tf.pad else None
        )
        if refused is not None:
            # it takes the image's own size only (a ViT): the padding is cut off again
            tf = replace(tf, crop=True)
        scorer = _Scorer.make(cfg, tap, x0, tf)
        count = len(scorer.rows)
        n = cfg.images_per_unit
        per_chunk = _chunk_units(cfg, tap, tf, x0, n, count)
        norm = _normaliser(cfg, dtype, dev)
        settings = {
            "steps": steps,
            "size": [cfg.height, cfg.width],
            "channels": cfg.channels,
            "lr": lr,
            "param": param,
            # "cropped" only where the model refused the padded size (a signal's shifts
            # always crop back to T: that is no refusal, and on/off must stay told apart)
            "transforms": "cropped" if refused is not None else transforms,
            **({"cropped_because": refused} if refused is not None else {}),
            "images_per_unit": n,
            "diversity": cfg.diversity,
            "seed": seed,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "target": cfg.target,
            **(_signal_settings(cfg) if cfg.signal else {}),
            **({"channels_last": True} if cfg.channels_last else {}),
            **({"waveform": True} if cfg.waveform else {}),
            # the model's identity: a unit resumes only onto images of this very model
            "model": fingerprint(model),
        }
        if objective == "neuron":
            settings["position"] = list(scorer.position) if scorer.position else None
            if cfg.signal and scorer.position:  # the input samples that position sees
                settings.update(_neuron_span(tap, cfg, x0, scorer.position[0], rate))
            if scorer.token is not None:  # the token index in the layer's output
                settings["token"] = scorer.token
        if objective == "direction":
            settings["directions"] = scorer.directions.cpu().tolist()
        skipped: list[int] = []
        if resume:
            if run is None:
                raise LurkerError(
                    "resume=True leaves out the units a run already holds: pass run= (the "
                    "run the images are saved into)"
                )
            skipped = _stored_alike(run, cfg, settings, list(scorer.rows))
        left_out = set(skipped)
        todo = [r for r, u in enumerate(scorer.rows) if u not in left_out]
        if skipped and log is not None:
            making = (
                f"making {unit_ranges([scorer.rows[r] for r in todo])}"
                if todo
                else "nothing to make"
            )
            log(
                f"{_units_word(skipped)} {unit_ranges(skipped)} already made with these settings; "
                f"{making}"
            )
        images: list[Tensor] = []
        reached: list[Tensor] = []
        start: list[Tensor] = []
        peaks: list[Tensor] = []
        for lo in range(0, len(todo), per_chunk):
            rows = todo[lo : lo + per_chunk]
            img, act, first = _optimize(cfg, tap, scorer, rows, tf, norm, seed, dtype, dev, offset)
            images.append(img.cpu())
            reached.append(act.cpu())
            start.append(first.cpu())
            if cfg.signal:
                peaks.append(_peaks(tap, scorer, rows, norm(img), n))
            if on_chunk is not None:
                units_done = [scorer.rows[r] for r in rows]
                part = _result(
                    cfg, units_done, n, [images[-1]], [reached[-1]], [start[-1]], settings
                )
                part.peaks = _shaped(peaks[-1:], part.activations.shape) if cfg.signal else None
                on_chunk(part)
            if progress is not None:
                progress(lo + len(rows), len(todo))
    made = [scorer.rows[r] for r in todo]
    fv = _result(cfg, made, n, images, reached, start, settings)
    fv.skipped = skipped
    if cfg.signal:
        fv.peaks = _shaped(peaks, fv.activations.shape)
    return fv


def _shaped(peaks: list[Tensor], shape: torch.Size) -> Tensor | None:
    """The chunks' peaks as one tensor of ``shape``; None where the map has no positions
    (or nothing was made)."""
    if peaks and all(p.numel() for p in peaks):
        return torch.cat(peaks).reshape(shape)
    return None


def _peaks(tap: _Tap, scorer: _Scorer, rows: list[int], x: Tensor, n: int) -> Tensor:
    """Where along time each unit's map peaks on its final signal (model input ``x``, the
    untransformed signals, ``n`` per unit); empty where the map has no positions."""
    units = torch.tensor([scorer.rows[r] for r in rows for _ in range(n)], device=x.device)
    with torch.no_grad():
        act = tap(x)
    if act.dim() != 3 or scorer.objective == "direction":
        return torch.zeros(0, dtype=torch.long)
    return act[torch.arange(act.shape[0], device=act.device), units].argmax(-1).cpu()


def _neuron_span(tap: _Tap, cfg: _Config, x0: Tensor, t: int, rate: float | None) -> dict[str, Any]:
    """What a signal's neuron objective records of the input its position ``t`` sees:
    ``span``, the half-open ``[t0, t1)`` of input samples (its receptive field along time,
    clipped to the signal, as the unit page shades a peak's), None where the field is not
    known or lies in padding alone; ``span_seconds`` by the run's ``sample_rate``."""
    from ..capture import trace
    from ..graph.receptive import receptive_fields
    from ..probe.layout import position_box

    box = None
    try:
        with torch.no_grad():
            traced = tap.trace or trace(tap.model, tap.feed(x0) if tap.feed else x0, save="none")
        op = traced.hook_ops(cfg.target)[-1]
        axis = 1 if cfg.channels_last or cfg.waveform else None
        rf = receptive_fields(traced, time_axis=axis).get(op.index)
        box = position_box(tap.layout, rf, 0, t, (1, cfg.width))
    except Exception:  # a graph the field rules cannot follow: no span, not a wrong one
        box = None
    if box is None or box[2] >= box[3]:
        return {"span": None}
    span = [int(box[2]), int(box[3])]
    out: dict[str, Any] = {"span": span}
    if rate is not None:
        out["span_seconds"] = [span[0] / rate, span[1] / rate]
    return out


def _feed(cfg: _Config) -> Callable[[Tensor], Tensor] | None:
    """What the model takes from an optimized ``(N, C, 1, T)`` signal: ``(N, C, T)`` (or
    ``(N, T, C)`` for a model that takes its channels last, ``(N, T)`` for a waveform's
    model); None for images."""
    if not cfg.signal:
        return None
    if cfg.waveform:  # samples of one axis: the model makes the one channel itself
        return lambda x: x[:, 0, 0]
    if cfg.channels_last:
        return lambda x: x.squeeze(2).transpose(1, 2)
    return lambda x: x.squeeze(2)


def _result(
    cfg: _Config,
    units: list[int],
    n: int,
    images: list[Tensor],
    reached: list[Tensor],
    start: list[Tensor],
    settings: dict[str, Any],
) -> FeatViz:
    """The :class:`FeatViz` of ``units`` from their chunks' optimized images."""
    shape = (len(units), n) if n > 1 else (len(units),)
    if not images:  # every unit was left out (resume): an empty result of the same shapes
        images = [torch.zeros(0, cfg.channels, cfg.height, cfg.width)]
        reached = start = [torch.zeros(0)]
    all_images = torch.cat(images)
    return FeatViz(
        images=all_images.reshape(*shape, *all_images.shape[1:]),
        activations=torch.cat(reached).reshape(shape),
        layer=cfg.layer,
        units=units,
        objective=cfg.objective,
        start=torch.cat(start).reshape(shape),
        settings=dict(settings),
    )


# ---------------------------------------------------------------------------- config
@dataclass
class _Config:
    layer: str  # the name results are stored under (the run's layer name, or as given)
    target: str  # what is tapped: a module path or a trace label
    layout: Any  # the run's layout record of the layer, or None (found from the model)
    units: list[int] | None
    objective: str
    steps: int
    height: int
    width: int
    channels: int
    lr: float
    param: str
    images_per_unit: int
    diversity: float
    position: tuple[int, ...] | None  # (y, x) on an image's map, (t,) on a signal's
    directions: Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int | None
    max_memory: float | str | None
    #: a model of signals: ``(C, T)`` optimized as an image of height 1 (``width`` is T),
    #: fed as ``amplitude * (2 x - 1)`` (``mean`` 0.5, ``std`` ``1 / (2 amplitude)``), or
    #: with ``bounds`` as ``min + x (max - min)`` per channel (the dataset's range)
    signal: bool = False
    channels_last: bool = False
    amplitude: float | None = None
    waveform: bool = False  # samples of one axis (T,) the model makes one channel itself
    bounds: tuple[list[float], list[float]] | None = None  # each channel's (mins, maxes)
    #: why a run of signals got the default ±3 rather than its channels' ranges
    bounds_note: str | None = None

    @classmethod
    def make(
        cls,
        model: Any,
        layer: Any,
        units: Any,
        objective: str,
        steps: Any,
        size: Any,
        channels: Any,
        lr: float,
        param: str,
        images_per_unit: Any,
        diversity: float | None,
        position: Any,
        directions: Any,
        mean: Any,
        std: Any,
        run: Any,
        batch_size: Any,
        max_memory: Any,
        device: Any,
        amplitude: Any = None,
    ) -> _Config:
        if not isinstance(model, nn.Module):
            raise LurkerError(
                f"featviz needs an nn.Module, got {type(model).__name__}: "
                "lurker.featviz(model, 'features.8')"
            )
        if not isinstance(layer, str) or not layer:
            raise LurkerError(
                f"layer must be a module path or trace label (a string), got {layer!r}"
            )
        if objective not in OBJECTIVES:
            raise LurkerError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        if param not in PARAMS:
            raise LurkerError(f"param {param!r} is not one of {', '.join(PARAMS)}")
        _positive_int(steps, "steps")
        _positive_int(images_per_unit, "images_per_unit")
        if batch_size is not None:
            _positive_int(batch_size, "batch_size")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise LurkerError(f"lr must be a positive number, got {lr!r}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise LurkerError(f"device {device!r}: no CUDA GPU is available here; use cpu")
        name, target, layout = layer, layer, None
        run_size = run_channels = None
        run_mean = run_std = None
        signal: tuple[int, int, bool, bool, Any] | None = None
        if run is not None:
            name, target, layout, run_size, run_channels, run_mean, run_std, signal = _from_run(
                run, layer, size is None, channels is None
            )
        else:  # a Conv1d stack: signals, whatever channels= says (_signal checks it)
            signal = _signal_input(model)
        if signal is not None:
            return cls._signal(
                signal, size, channels, mean, std, amplitude, objective, position,
                name, target, layout, units, steps, lr, param, images_per_unit, diversity,
                directions, batch_size, max_memory,
            )  # fmt: skip
        if amplitude is not None:
            raise LurkerError(
                "amplitude= bounds a signal's values; this model takes images, which are "
                "bounded in [0, 1] before its normalisation (mean=, std=)"
            )
        hw = size if size is not None else (run_size or DEFAULT_SIZE)
        if isinstance(hw, int) and not isinstance(hw, bool):
            hw = (hw, hw)
        if (
            not isinstance(hw, (tuple, list))
            or len(hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in hw)
        ):
            raise LurkerError(f"size must be an int >= 2 or (height, width), got {size!r}")
        c = channels if channels is not None else (run_channels or _input_channels(model))
        _positive_int(c, "channels")
        # the run's, as its probe fed it; else the rule every entry point shares
        if run_mean is None or run_std is None:
            from ..probe.data import normalize_stats  # (lurker.probe's import: when needed)

            run_mean, run_std = normalize_stats(None, c)
        m = tuple(float(v) for v in (mean if mean is not None else run_mean))
        s = tuple(float(v) for v in (std if std is not None else run_std))
        if len(m) != c or len(s) != c:
            raise LurkerError(
                f"mean and std need one value per input channel ({c}), got {len(m)} and {len(s)}"
            )
        if any(v <= 0 for v in s):
            raise LurkerError(f"std values must be positive, got {list(s)}")
        unit_list = _units(units)
        dirs = _directions(objective, directions)
        pos = None
        if position is not None:
            if objective != "neuron":
                raise LurkerError("position= is for objective='neuron'")
            if len(position) != 2 or not all(isinstance(v, int) and v >= 0 for v in position):
                raise LurkerError(f"position must be (y, x) with ints >= 0, got {position!r}")
            pos = (int(position[0]), int(position[1]))
        n = int(images_per_unit)
        div = float(diversity) if diversity is not None else (DEFAULT_DIVERSITY if n > 1 else 0.0)
        return cls(
            name, target, layout, unit_list, objective, int(steps), int(hw[0]), int(hw[1]),
            int(c), float(lr), param, n, div, pos, dirs, m, s, batch_size, max_memory,
        )  # fmt: skip

    @classmethod
    def _signal(
        cls,
        found: tuple[int, int, bool, bool, Any],
        size: Any,
        channels: Any,
        mean: Any,
        std: Any,
        amplitude: Any,
        objective: str,
        position: Any,
        *rest: Any,
    ) -> _Config:
        """The config of a model of signals ``found = (C, T, channels_last, waveform,
        ranges)`` (``ranges``: the run's channel ranges ``(mins, maxes)``, a string saying
        why a run has none, or None without a run): the options that only mean something
        for images are refused, naming what signals take."""
        (name, target, layout, units, steps, lr, param, images_per_unit, diversity,
         directions, batch_size, max_memory) = rest  # fmt: skip
        c, t, last, waveform, ranges = found
        said = f"the model's inputs are signals ({c} channels x {t} samples), not images"
        if mean is not None or std is not None:
            raise LurkerError(
                f"{said}: mean=/std= (--normalize) are an image's normalisation; a signal is "
                "optimized in the model's own input units, within amplitude= (--amplitude)"
            )
        pos = None
        if position is not None:
            if objective != "neuron":
                raise LurkerError("position= is for objective='neuron'")
            # a signal's map has one axis of positions, time: (t,), as an image's (y, x)
            if (
                not isinstance(position, (tuple, list))
                or len(position) != 1
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in position)
                or position[0] < 0
            ):
                raise LurkerError(
                    f"{said}: position= is (t,), the step along time of the layer's map "
                    f"(one int >= 0), got {position!r}"
                )
            pos = (int(position[0]),)
        if isinstance(size, (tuple, list)):
            raise LurkerError(
                f"{said}: size= is the signal's length in samples (one int), got {size!r}"
            )
        length = size if size is not None else t
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise LurkerError(
                f"size (the signal's length in samples) must be an int >= 2, got {size!r}"
            )
        if waveform and channels not in (None, 1):
            raise LurkerError(
                f"{said}: its samples are waveforms of one axis, which the model makes one "
                f"channel itself; channels= must be 1 or left out, got {channels!r}"
            )
        chans = channels if channels is not None else c
        _positive_int(chans, "channels")
        amp = 3.0 if amplitude is None else amplitude
        if (
            isinstance(amp, bool)
            or not isinstance(amp, (int, float))
            or not (math.isfinite(amp) and amp > 0)
        ):
            raise LurkerError(f"amplitude must be a positive number, got {amplitude!r}")
        n = int(images_per_unit)
        div = float(diversity) if diversity is not None else (DEFAULT_DIVERSITY if n > 1 else 0.0)
        mean, std = (0.5,) * chans, (0.5 / amp,) * chans
        bounds = note = None
        if amplitude is None and isinstance(ranges, tuple):
            lo, hi = ranges
            if len(lo) != chans:
                raise LurkerError(
                    f"channels={chans}, but the run recorded the ranges of its {len(lo)} "
                    "channels, which bound each channel's signal: leave channels= out, or "
                    "pass amplitude= to bound every channel to ±amplitude"
                )
            bounds = (list(lo), list(hi))
            # [0, 1] onto [lo, hi]: (x - mean) / std with std = 1 / (hi - lo)
            mean = tuple(-a / (b - a) for a, b in zip(lo, hi, strict=True))
            std = tuple(1 / (b - a) for a, b in zip(lo, hi, strict=True))
        elif amplitude is None and isinstance(ranges, str):
            note = ranges
        return cls(
            name, target, layout, _units(units), objective, int(steps), 1, int(length),
            int(chans), float(lr), param, n, div, pos, _directions(objective, directions),
            mean, std, batch_size, max_memory, True, last,
            None if bounds is not None else float(amp), waveform, bounds, note,
        )  # fmt: skip


def _directions(objective: str, directions: Any) -> Tensor | None:
    """``directions=`` as a ``(D, C)`` tensor for the direction objective (checked)."""
    dirs = None
    if objective == "direction":
        if directions is None:
            raise LurkerError(
                "objective='direction' needs directions=: one vector per image, of the "
                "layer's channel count (a (D, C) array)"
            )
        dirs = torch.as_tensor(np.asarray(directions, dtype=np.float64))
        if dirs.dim() == 1:
            dirs = dirs[None]
        if dirs.dim() != 2 or not torch.isfinite(dirs).all():
            raise LurkerError(
                f"directions must be a finite (D, C) array, got shape {tuple(dirs.shape)}"
            )
    elif directions is not None:
        raise LurkerError("directions= is for objective='direction'")
    return dirs


def _stored_alike(run: Any, cfg: _Config, settings: dict[str, Any], units: list[int]) -> list[int]:
    """The units of ``units`` whose images ``run`` holds for ``cfg.objective``, every copy,
    made with ``settings`` exactly (compared as stored: through JSON)."""
    from ..store import MissingFromRunError, Run
    from ..store.schema import dump_json

    want = json.loads(dump_json(settings))
    opened = None if isinstance(run, Run) else Run.open(run)
    try:
        stored = (opened or run).featviz(cfg.layer, cfg.objective)
    except MissingFromRunError:
        return []
    finally:
        if opened is not None:
            opened.close()
    alike = []
    held = set(stored.units)
    for u in units:
        # a signal's peaks are what it reached, not how it was made
        made = (
            {k: v for k, v in stored.unit_settings(u).items() if k != "peaks"}
            if u in held
            else None
        )
        if made != want:
            continue
        try:  # every copy there (a write stores a unit whole; this guards older runs)
            for k in range(cfg.images_per_unit):
                stored.png(u, k)
        except MissingFromRunError:
            continue
        alike.append(u)
    return alike


def unit_ranges(units: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5`` (what ``--units`` takes; messages say units so)."""
    out: list[str] = []
    for u in sorted(units):
        if out and out[-1].split("-")[-1] == str(u - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{u}"
        else:
            out.append(str(u))
    return ",".join(out)


def _units_word(units: Sequence[int]) -> str:
    return "unit" if len(units) == 1 else "units"


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LurkerError(f"{name} must be a positive integer, got {value!r}")


def _units(units: Any) -> list[int] | None:
    if units is None:
        return None
    if isinstance(units, (int, np.integer)) and not isinstance(units, bool):
        units = [int(units)]
    values = list(units)
    if not values or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise LurkerError(f"units must be unit indices (ints) or None for all, got {units!r}")
    if any(v < 0 for v in values):
        raise LurkerError(f"unit indices start at 0, got {[v for v in values if v < 0]}")
    if len(set(values)) != len(values):
        raise LurkerError(f"units lists a unit twice: {values}")
    return [int(v) for v in values]


def _signal_input(model: nn.Module) -> tuple[int, int, bool, bool, None] | None:
    """``(C, T, False, False, None)`` (as :func:`_from_run` gives a run's, without its
    channel ranges) for a model whose only convolutions are 1-D (a Conv1d stack reads
    ``(N, C, T)``; T is the default length, ``DEFAULT_SIZE``); None for any other."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convs and all(len(m.kernel_size) == 1 for m in convs):
        return int(convs[0].in_channels), DEFAULT_SIZE, False, False, None
    return None


def _input_channels(model: nn.Module) -> int:
    """The channels of the model's input: the first convolution's ``in_channels``."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    for m in convs:
        if len(m.kernel_size) == 2:
            return int(m.in_channels)
    raise LurkerError(
        f"cannot tell how many input channels {type(model).__name__} takes (it has no 2-D "
        "convolution); pass channels= (and size=) for the images it takes"
    )


#: why a model that takes token ids or feature vectors has no feature visualization, and
#: what shows its units instead (signals, channels by time, get signals optimized)
_NOT_IMAGES = (
    "feature visualization optimizes an image (channels, height, width), and "
    "{what} inputs are {kind}, not images: it has no image to optimize. What excites a "
    "unit is in its top samples (Run.unit(layer, u).top('max'), the explorer's unit page), "
    "where the explorer draws each one"
)


def _two_axes(r: Any, shape: list[Any]) -> str:
    """What a run's two-axis samples that are no signals are (signals are optimized as
    such, :func:`_signal_of`): two axes the model reshapes itself (a one-channel image it
    unsqueezes), or a sequence."""
    return (
        f"two axes per sample {tuple(shape)} (a one-channel image the model reshapes "
        "itself, or a sequence), not the (channels, height, width) it optimizes"
    )


def _from_run(
    run: Any, layer: str, want_size: bool, want_channels: bool
) -> tuple[str, str, Any, tuple[int, int] | None, int | None, Any, Any, Any]:
    """The layer's name, op label and layout in ``run``, and the run's input size,
    channels and normalisation; last, ``(C, T, channels_last, waveform, ranges)`` for a
    run of signals (``waveform``: samples of one axis ``(T,)`` that the model makes one
    channel itself; ``ranges``: :func:`_channel_ranges`), else None."""
    from ..store import Run

    r = run if isinstance(run, Run) else Run.open(run)
    info = r.layer(layer)  # UnknownLayerError lists the run's layers
    cfg = r.meta.get("config") or {}
    shape = cfg.get("input_shape")
    sig = _signal_of(r, shape) if isinstance(shape, list) and len(shape) in (1, 2) else None
    if sig is not None:  # a one-axis sample is a waveform the model unsqueezes: (1, T)
        found = (*sig, len(shape) == 1, _channel_ranges(r.meta.get("channel_range"), sig[0]))
        return info.name, info.op or info.name, info.layout, None, None, None, None, found
    if isinstance(shape, list) and len(shape) in (1, 2):  # as the explorer tells them
        kind = (
            _two_axes(r, shape)
            if len(shape) == 2
            else f"one axis of {shape[0]} values (token ids or feature vectors)"
        )
        msg = _NOT_IMAGES.format(what=f"run {r.path}'s", kind=kind)
        raise LurkerError(
            msg,
            cli=msg.replace(
                "Run.unit(layer, u).top('max'), the explorer's unit page",
                f"the unit pages of lurker serve {r.path}",
            )
            + ".",
        )
    if (want_size or want_channels) and not (isinstance(shape, list) and len(shape) == 3):
        raise LurkerError(
            f"run {r.path} does not record its model's input shape (channels, height, "
            f"width); it records {shape!r}. Pass them: featviz(..., channels=C, size=(H, W)) "
            "(CLI: --channels C --image-size H), or probe the model again with this lurker, "
            "which records them",
            cli=f"run {r.path} does not record its model's input shape (channels, height, "
            f"width); it records {shape!r}. Pass --channels C and --image-size H, or probe the "
            "model again with this lurker, which records them.",
        )
    size = (int(shape[1]), int(shape[2])) if shape else None
    chans = int(shape[0]) if shape else None
    return (
        info.name,
        info.op or info.name,
        info.layout,
        size,
        chans,
        cfg.get("mean"),
        _raw_std(cfg.get("std")) if cfg.get("normalize") == "raw" else cfg.get("std"),
        None,
    )


#: what a run of signals' featviz settings say where it bounds to the default ±3 because
#: the run records no channel ranges
NO_RANGES = (
    "±3: the run records no range of its channels (probed before lurker recorded one); "
    "probe it again with overwrite=True (--overwrite; it drops the run's feature "
    "visualizations) to bound each channel to its dataset range, or pass amplitude="
)


def _channel_ranges(recorded: Any, channels: int) -> tuple[list[float], list[float]] | str:
    """A run's recorded ``channel_range`` as each channel's ``(mins, maxes)``, or why it
    gives none (an older run; a channel with no finite value, which leaves nothing to bound
    it to). A channel whose values are all one gets a span of a millionth of its value (at
    least 1e-6) around it: nothing else is the data's own scale."""
    if not isinstance(recorded, dict):
        return NO_RANGES
    lo, hi = recorded.get("min"), recorded.get("max")
    if not isinstance(lo, list) or not isinstance(hi, list) or len(lo) != channels:
        return NO_RANGES
    if len(hi) != len(lo) or any(v is None for v in (*lo, *hi)):
        empty = [i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a is None or b is None]
        return (
            f"±3: channel(s) {empty} of the run's dataset hold no finite value, so no range "
            "bounds them; pass amplitude= to choose the bound"
        )
    mins, maxes = [], []
    for a, b in zip(lo, hi, strict=True):
        a, b = float(a), float(b)
        if b <= a:
            half = 1e-6 * max(1.0, abs(a))
            a, b = a - half, a + half
        mins.append(a)
        maxes.append(b)
    return mins, maxes


def _signal_settings(cfg: _Config) -> dict[str, Any]:
    """What a signal's settings record of its bounds (resume compares them; the store and
    the explorer decode the stored 8-bit image by them)."""
    if cfg.bounds is not None:
        return {"input": "signal", "bounds": [cfg.bounds[0], cfg.bounds[1]]}
    out: dict[str, Any] = {"input": "signal", "amplitude": cfg.amplitude}
    if cfg.bounds_note is not None:
        out["amplitude_note"] = cfg.bounds_note
    return out


def _signal_of(r: Any, shape: list[Any]) -> tuple[int, int, bool] | None:
    """``(C, T, channels_last)`` where the run's samples are signals (two axes, or a
    waveform's one), read from its graph as the explorer reads them; None otherwise (or a
    run with no graph)."""
    from ..explain.axes import graph_signal_layout

    try:
        return graph_signal_layout(r.graph, shape)
    except Exception:  # no graph (an older run): not told apart
        return None


def _raw_std(std: Any) -> Any:
    """A raw run's (``--normalize raw``: uint8 images, 0..255, that the model scales
    itself) std as featviz applies it to its [0, 1] image: divided by 255, so the model is
    fed 0..255 values as its probe fed it, not [0, 1] ones it would divide by 255 again."""
    return None if std is None else [float(v) / 255.0 for v in std]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no parameter gradients while optimizing; restored however it exits
    (the model's own ``.grad`` and flags are left as they were)."""
    from ..capture import evaluating

    params = [(p, p.requires_grad) for p in model.parameters()]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with evaluating(model):
        try:
            for p, _ in params:
                p.requires_grad_(False)
            yield dev
        finally:
            for p, rg in params:
                p.requires_grad_(rg)


# ---------------------------------------------------------------------------- the tap
class _Stop(Exception):
    """Ends a forward once the target layer has run: nothing after it is needed."""


class _Tap:
    """``tap(x)`` runs the model up to ``target`` and returns its output as ``(B, C, ...)``.

    A module path is read with a forward hook on that module (one that runs more than
    once is refused: its calls are named ``path:1``, ``path:2``); any other name through
    the trace's hook API (one trace of ``x0``, then ``trace.run`` per call), so
    functional ops (``add_2``, ``relu_4``) and one call of a reused module work too.
    """

    def __init__(
        self,
        model: nn.Module,
        target: str,
        x0: Tensor,
        layout: Any,
        name: str,
        unit_dim: int | None = None,
        feed: Callable[[Tensor], Tensor] | None = None,
    ):
        self.model = model
        #: what the model takes from an optimized input (a signal's ``(N, C, 1, T)`` as
        #: ``(N, C, T)``); None: the image as it is
        self.feed = feed
        self.target = target
        self.layout = layout
        self.name = name
        self.module = dict(model.named_modules()).get(target)
        self.trace: Any = None
        if self.module is not None and layout is not None:
            return  # a module hook reads it, the run says where its units are
        from ..capture import trace

        with torch.no_grad():
            try:
                traced = trace(model, feed(x0) if feed else x0, save="none")
            except LurkerError as e:
                if feed is not None:  # a signal: channels= and size= are not what is wrong
                    fed = tuple(feed(x0).shape[1:])
                    raise LurkerError(
                        f"the model does not run on a {fed} signal (channels, samples). {e} "
                        "A model that takes its signal channels last (T, C) or as a "
                        "waveform (T,) it gives a channel itself is told by its probe run: "
                        "pass run= (a probe of this model).",
                        cli=f"the model does not run on a {fed} signal (channels, samples). "
                        f"{e.for_cli()} A model that takes its signal channels last (T, C) or "
                        "as a waveform (T,) it gives a channel itself is told by its probe "
                        "run: pass the run instead of a model spec.",
                    ) from e
                shape = tuple(x0.shape[1:])
                raise LurkerError(
                    f"the model does not run on a {shape} image. {e} Pass the channels and "
                    "size it takes (channels=, size=).",
                    cli=f"the model does not run on a {shape} image. {e.for_cli()} Pass the "
                    "channels and size it takes (--channels, --image-size).",
                ) from e
        try:
            traced.hooks({target: lambda op, out: None})
        except OpKeyError as e:
            close = close_names(name, [*dict(model.named_modules()), *traced.keys()])
            raise LurkerError(
                f"layer {name!r} is not in {type(model).__name__}: name a module path "
                "(model.named_modules()) or a trace label (lurker.trace(model, x) lists "
                "them)." + (f" Close names: {', '.join(close)}." if close else "")
            ) from e
        passes = traced.hook_ops(target)
        if len(passes) > 1:
            # a module that runs several times (ResNet's shared relu, a loop) has one output
            # per call: the probe names each, and taking one silently optimizes another unit
            n = len(passes)
            calls = (
                ", ".join(f"{target}:{k}" for k in range(1, n + 1))
                if n <= 4
                else f"{target}:1 to {target}:{n}"
            )
            raise LurkerError(
                f"layer {name!r} runs {n} times in {type(model).__name__}'s forward, "
                f"each call its own output: name the one to visualize ({calls}), as the probe "
                "names them"
            )
        if layout is None:  # no run: where its units are, as the probe would find them
            from ..probe.layout import layer_layout

            self.layout = layer_layout(
                traced,
                target,
                unit_dim,
                hint="name the axis with unit_dim= (counting the batch axis), or pass the "
                "run= of a probe that names it",
            )
        if self.module is None:
            self.trace = traced

    def __call__(self, x: Tensor) -> Tensor:
        grabbed: list[Tensor] = []
        if self.feed is not None:
            x = self.feed(x)

        def keep(out: Any) -> None:
            if isinstance(out, (tuple, list)):
                out = next((t for t in out if isinstance(t, Tensor)), out)
            if not isinstance(out, Tensor):
                raise LurkerError(
                    f"layer {self.name!r} gives a {type(out).__name__}, not a tensor; name an "
                    "op inside it (a trace label)"
                )
            grabbed.append(out)
            raise _Stop

        try:
            if self.trace is None:
                assert self.module is not None
                handle = self.module.register_forward_hook(lambda m, i, o: keep(o))
                try:
                    self.model(x)
                finally:
                    handle.remove()
            else:
                self.trace.run(x, save="none", hooks={self.target: lambda op, o: keep(o)})
        except _Stop:
            pass
        if not grabbed:
            raise LurkerError(f"layer {self.name!r} did not run in the model's forward")
        act = grabbed[0]
        if self.layout is not None:
            from ..probe.layout import as_units

            act = as_units(self.layout, act)
        if act.dim() < 2:
            raise LurkerError(
                f"layer {self.name!r} gives {tuple(act.shape)}: no unit axis after the batch"
            )
        return act


def _refuses(tap: _Tap, x: Tensor) -> str | None:
    """Why the model does not reach the layer on ``x`` (a padded image), or None. The
    unpadded image ran, so a failure here is taken as the model refusing the size (an
    error that is not about the size recurs on the unpadded images, and is raised then);
    running out of memory is raised at once."""
    try:
        with torch.no_grad():
            tap(x)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


# ---------------------------------------------------------------------------- objectives
@dataclass
class _Scorer:
    """One score per image from the layer's ``(B, C, ...)`` output."""

    objective: str
    rows: list[int]  # unit (or direction) index of each row of the result
    num_channels: int
    position: tuple[int, ...] | None  # (y, x) on an image's map, (t,) on a signal's
    #: the map's size for an untransformed image ((1, T') for a signal's map)
    base_hw: tuple[int, int] | None
    directions: Tensor
    #: a token layer's neuron: the index of the patch token at ``position`` of the patch
    #: grid, and the layer's token count (None for a map of positions)
    token: int | None = None
    num_tokens: int | None = None

    @classmethod
    def make(cls, cfg: _Config, tap: _Tap, x0: Tensor, tf: Transforms) -> _Scorer:
        with torch.no_grad():
            act = tap(x0)
        c = act.shape[1]
        base_hw = tuple(act.shape[2:4]) if act.dim() == 4 else None
        position = None
        dirs = torch.zeros(0, c)
        if cfg.objective == "direction":
            assert cfg.directions is not None
            dirs = cfg.directions
            if dirs.shape[1] != c:
                raise LurkerError(
                    f"directions have {dirs.shape[1]} values each, but layer {cfg.layer!r} "
                    f"has {c} units: give (D, {c}) vectors"
                )
            total, what = dirs.shape[0], "directions"
        else:
            total, what = c, "units"
        rows = cfg.units if cfg.units is not None else list(range(total))
        bad = [u for u in rows if u >= total]
        if bad:
            raise LurkerError(
                f"{what[:-1]} {bad[0]} is out of range: layer {cfg.layer!r} has {total} "
                f"{what} (0..{total - 1}); pass units within that range, or units=None for all"
                if what == "units"
                else f"direction {bad[0]} is out of range: {total} directions were given "
                f"(0..{total - 1})",
                cli=f"unit {bad[0]} is out of range: layer {cfg.layer!r} has {total} {what} "
                f"(0..{total - 1}); pass --units within that range, or leave it out for all",
            )
        token = num_tokens = None
        if cfg.objective == "neuron" and cfg.signal:  # one step along the map's time
            if act.dim() != 3:
                raise LurkerError(
                    f"objective='neuron' on a signal needs a map along time, (B, C, T); "
                    f"layer {cfg.layer!r} gives {tuple(act.shape)} (it sees the whole "
                    "signal): use objective='channel'"
                )
            length = act.shape[2]
            position = cfg.position or (length // 2,)
            if position[0] >= length:
                raise LurkerError(
                    f"position {position} lies outside the {length} steps of layer "
                    f"{cfg.layer!r}'s map along time (0..{length - 1})"
                )
            base_hw = (1, length)
        elif cfg.objective == "neuron":
            grid = _token_grid(tap.layout) if act.dim() == 3 else None
            if grid is not None:  # tokens of image patches: the grid they tile is the map
                order, rows_, cols, _ = grid
                base_hw, num_tokens = (rows_, cols), act.shape[2]
            if base_hw is None:
                raise LurkerError(
                    f"objective='neuron' needs a spatial map, (B, C, H, W), or tokens that "
                    f"stand for image patches; layer {cfg.layer!r} gives {tuple(act.shape)}: "
                    "use objective='channel'"
                )
            position = cfg.position or (base_hw[0] // 2, base_hw[1] // 2)
            if not (position[0] < base_hw[0] and position[1] < base_hw[1]):
                raise LurkerError(
                    f"position {position} lies outside the {base_hw[0]}x{base_hw[1]} "
                    f"{'patch grid' if grid else 'map'} of layer {cfg.layer!r}"
                )
            if grid is not None:
                token = order[position[0] * base_hw[1] + position[1]]
        return cls(
            cfg.objective, rows, c, position, base_hw, dirs.to(x0.device, x0.dtype), token,
            num_tokens,
        )  # fmt: skip

    def __call__(self, act: Tensor, rows: Tensor, directions: Tensor | None) -> Tensor:
        """Scores of a batch whose image ``i`` is for unit ``rows[i]``."""
        b = act.shape[0]
        if self.objective == "direction":
            assert directions is not None
            shape = (b, self.num_channels) + (1,) * (act.dim() - 2)
            return (act * directions.reshape(shape)).sum(1).reshape(b, -1).mean(1)
        picked = act[torch.arange(b, device=act.device), rows]  # (B, ...)
        if self.objective == "channel":
            return picked.reshape(b, -1).mean(1)
        assert self.position is not None and self.base_hw is not None
        if self.token is not None:  # a ViT takes its own size only: the grid never moves
            if picked.shape[1] != self.num_tokens:
                raise LurkerError(
                    f"the layer has {picked.shape[1]} tokens on a transformed image, "
                    f"{self.num_tokens} on the image itself, so the neuron's patch token "
                    "moves: pass transforms=False"
                )
            return picked[:, self.token]
        if picked.dim() == 2:  # a signal's map (B, T): one step along time
            w, t = picked.shape[1], self.position[0]
            return picked[:, min(max(w // 2 + t - self.base_hw[1] // 2, 0), w - 1)]
        # the same place relative to the map's centre (transforms pad the image)
        h, w = picked.shape[1:3]
        y = min(max(h // 2 + self.position[0] - self.base_hw[0] // 2, 0), h - 1)
        x = min(max(w // 2 + self.position[1] - self.base_hw[1] // 2, 0), w - 1)
        return picked[:, y, x]


def _token_grid(layout: Any) -> tuple[list[int], int, int, list[int]] | None:
    """The patch grid of a token layer (:meth:`Layout.patch_grid`: the tokens in grid
    order, its rows and columns, the tokens with no patch), or None for other layers."""
    if layout is None:
        return None
    from ..probe.layout import Layout

    lay = layout if isinstance(layout, Layout) else Layout.from_dict(layout)
    return lay.patch_grid() if len(lay.positions) == 1 else None


def _diversity(act: Tensor, n: int) -> Tensor:
    """Lucid's diversity term, per group of ``n`` images of one unit: the mean cosine
    similarity of each image's Gram matrix (channel x channel, over positions) with the
    others' of its group. One value per image; 0 for a group of one."""
    b, c = act.shape[:2]
    if n < 2:
        return act.new_zeros(b)
    flat = act.reshape(b, c, -1)
    grams = flat @ flat.transpose(1, 2)
    grams = grams.reshape(b // n, n, -1)
    grams = grams / grams.norm(dim=2, keepdim=True).clamp_min(1e-10)
    sim = grams @ grams.transpose(1, 2)  # (groups, n, n)
    off = sim.sum(2) - sim.diagonal(dim1=1, dim2=2)
    return (off / (n - 1)).reshape(b)


# ---------------------------------------------------------------------------- optimizing
def _normaliser(cfg: _Config, dtype: torch.dtype, dev: torch.device) -> Callable[[Tensor], Tensor]:
    """What the model is fed from an optimized image ``x`` in [0, 1]: ``(x - mean) / std``;
    a signal bounded to its channels' ranges as ``min + x (max - min)``, the same map
    without the cancellation ``(x - mean) / std`` suffers for a narrow range far from 0
    (a channel within 100 ± 0.001 would keep a few of float32's digits)."""
    if cfg.bounds is not None:
        lo = torch.tensor(cfg.bounds[0], dtype=dtype, device=dev).view(1, -1, 1, 1)
        span = torch.tensor(cfg.bounds[1], dtype=dtype, device=dev).view(1, -1, 1, 1) - lo
        return lambda x: lo + x * span
    m = torch.tensor(cfg.mean, dtype=dtype, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(cfg.std, dtype=dtype, device=dev).view(1, -1, 1, 1)
    return lambda x: (x - m) / s


def _generator(seed: int, unit: int, copy: int) -> np.random.Generator:
    return np.random.default_rng([seed, unit, copy])


def _start_offset(cfg: _Config) -> Tensor | None:
    """Where each channel of a signal bounded to its dataset's range starts: at the model's
    0 (a standardized signal's mean, a waveform's silence) where the range holds it, else
    at the nearer end, as a logit added before the sigmoid. Started at the range's middle
    instead, a channel whose range is not centred on 0 fed the model a shifted signal,
    and units whose ReLU never fired on it got no gradient and ended at 0. None (the
    middle, 0 on ``±amplitude``) for images and amplitude bounds."""
    if cfg.bounds is None:
        return None
    lo = torch.tensor(cfg.bounds[0], dtype=torch.float64)
    hi = torch.tensor(cfg.bounds[1], dtype=torch.float64)
    zero = ((0 - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.02, 0.98)
    return torch.logit(zero)


def _optimize(
    cfg: _Config,
    tap: _Tap,
    scorer: _Scorer,
    rows: list[int],
    tf: Transforms,
    norm: Callable[[Tensor], Tensor],
    seed: int,
    dtype: torch.dtype,
    dev: torch.device,
    offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Optimize the images of result rows ``rows`` (``images_per_unit`` each) together;
    ``offset``: where each channel starts (:func:`_start_offset`)."""
    n = cfg.images_per_unit
    units = [scorer.rows[r] for r in rows]
    gens = [_generator(seed, u, k) for u in units for k in range(n)]
    h, w, c = cfg.height, cfg.width, cfg.channels
    if cfg.param == "fourier":
        init = np.stack([g.standard_normal((c, h, w // 2 + 1, 2)) * 0.01 for g in gens])
        image: nn.Module = FourierImage(
            torch.as_tensor(init, dtype=dtype), h, w, decorrelate=not cfg.signal, offset=offset
        )
    else:
        init = np.stack([g.uniform(-np.pi, np.pi, (c, h, w // 2 + 1)) for g in gens])
        image = MacoImage(
            torch.as_tensor(init, dtype=dtype), h, w, decorrelate=not cfg.signal, offset=offset
        )
    image.to(dev)
    idx = torch.tensor([u for u in units for _ in range(n)], device=dev)
    dirs = scorer.directions[idx] if scorer.objective == "direction" else None
    opt = torch.optim.Adam(image.parameters(), lr=cfg.lr)

    def evaluate() -> Tensor:
        with torch.no_grad():
            return scorer(tap(norm(image())), idx, dirs)

    first = evaluate()
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        x = tf.apply(image(), [tf.draw(g) for g in gens])
        act = tap(norm(x))
        score = scorer(act, idx, dirs)
        loss = -score.sum()
        if cfg.diversity and n > 1:
            loss = loss + cfg.diversity * _diversity(act, n).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = image()
    return final.detach(), evaluate().detach(), first.detach()


def _chunk_units(cfg: _Config, tap: _Tap, tf: Transforms, x0: Tensor, n: int, count: int) -> int:
    """Units per forward: ``batch_size`` images, or as many as fit ``max_memory``."""
    if cfg.batch_size is not None:
        return max(1, cfg.batch_size // n)
    budget = _memory_budget(cfg.max_memory, x0.device)
    if budget is None:
        return count
    per_image = _bytes_per_image(tap, tf, x0)
    return max(1, min(count, int(budget // max(1, per_image * n))))


def _bytes_per_image(tap: _Tap, tf: Transforms, x0: Tensor) -> int:
    """What one image costs in a step: the tensors autograd keeps for the backward of one
    transformed image's forward to the layer, doubled for the gradients of the backward."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    x = tf.apply(x0, [tf.draw(np.random.default_rng(0))]).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act = tap(x)
    saved += act.numel() * act.element_size()
    return 2 * saved + 16 * x0.numel() * x0.element_size()


def _memory_budget(max_memory: Any, dev: torch.device) -> float | None:
    if max_memory is None or max_memory == "off":
        return None
    if dev.type == "cuda":
        free = float(torch.cuda.mem_get_info(dev)[0])
        auto = 0.5 * free
    else:
        free = _free_ram()
        auto = min(0.25 * free, 4.0 * 2**30)
    if max_memory == "auto":
        return auto
    if isinstance(max_memory, (int, float)) and not isinstance(max_memory, bool):
        if 0 < max_memory <= 1:
            return float(max_memory) * free
        if max_memory > 1:
            return float(max_memory)
    raise LurkerError(
        f"max_memory must be 'auto', a number of bytes, a fraction of the free memory in "
        f"(0, 1], or None; got {max_memory!r}"
    )


def _free_ram() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4.0 * 2**30


def _to_uint8(img: Tensor) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> uint8, rounded."""
    arr = img.detach().float().clamp(0, 1).cpu().numpy()
    return np.round(arr * 255).astype(np.uint8)
