"""Images derived from a probe run, made on request and cached in the run directory.

For any (layer, unit, list, rank) of a unit's top lists: the input image as the model saw
it, the receptive-field crop around the unit's peak, the unit's guided-backprop gradient
image (of its peak for the "max" list, of its spatial mean for the "mean" list), and the
crop of that gradient. ``lurker render RUN`` precomputes them all for export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..capture import Trace, trace
from ..capture._replay import run_with
from ..errors import LurkerError
from ..store import Run
from . import data as pdata
from .images import ImageCache, crop, render_gradient, unit_gradient
from .layout import position_box, unit_map

Kind = Literal["input", "crop", "grad", "grad_crop"]


class UnitImages:
    """Lazy, cached images for the units of a run. Needs the model and the dataset.

    ``model`` and ``dataset`` default to what the run recorded (runs made by
    ``lurker probe`` store the model spec, weights and data spec).
    """

    def __init__(self, run: Run | str | Path, model: Any = None, dataset: Any = None):
        self.run = run if isinstance(run, Run) else Run.open(run)
        cfg = self.run.meta.get("config") or {}
        if model is None or dataset is None:
            from ..models import load_model

            spec = cfg.get("model_spec")
            if (model is None and not spec) or (dataset is None and not cfg.get("data")):
                where = self.run.path
                raise LurkerError(
                    "This run does not record how to load its model and data (it was made "
                    "from Python). Pass them: UnitImages(run, model=..., dataset=...).",
                    cli=f"The run in {where} was made from Python and does not record how to "
                    "load its model and data, so `lurker render` cannot rebuild them. Probe "
                    f"it once from the command line: `lurker probe MODEL --data DATA --out "
                    f"{where}` with its model spec (and --weights), data, --layers, --k and "
                    "--image-size; that sweep records them, then `lurker render` works. Or "
                    "render from Python: UnitImages(run, model=..., dataset=...).render_all().",
                )
            if model is None:
                model = load_model(spec, cfg.get("weights"))
            if dataset is None:
                size = self.run.meta.get("image_size") or [224]
                dataset = pdata.load_dataset(
                    cfg["data"], int(size[0]), channels=(cfg.get("input_shape") or [None])[0]
                )
        self.model = model.eval()
        self.dataset = pdata.wrap(dataset)
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.cache = ImageCache()
        self._trace: Trace | None = None

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            x0 = self.dataset.first_image().unsqueeze(0).to(self.device)
            with torch.no_grad():
                self._trace = trace(self.model, x0)
        return self._trace

    def _op_index(self, layer: str) -> int:
        info = self.run.layer(layer)
        try:
            return self.trace[info.op or info.name].index
        except KeyError as e:
            raise LurkerError(
                f"Layer {layer!r} of this run is not in the model's trace: is this the model "
                "the run was made with?"
            ) from e

    def _sample(self, sample_id: int) -> torch.Tensor:
        item = self.dataset[sample_id]
        if isinstance(item, pdata.Skipped):
            raise LurkerError(f"sample {sample_id} ({item.path}) cannot be read: {item.reason}")
        return item[0].to(self.device)

    def peak(self, layer: str, unit: int, sample_id: int) -> tuple[int, int]:
        """Where ``unit`` peaks on one sample (first maximum in row-major order)."""
        idx = self._op_index(layer)
        found: dict[str, Any] = {}

        def grab(i: int, value: Any) -> None:
            t = value[0] if isinstance(value, tuple) else value
            found["t"] = t.detach().clone()

        with torch.no_grad():
            run_with(self.trace, (self._sample(sample_id).unsqueeze(0),), {}, [idx], grab)
        a = unit_map(self.run.layer(layer).layout, found["t"], unit)
        if a.dim() == 0:
            return (0, 0)
        if a.dim() == 1:
            return (0, int(a.argmax()))
        flat = int(a.flatten().argmax())
        return (flat // a.shape[-1], flat % a.shape[-1])

    def box(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """Half-open input box ``(y0, y1, x0, x1)`` seen by position (y, x) of ``layer``
        (the whole image where the position has no place in it, e.g. a class token)."""
        info = self.run.layer(layer)
        size = self.run.meta.get("image_size")  # (H, W) the model saw; no image to read
        h, w = size[-2:] if size and len(size) >= 2 else self._sample(0).shape[-2:]
        found = position_box(info.layout, info.rf, y, x, (h, w))
        return found if found is not None else (0, h, 0, w)

    def get(self, kind: Kind, layer: str, unit: int, rank: int, which: str = "max") -> Path:
        """Path of one cached image (made now if missing)."""
        entries = self.run.unit(layer, unit).top(which)  # type: ignore[arg-type]
        if not 0 <= rank < len(entries):
            raise LurkerError(
                f"{layer} unit {unit} has {len(entries)} entries in its {which!r} list; "
                f"rank {rank} is out of range."
            )
        e = entries[rank]
        return self.cache.get(
            self.run,
            kind,
            layer,
            unit,
            rank,
            which,
            lambda: self._make(kind, layer, unit, e, which),
        )

    def _make(self, kind: str, layer: str, unit: int, e: Any, which: str) -> Image.Image:
        if kind == "input":
            return pdata.input_image(self.dataset, e.sample_id)
        y, x = (e.y, e.x) if e.y is not None else self.peak(layer, unit, e.sample_id)
        box = self.box(layer, y, x)
        if kind == "crop":
            return crop(pdata.input_image(self.dataset, e.sample_id), box)
        if kind == "grad_crop":  # reuse the (cached) full gradient image
            with Image.open(self.get("grad", layer, unit, e.rank, which)) as full:
                return crop(full.copy(), box)
        grad = unit_gradient(
            self.trace,
            self._op_index(layer),
            self._sample(e.sample_id),
            unit,
            mode="max" if which == "max" else "mean",
            peak=(y, x) if which == "max" else None,
            layout=self.run.layer(layer).layout,
        )
        return render_gradient(grad.detach().cpu())

    def render_all(self, layers: list[str] | None = None, progress: bool = True) -> int:
        """Make every image of every unit's top lists (of ``layers``, default all).

        Returns how many images exist now.
        """
        from rich.progress import Progress

        jobs = []
        for info in self.run.layers if layers is None else map(self.run.layer, layers):
            for u in range(info.num_units):
                unit = self.run.unit(info.name, u)
                for which in ("max", "mean"):
                    for rank in range(len(unit.top(which))):  # type: ignore[arg-type]
                        jobs.append((info.name, u, rank, which))
        kinds: tuple[Kind, ...] = ("input", "crop", "grad", "grad_crop")
        with Progress(disable=not progress) as bar:
            task = bar.add_task("rendering", total=len(jobs) * len(kinds))
            for layer, u, rank, which in jobs:
                for kind in kinds:
                    self.get(kind, layer, u, rank, which)
                    bar.advance(task)
        return len(jobs) * len(kinds)
