"""Images derived from a probe run, made on request and cached in the run directory.

What the explorer shows for an entry (layer, unit, list, rank) of a unit's top lists:

* the sample as the model saw it: **one file per sample** (``cache/samples/``), however
  many units rank it;
* the unit's guided-backprop gradient image (of its peak for the "max" list, of its
  spatial mean for the "mean" list): made for all entries of a unit in one batched
  backward, and for many units per pass by :meth:`UnitImages.write_all`;
* the receptive-field crop around the unit's peak, as a box on the sample
  (:meth:`UnitImages.crop_box`); a crop file ("crop", "grad_crop") only when asked for.

``lurker images RUN`` precomputes them (for export), with progress, and resumes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..capture import Trace, evaluating, settled_trace
from ..errors import LurkerError, close_names, warn
from ..store import MissingFromRunError, Run, StoreError, atomic_write_bytes
from ..store.files import claim_cache, remove_stale_tmp, safe_component
from ..store.run import LayerInfo
from . import data as pdata
from .images import (
    ImageCache,
    MemoryImageCache,
    _gradients,
    _Reached,
    _unit_map,
    cached,
    crop,
    gradient_pixels,
    png_bytes,
)
from .layout import peak_frame, position_box
from .progress import Progress

Kind = Literal["input", "crop", "grad", "grad_crop"]
#: Every kind of image; :meth:`UnitImages.write_all` makes ``DEFAULT_KINDS`` unless told.
KINDS: tuple[str, ...] = ("input", "grad", "crop", "grad_crop")
#: Cheap and enough for the explorer: crops are boxes it cuts out of these.
DEFAULT_KINDS: tuple[str, ...] = ("input", "grad")
LISTS: tuple[str, ...] = ("max", "mean")


@dataclass(frozen=True)
class ImagesResult:
    """What :meth:`UnitImages.write_all` did: ``made`` new files of ``total`` wanted."""

    total: int
    made: int
    seconds: float

    @property
    def existing(self) -> int:
        """Files that were already there (a resumed run of write_all skips them)."""
        return self.total - self.made

    @property
    def rate(self) -> float:
        """Images made per second."""
        return self.made / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Layer:
    info: LayerInfo
    op_index: int


@dataclass
class _Job:
    """One (layer, unit, list, rank) entry and which of its files write_all must write."""

    unit: int
    which: str
    rank: int
    sample_id: int
    peak: tuple[int, int] | None  # as the run stores it (None: an older run's mean list)
    grad: bool = False
    crop: bool = False
    grad_crop: bool = False


class UnitImages:
    """Lazy, cached images for the units of a run. Needs the model and the dataset.

    ``model`` and ``dataset`` default to what the run recorded (runs made by
    ``lurker probe`` store the model spec, weights and data spec). A model loaded here
    goes to ``device`` (default: the GPU when there is one); a model passed in stays
    where it is unless ``device`` is given. ``batch_size`` caps the gradient jobs of one
    forward and backward (lower it if the device runs out of memory).
    """

    def __init__(
        self,
        run: Run | str | Path,
        model: Any = None,
        dataset: Any = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LurkerError(f"batch_size must be a positive integer, got {batch_size!r}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise LurkerError(f"device {device!r}: no CUDA GPU is available here; use cpu")
        self.run = run if isinstance(run, Run) else Run.open(run)
        cfg = self.run.meta.get("config") or {}
        if model is None or dataset is None:  # before loading what would make no picture
            self._no_pictures()
        given, spec, weights = model is not None, None, None
        if model is None or dataset is None:
            from ..models import default_device, load_model

            spec = cfg.get("model_spec")
            if (model is None and not spec) or (dataset is None and not cfg.get("data")):
                where = self.run.path
                raise LurkerError(
                    "This run does not record how to load its model and data (it was made "
                    "from Python). Pass them: UnitImages(run, model=..., dataset=...).",
                    cli=f"The run in {where} was made from Python and does not record how to "
                    "load its model and data, so `lurker images` cannot rebuild them. Probe "
                    f"it once from the command line: `lurker probe MODEL --data DATA --out "
                    f"{where}` with its model spec (and --weights), data, --layers, --k and "
                    "--image-size; that call records them (without sweeping again), then "
                    "`lurker images` works. Or make them from Python: "
                    "UnitImages(run, model=..., dataset=...).write_all().",
                )
            if model is None:
                weights = cfg.get("weights")
                if weights and not Path(weights).is_file():  # not "the path passed": none was
                    raise LurkerError(
                        f"The run in {self.run.path} records its weights as {weights}, and "
                        "that file does not exist here (moved or deleted): put it back there, "
                        "or pass the model: UnitImages(run, model=..., dataset=...).",
                        cli=f"The run in {self.run.path} records its weights as {weights}, and "
                        "that file does not exist here (moved or deleted): `lurker images` "
                        "loads the run's own model, so put the file back there, or make the "
                        "images from Python: UnitImages(run, model=..., dataset=...).write_all().",
                    )
                model = load_model(spec, weights, device=device or default_device())
                given = False
            if dataset is None:
                data = str(cfg["data"])
                moved = Path(data).is_absolute() and not Path(data).exists()
                if moved and not pdata.is_code_spec(data):  # a moved folder
                    raise LurkerError(
                        f"The run in {self.run.path} records its dataset as the folder {data}, "
                        "and that folder does not exist here (moved or deleted): put it back "
                        "there, or pass the dataset: UnitImages(run, model=..., dataset=...).",
                        cli=f"The run in {self.run.path} records its dataset as the folder "
                        f"{data}, and that folder does not exist here (moved or deleted): "
                        "`lurker images` reads the run's own dataset, so put the folder back "
                        "there, or make the images from Python: UnitImages(run, model=..., "
                        "dataset=...).write_all().",
                    )
                size = self.run.meta.get("image_size") or [224]
                dataset = pdata.load_run_dataset(cfg, int(size[0]))
        if device is not None:
            model = model.to(device)
        from ..models import channels_first_view

        # fed (N, C, H, W) images as the probe fed it (a channels-last model, the run says)
        model = channels_first_view(model, cfg.get("channel_dim"))
        # another model's gradients would be stored as the run's unit images: refused
        # before anything is written (a run that records no fingerprint is not checked)
        from .identity import model_mismatch

        why = model_mismatch(model, self.run.meta, self.run.path, None if given else spec, weights)
        if why is not None:
            raise LurkerError(f"cannot make the unit images: {why}")
        self.model = model  # run in eval mode, and given back in the mode it came in
        self.dataset = pdata.wrap(dataset)
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.batch_size = batch_size
        self.cache: ImageCache = ImageCache()
        # the cache's model-made files are this model's from now on: those made before
        # lurker recorded which model made them, or by another, are dropped (not served
        # as this model's); a cache it cannot write keeps what it makes in memory
        self._fingerprint = self.run.meta.get("model_fingerprint")
        try:
            claim_cache(self.run.path, self._fingerprint)
        except OSError:
            self.cache = MemoryImageCache()
        self._trace: Trace | None = None
        self._layers: dict[str, _Layer] = {}
        self._peaks: dict[tuple[str, int, int], tuple[int, int]] = {}
        self._samples: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._sample_bytes = 0
        self._sample_budget = 256 << 20  # decoded samples kept for reuse across units
        self._compute = threading.RLock()  # one model, shared by a threaded server
        self._loading = threading.Lock()  # guards the decoded-sample cache
        self._checked: dict[str, bool] = {}  # layer -> rows of a batch are independent

    def _no_pictures(self) -> None:
        """Refuse, with the reason, a run whose inputs are flat vectors of numbers (a
        tabular model's features): no picture exists to cut or back-propagate onto. (Token
        ids, integer inputs, are refused where a sample is read, naming them: write_all
        reads one before it says any progress.)"""
        cfg = self.run.meta.get("config") or {}
        shape = cfg.get("input_shape") or []
        if len(shape) == 2:
            self._no_signal_pictures(shape)
        if len(shape) != 1:
            return
        try:
            outputs = self.run.graph.inputs[0].outputs
            dtype = str(outputs[0].dtype or "") if outputs else ""
        except (MissingFromRunError, StoreError, IndexError):
            dtype = ""
        if dtype.startswith(("int", "uint")):
            return
        raise LurkerError(
            f"The run in {self.run.path} was probed on flat vectors of {shape[0]} values "
            "(a tabular model's features), not images: its units have no images to make. "
            "The explorer shows each top sample's feature values instead: `lurker serve "
            "RUN`, or create_app(run, dataset=...) for a run probed from Python.",
            cli=f"The run in {self.run.path} was probed on flat vectors of {shape[0]} values "
            "(a tabular model's features), not images: `lurker images` has no pictures to "
            "make for its units. The explorer shows each top sample's feature values "
            "instead: `lurker serve RUN` (for a run probed from Python, serve it with "
            "create_app(run, dataset=...)).",
        )

    def _no_signal_pictures(self, shape: list[Any]) -> None:
        """Refuse a run of 1-D signals (two axes per sample that its graph reads as
        channels and time, as the explorer tells them): the explorer draws their lines
        and the peak's span; there is no picture to cut or back-propagate onto."""
        from ..explain.axes import graph_signal_layout

        try:
            found = graph_signal_layout(self.run.graph, shape)
        except (MissingFromRunError, StoreError):  # no graph: not told apart
            return
        if found is None:
            return  # a one-channel image the model reshapes itself: it has pictures
        c, t, _ = found
        what = f"signals of {c} channels x {t} samples (channels by time), not images"
        raise LurkerError(
            f"The run in {self.run.path} was probed on {what}: its units have no images to "
            "make. The explorer draws each top sample's lines with the samples the unit's "
            "peak sees shaded: `lurker serve RUN`, or create_app(run, dataset=...) for a run "
            "probed from Python.",
            cli=f"The run in {self.run.path} was probed on {what}: `lurker images` has no "
            "pictures to make for its units. The explorer draws each top sample's lines with "
            "the samples the unit's peak sees shaded instead: `lurker serve RUN`.",
        )

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """The model to run, alone (one model, shared by a threaded server) and in eval
        mode; each module's ``training`` flag is put back after, so a model handed in
        between training epochs goes on training."""
        with self._compute, evaluating(self.model):
            yield

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            x0 = self.dataset.first_image().unsqueeze(0).to(self.device)
            with self._running(), torch.no_grad():
                self._trace = settled_trace(self.model, x0)
        return self._trace

    def _layer(self, layer: str) -> _Layer:
        found = self._layers.get(layer)
        if found is None:
            info = self.run.layer(layer)
            try:
                op = self.trace[info.op or info.name]
            except KeyError as e:
                raise LurkerError(
                    f"Layer {layer!r} of this run is not in the model's trace: is this the "
                    "model the run was made with?"
                ) from e
            found = _Layer(info, op.index)
            self._layers[layer] = found
        return found

    def _op_index(self, layer: str) -> int:
        return self._layer(layer).op_index

    def _sample(self, sample_id: int) -> torch.Tensor:
        """The sample as the model takes it (on the CPU), decoded once while it is reused."""
        with self._loading:
            t = self._samples.get(sample_id)
            if t is not None:
                self._samples.move_to_end(sample_id)
                return t
        item = self.dataset[sample_id]
        if isinstance(item, pdata.Skipped):
            raise LurkerError(f"sample {sample_id} ({item.path}) cannot be read: {item.reason}")
        t = item[0].detach().cpu()
        with self._loading:
            if sample_id not in self._samples:
                self._samples[sample_id] = t
                self._sample_bytes += t.numel() * t.element_size()
            while self._sample_bytes > self._sample_budget and len(self._samples) > 1:
                _, old = self._samples.popitem(last=False)
                self._sample_bytes -= old.numel() * old.element_size()
        return t

    def _sample_pil(self, sample_id: int, frame: int | None = None) -> Image.Image:
        """The sample as an image; a video clip as its frame ``frame`` (default the middle)."""
        t = pdata.clip_frame(self._sample(sample_id), frame)
        pdata.require_picture(t, sample_id)
        if t.dtype == torch.uint8:  # raw 0..255 values: in uint8 arithmetic denormalize
            t = t.float() / 255.0  # would clamp every pixel to 0 or 1 (as input_image does)
        return pdata.to_pil(pdata.denormalize(t, self.dataset.mean, self.dataset.std))

    def frame(self, layer: str, y: int, sample_id: int) -> int | None:
        """The frame of a video clip sample shown for a peak ``(y, x)`` of ``layer``: its
        crop's and gradient's (:func:`lurker.probe.layout.peak_frame`); ``None`` when the
        samples are images or the layer has no frame axis."""
        t = self._sample(sample_id)
        if not pdata.is_clip(t):
            return None
        info = self.run.layer(layer)
        return peak_frame(info.layout, info.shape, y, int(t.shape[1]), info.rf)

    def _entry(self, layer: str, unit: int, which: str, rank: int) -> Any:
        if which not in LISTS:
            raise LurkerError(f"which must be 'max' or 'mean', got {which!r}")
        entries = self.run.unit(layer, unit).top(which)  # type: ignore[arg-type]
        if not 0 <= rank < len(entries):
            raise LurkerError(
                f"{layer} unit {unit} has {len(entries)} entries in its {which!r} list; "
                f"rank {rank} is out of range."
            )
        return entries[rank]

    # -- peaks and boxes -------------------------------------------------------------

    def _find_peaks(self, layer: str, units: Sequence[int], sample_ids: Sequence[int]) -> None:
        """First maxima of ``units[i]`` on ``sample_ids[i]``, batched, into the peak cache."""
        lay = self._layer(layer)
        todo = [
            (u, s)
            for u, s in dict.fromkeys(zip(units, sample_ids))
            if (layer, u, s) not in self._peaks
        ]
        for start in range(0, len(todo), self.batch_size):
            part = todo[start : start + self.batch_size]
            x = torch.stack([self._sample(s) for _, s in part]).to(self.device)
            found: list[torch.Tensor] = []

            def grab(_: Any, value: Any, part: list = part, found: list = found) -> None:
                t = value[0] if isinstance(value, tuple) else value
                ids = torch.tensor([u for u, _ in part], dtype=torch.long)
                found.append(_unit_map(t, ids, lay.info.layout))
                raise _Reached

            with self._running(), torch.no_grad(), contextlib.suppress(_Reached):
                self.trace.run(x, save="none", hooks={lay.op_index: grab})
            if not found:
                raise LurkerError(f"{layer}: its op did not run on these samples")
            maps = found[0]
            width = maps.shape[-1] if maps.dim() > 1 else 1
            for (u, s), flat in zip(part, maps.reshape(len(part), -1).argmax(1).tolist()):
                self._peaks[(layer, u, s)] = (flat // width, flat % width)

    def peak(self, layer: str, unit: int, sample_id: int) -> tuple[int, int]:
        """Where ``unit`` peaks on one sample (first maximum in row-major order)."""
        if (layer, unit, sample_id) not in self._peaks:
            self._find_peaks(layer, [unit], [sample_id])
        return self._peaks[(layer, unit, sample_id)]

    def peaks(self, layer: str, unit: int, which: str = "max") -> list[tuple[int, int]]:
        """Each entry's peak ``(y, x)`` by rank: the unit's first maximum on that sample, as
        the run stores it (both lists; an older run's "mean" list stores none, and its peaks
        are found with one batched forward, then remembered): the place :meth:`crop_box`
        cuts its crop around, so a peak at a token with no patch (a class token: x is that
        token) says the crop is the whole image."""
        if which not in LISTS:
            raise LurkerError(f"which must be 'max' or 'mean', got {which!r}")
        entries = self.run.unit(layer, unit).top(which)  # type: ignore[arg-type]
        todo = [e.sample_id for e in entries if e.y is None]
        if todo:
            self._find_peaks(layer, [unit] * len(todo), todo)
        return [
            (e.y, e.x) if e.y is not None else self._peaks[(layer, unit, e.sample_id)]
            for e in entries
        ]

    def box(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """Half-open input box ``(y0, y1, x0, x1)`` seen by position (y, x) of ``layer``
        (the whole image where the position has no place in it, e.g. a class token)."""
        info = self.run.layer(layer)
        size = self.run.meta.get("image_size")  # (H, W) the model saw; no image to read
        h, w = size[-2:] if size and len(size) >= 2 else self._sample(0).shape[-2:]
        found = position_box(info.layout, info.rf, y, x, (h, w))
        return found if found is not None else (0, h, 0, w)

    def crop_box(self, layer: str, unit: int, which: str, rank: int) -> tuple[int, int, int, int]:
        """The receptive-field box ``(y0, y1, x0, x1)`` of an entry, on its sample image.

        Around the stored peak of the entry (the unit's first maximum on that sample); in
        an older run's "mean" list, which stores none, around the peak found with a forward
        pass, then remembered. The explorer cuts crops out of :meth:`sample_image` and
        :meth:`gradients` with it.
        """
        e = self._entry(layer, unit, which, rank)
        y, x = (e.y, e.x) if e.y is not None else self.peak(layer, unit, e.sample_id)
        return self.box(layer, y, x)

    # -- files -----------------------------------------------------------------------

    def sample_image(self, sample_id: int) -> Path:
        """Path of the sample's image as the model saw it (one file per sample)."""
        target = self.cache.sample_path(self.run, sample_id)
        return self.cache.get_file(
            target, lambda: self._sample_pil(sample_id), f"sample {sample_id}"
        )

    def frame_image(self, sample_id: int, frame: int) -> Path:
        """Path of frame ``frame`` of a video clip sample (the explorer's ``frames/`` file)."""
        target = self.cache.frame_path(self.run, sample_id, frame)
        return self.cache.get_file(
            target, lambda: self._sample_pil(sample_id, frame), f"sample {sample_id} frame {frame}"
        )

    def gradients(self, layer: str, unit: int, which: str = "max") -> list[Path]:
        """Paths of the unit's gradient images, one per rank of its ``which`` list.

        Missing ones are made together (one batched backward) and cached.
        """
        if which not in LISTS:
            raise LurkerError(f"which must be 'max' or 'mean', got {which!r}")
        entries = self.run.unit(layer, unit).top(which)  # type: ignore[arg-type]
        paths = [self.cache.path(self.run, "grad", layer, unit, e.rank, which) for e in entries]
        if not paths or all(self.cache.has(p) for p in paths):
            return paths
        # token ids have no picture, nor a gradient image over one
        sid = entries[0].sample_id
        pdata.require_picture(pdata.clip_frame(self._sample(sid)), sid)
        with self.cache.lock(paths[0]):
            jobs = [
                _Job(unit, which, e.rank, e.sample_id, _peak(e), grad=True)
                for e, p in zip(entries, paths)
                if not self.cache.has(p)
            ]
            for start in range(0, len(jobs), self.batch_size):
                part = jobs[start : start + self.batch_size]
                for job, pixels in zip(part, self._grad_pixels(layer, part)):
                    path = self.cache.path(self.run, "grad", layer, unit, job.rank, which)
                    self.cache.put(path, png_bytes(Image.fromarray(pixels)))
        return paths

    def get(self, kind: Kind, layer: str, unit: int, rank: int, which: str = "max") -> Path:
        """Path of one cached image (made now if missing). "input" is the sample's own file."""
        self._no_pictures()
        if kind not in KINDS:
            raise LurkerError(f"unknown image kind {kind!r}; expected one of {KINDS}")
        e = self._entry(layer, unit, which, rank)
        if kind == "input":
            # a video model's layer: the frame of the peak, its crop's (as the explorer's
            # input.png); an older run's mean list stores none: found with the model, as
            # its crop's is, never a frame made up (the clip's middle one)
            # (only on a layer with a frame axis, whose entries' peaks one batched forward
            # finds, all at once)
            y = e.y
            if (
                y is None
                and self.run.layer(layer).position_axes == 3
                and pdata.is_clip(self._sample(e.sample_id))
            ):
                y = self.peaks(layer, unit, which)[rank][0]
            frame = None if y is None else self.frame(layer, y, e.sample_id)
            if frame is not None:
                return self.frame_image(e.sample_id, frame)
            return self.sample_image(e.sample_id)
        if kind == "grad":
            path = self.cache.path(self.run, "grad", layer, unit, rank, which)
            return path if self.cache.has(path) else self.gradients(layer, unit, which)[rank]

        def make() -> Image.Image:
            pdata.require_picture(pdata.clip_frame(self._sample(e.sample_id)), e.sample_id)
            box = self.crop_box(layer, unit, which, rank)
            if kind == "crop":
                y = e.y if e.y is not None else self.peak(layer, unit, e.sample_id)[0]
                frame = self.frame(layer, y, e.sample_id)
                return crop(self._sample_pil(e.sample_id, frame), box)
            with Image.open(self.cache.open(self.get("grad", layer, unit, rank, which))) as full:
                return crop(full.copy(), box)

        return self.cache.get(self.run, kind, layer, unit, rank, which, make)

    # -- batched gradients -------------------------------------------------------------

    def _grad_pixels(self, layer: str, jobs: Sequence[_Job]) -> np.ndarray:
        """Gradient images of ``jobs`` (one layer) as ``(N, H, W, 3)`` uint8, batched.

        The first batch of each layer is checked against one job run alone: if the rows
        of a batch interact (a model using batch statistics), the layer falls back to
        one job per pass with a warning, rather than give wrong images.
        """
        lay = self._layer(layer)
        if self._checked.get(layer) is False:
            return np.concatenate([self._grad_batch(lay, layer, [j])[0] for j in jobs])
        pixels, grad = self._grad_batch(lay, layer, jobs)
        if layer not in self._checked and len(jobs) > 1:
            _, alone = self._grad_batch(lay, layer, jobs[:1])
            scale = float(alone.abs().max())
            ok = bool((grad[:1] - alone).abs().max() <= 1e-3 * scale + 1e-7)
            self._checked[layer] = ok
            if not ok:
                warn(
                    f"{layer}: the samples of a batch change each other's gradients (the "
                    "model uses batch statistics?); making this layer's gradients one image "
                    "per pass",
                    RuntimeWarning,
                )
                return self._grad_pixels(layer, jobs)
        return pixels

    def _grad_batch(
        self, lay: _Layer, layer: str, jobs: Sequence[_Job]
    ) -> tuple[np.ndarray, torch.Tensor]:
        x = torch.stack([self._sample(j.sample_id) for j in jobs]).to(self.device)
        with self._running():
            grad, argmax, pos = _gradients(
                self.trace,
                lay.op_index,
                x,
                [j.unit for j in jobs],
                [j.which for j in jobs],
                [j.peak for j in jobs],
                lay.info.layout,
            )
        width = pos[-1] if pos else 1
        for j, flat in zip(jobs, argmax.tolist()):
            self._peaks[(layer, j.unit, j.sample_id)] = (flat // width, flat % width)
        if grad.dim() == 5:  # video clips: each gradient on the frame of its entry's peak
            ys = [(j.peak or self._peaks[(layer, j.unit, j.sample_id)])[0] for j in jobs]
            frames = [self.frame(layer, y, j.sample_id) for y, j in zip(ys, jobs)]
            grad = torch.stack([pdata.clip_frame(g, f) for g, f in zip(grad, frames)])
        return gradient_pixels(grad).cpu().numpy(), grad

    # -- writing all images ------------------------------------------------------------

    def select(self, layers: Sequence[str] | str | None = None) -> list[str]:
        """The run's layers matching ``layers`` (names, module paths, op labels or types,
        globs allowed); all when None."""
        if layers is None:
            return [info.name for info in self.run.layers]
        pats = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        unmatched = set(pats)
        for info in self.run.layers:
            names = [n for n in (info.name, info.module, info.op, info.kind) if n]
            hit = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if hit:
                chosen.append(info.name)
                unmatched.difference_update(hit)
        if unmatched:
            valid = [info.name for info in self.run.layers]
            shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
            known = sorted({n for i in self.run.layers for n in (i.name, i.module, i.op) if n})
            close = [c for p in sorted(unmatched) for c in close_names(p, known, 3)]
            hint = f" Close names: {', '.join(dict.fromkeys(close))}." if close else ""
            raise LurkerError(
                f"No layer of this run matches {sorted(unmatched)}.{hint} Name layers, module "
                f"paths, op labels or types (globs allowed). This run's layers: {shown}"
            )
        return chosen

    def write_all(
        self,
        layers: Sequence[str] | str | None = None,
        kinds: Sequence[str] = DEFAULT_KINDS,
        which: Sequence[str] = LISTS,
        progress: bool = True,
        progress_every: float = 5.0,
    ) -> ImagesResult:
        """Make the images of every unit's top lists (of ``layers``, default all).

        ``kinds``: any of "input" (each sample once; a video model's, also each frame its
        entries are shown on), "grad" (batched across the units of
        a layer), "crop" and "grad_crop" (files cut around the peak; the explorer can cut
        them itself from :meth:`crop_box`). Files already there are skipped, so a killed
        run resumes (and the temporary files a killed one left are removed); each file is
        written atomically. ``progress``: a bar on a
        terminal, one output redrawn in place in a notebook, else a line every
        ``progress_every`` seconds, on stderr.
        """
        self._no_pictures()
        kinds = _checked_choice("kinds", kinds, KINDS)
        lists = _checked_choice("which", which, LISTS)
        names = self.select(layers)
        t0 = time.perf_counter()
        remove_stale_tmp(Path(self.run.path) / "cache")  # a SIGKILL's half-written files
        if not isinstance(self.cache, MemoryImageCache):  # (the cache deleted since)
            claim_cache(self.run.path, self._fingerprint)
        plan, samples, frames, total = self._plan(names, kinds, lists)
        # token ids have no picture: refused naming them, before any progress is said
        sid = samples[0] if samples else next((j.sample_id for _, js in plan for j in js), None)
        if sid is not None:
            pdata.require_picture(pdata.clip_frame(self._sample(sid)), sid)
        todo = _count(plan, samples) + len(frames)
        bar = Progress("images", total, total - todo, progress, progress_every)
        made = 0
        with _Writer(bar) as out:
            for sid in samples:
                target = self.cache.sample_path(self.run, sid)
                out.submit(target, self._sample_pil(sid))
            for sid, frame in frames:
                target = self.cache.frame_path(self.run, sid, frame)
                out.submit(target, self._sample_pil(sid, frame))
            for name, jobs in plan:
                self._write_layer(name, jobs, out)
            made = out.close()
        bar.close()
        return ImagesResult(total, made, time.perf_counter() - t0)

    def render_all(self, *args: Any, **kwargs: Any) -> ImagesResult:
        """Deprecated name of :meth:`write_all` ("render" now means drawing the graph)."""
        warnings.warn(
            "UnitImages.render_all is deprecated: use UnitImages.write_all (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.write_all(*args, **kwargs)

    def _plan(
        self, names: list[str], kinds: tuple[str, ...], lists: tuple[str, ...]
    ) -> tuple[list[tuple[str, list[_Job]]], list[int], list[tuple[int, int]], int]:
        """Per layer, the entries with a file to write; missing sample ids; missing frames
        ``(sample id, frame)`` of a video model's entries (their "input"); files wanted."""
        total = 0
        samples: set[int] = set()
        shown: set[tuple[int, int]] = set()
        clip = _clip_frames(self.run)
        plan = []
        for name in names:
            info = self.run.layer(name)
            have = {  # one listing per folder, not a stat per file
                kind: _listing(
                    self.run.path / "cache" / safe_component(kind) / safe_component(name)
                )
                for kind in ("grad", "crop", "grad_crop")
            }
            jobs = []
            for u in range(info.num_units):
                unit = self.run.unit(name, u)
                for lst in lists:
                    for e in unit.top(lst):  # type: ignore[arg-type]
                        samples.add(e.sample_id)
                        if clip is not None and e.y is not None:
                            f = peak_frame(info.layout, info.shape, e.y, clip, info.rf)
                            if f is not None:
                                shown.add((e.sample_id, f))
                        file = f"{u:05d}-{lst}-{e.rank:03d}.png"
                        job = _Job(u, lst, e.rank, e.sample_id, _peak(e))
                        for kind in ("grad", "crop", "grad_crop"):
                            if kind in kinds:
                                total += 1
                                setattr(job, kind, file not in have[kind])
                        if job.grad or job.crop or job.grad_crop:
                            jobs.append(job)
            plan.append((name, jobs))
        missing: list[int] = []
        frames: list[tuple[int, int]] = []
        if "input" in kinds:
            total += len(samples) + len(shown)
            have_samples = _listing(self.run.path / "cache" / "samples")
            missing = [s for s in sorted(samples) if f"{s:08d}.png" not in have_samples]
            have_frames = _listing(self.run.path / "cache" / "frames")
            frames = [
                (s, f)
                for s, f in sorted(shown)
                if self.cache.frame_path(self.run, s, f).name not in have_frames
            ]
        return plan, missing, frames, total

    def _write_layer(self, name: str, jobs: list[_Job], out: _Writer) -> None:
        path = self.cache.path
        # In sample order: a sample that many units rank is decoded once, not once a unit.
        # Gradients first: their pass also finds the peaks that crops of "mean" entries need.
        jobs = sorted(jobs, key=lambda j: (j.sample_id, j.unit, j.which, j.rank))
        grads = [j for j in jobs if j.grad or (j.grad_crop and not _exists(self, name, j))]
        for start in range(0, len(grads), self.batch_size):
            part = grads[start : start + self.batch_size]
            for j, pixels in zip(part, self._grad_pixels(name, part)):
                image = Image.fromarray(pixels)
                if j.grad:
                    out.submit(path(self.run, "grad", name, j.unit, j.rank, j.which), image)
                if j.grad_crop:
                    box = self._box_of(name, j)
                    target = path(self.run, "grad_crop", name, j.unit, j.rank, j.which)
                    out.submit(target, crop(image, box))
                    j.grad_crop = False
        rest = [j for j in jobs if j.crop or j.grad_crop]
        need = [j for j in rest if j.peak is None]
        self._find_peaks(name, [j.unit for j in need], [j.sample_id for j in need])
        for j in rest:
            box = self._box_of(name, j)
            if j.crop:
                target = path(self.run, "crop", name, j.unit, j.rank, j.which)
                y = j.peak[0] if j.peak is not None else self.peak(name, j.unit, j.sample_id)[0]
                image = self._sample_pil(j.sample_id, self.frame(name, y, j.sample_id))
                out.submit(target, crop(image, box))
            if j.grad_crop:  # its gradient image is already on disk
                grad = path(self.run, "grad", name, j.unit, j.rank, j.which)
                with Image.open(grad) as full:
                    image = crop(full.copy(), box)
                out.submit(path(self.run, "grad_crop", name, j.unit, j.rank, j.which), image)

    def _box_of(self, layer: str, j: _Job) -> tuple[int, int, int, int]:
        y, x = j.peak if j.peak is not None else self.peak(layer, j.unit, j.sample_id)
        return self.box(layer, y, x)


def _clip_frames(run: Run) -> int | None:
    """The frames of a run's clips (its samples are video clips ``(C, D, H, W)``), else None."""
    shape = (run.meta.get("config") or {}).get("input_shape") or []
    return int(shape[1]) if len(shape) == 4 and shape[0] in (1, 3) else None


def _peak(e: Any) -> tuple[int, int] | None:
    return (e.y, e.x) if e.y is not None else None


def _exists(images: UnitImages, layer: str, j: _Job) -> bool:
    return cached(images.cache.path(images.run, "grad", layer, j.unit, j.rank, j.which))


def _listing(folder: Path) -> set[str]:
    """Names of the non-empty files in ``folder`` (see :func:`cached`)."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file() and e.stat().st_size > 0}
    except FileNotFoundError:
        return set()


def _count(plan: list[tuple[str, list[_Job]]], samples: list[int]) -> int:
    """Files write_all still has to write."""
    return len(samples) + sum(j.grad + j.crop + j.grad_crop for _, jobs in plan for j in jobs)


def _checked_choice(what: str, values: Sequence[str] | str, allowed: tuple[str, ...]) -> tuple:
    vals = tuple(v.strip() for v in values.split(",")) if isinstance(values, str) else tuple(values)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise LurkerError(
            f"{what} must be some of {', '.join(allowed)} (comma-separated); got "
            f"{', '.join(map(repr, bad)) or 'nothing'}"
        )
    return tuple(dict.fromkeys(vals))


class _Writer:
    """Encodes and writes PNGs on a few threads (zlib releases the GIL) while the model
    computes the next batch; each file atomically. At most a few batches are in flight."""

    def __init__(self, progress: Progress, threads: int = min(4, os.cpu_count() or 1)):
        self.progress = progress
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="lurker-png")
        self.pending: list[Future] = []
        self.limit = 256
        self.made = 0

    def submit(self, target: Path, image: Image.Image) -> None:
        self.pending.append(self.pool.submit(_write, target, image))
        if len(self.pending) >= self.limit:
            self._collect(wait=len(self.pending) // 2)
        else:
            self._collect(wait=0)

    def _collect(self, wait: int) -> None:
        for f in self.pending[:wait]:
            f.result()
        done = {f for f in self.pending if f.done()}
        for f in done:
            f.result()  # raises a failed write
        self.pending = [f for f in self.pending if f not in done]
        if done:
            self.made += len(done)
            self.progress.advance(len(done))

    def close(self) -> int:
        self._collect(wait=len(self.pending))
        return self.made

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)


def _write(target: Path, image: Image.Image) -> None:
    # atomic, without an fsync per file: write_all writes many; empty files count as missing
    atomic_write_bytes(target, png_bytes(image), durable=False)


__all__ = ["DEFAULT_KINDS", "KINDS", "ImagesResult", "UnitImages"]


def __getattr__(name: str) -> Any:
    """``RenderResult``: the deprecated name of :class:`ImagesResult`, kept one release."""
    if name == "RenderResult":
        warnings.warn(
            "lurker.probe.views.RenderResult is deprecated: use ImagesResult",
            DeprecationWarning,
            stacklevel=2,
        )
        return ImagesResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
