"""What a run needs beyond its database: its dataset (sample images) and a live model.

One :class:`Session` per served run. Everything is loaded on first use; model work runs
in the caller's worker thread (FastAPI runs sync endpoints off the event loop) under the
model's lock, so one call at a time reaches a model while other requests are served.
Per-image results (the preprocessed input, each op's maps) sit in small LRU caches, so
clicking through the channels of an op costs no forward pass.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lurker.errors import GraphChangedError, LurkerError
from lurker.specs import same_spec, same_weights
from lurker.store.files import safe_component

from .classes import class_names
from .errors import ApiError, listing, model_failed, no_model, wrong_model
from .state import (
    clip_frames,
    input_dtype,
    signal_layout,
    signal_shape,
    signal_waveform,
    token_length,
    vector_length,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from lurker.capture import Trace
    from lurker.store.run import LayerInfo

    from .state import RunEntry

#: Feature maps smaller than this (pixels, on their longer side) are upscaled.
MIN_MAP_PX = 64
#: Live inputs kept (preprocessed), and bytes of per-(image, op) maps kept.
LIVE_IMAGES = 64
MAP_BUDGET = 256 << 20


def run_vocab(run: Any, vocab: Any) -> list[str | None]:
    """``vocab`` (as ``lurker.vocab.as_vocab`` takes it) for a run of token ids, padded
    to the rows its embedding looks up (recorded in its graph): an id without a word shows
    as its id, never as another id's word. The server has not the data's ids to check it
    against (the probe does); a vocabulary much shorter than the rows is warned about."""
    from lurker.vocab import as_vocab, fit_vocab, id_space

    rows = id_space(run.graph)
    return fit_vocab(as_vocab(vocab, rows), rows, None, "")


@dataclass
class ModelSource:
    """What the server was given: a model spec and weights, a model object, a dataset.

    A model given here is loaded once and shared (one lock, one worker thread) by the
    runs it attaches to (see :meth:`Session.uses_given`): ``model_obj`` attaches to every
    run; ``spec`` to the single run served, or, in a folder of runs, to the runs whose
    recorded ``model_spec`` (and ``weights``, when recorded) match. Other runs load the
    model their config records, on first use, or have none.
    """

    spec: str | None = None
    weights: str | None = None
    model_obj: Any = None
    dataset: Any = None
    #: A vocabulary given to the server (``create_app(vocab=...)``, ``lurker serve
    #: --vocab``): it replaces the one the run ``vocab_run`` stores (see
    #: :meth:`Session.vocab`); other runs show their own.
    vocab: Any = None
    vocab_run: str | None = None
    device: str | None = None
    #: False: attach no model at all (the static export: what it writes needs none).
    live: bool = True
    #: True when the server serves one run (a spec given then attaches to it whatever it
    #: records).
    single: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _loaded: Any = None
    _error: str | None = None
    _executor: ThreadPoolExecutor | None = None

    def given(self) -> bool:
        return self.model_obj is not None or self.spec is not None

    def load(self) -> Any:
        """The shared model (loading it from ``spec`` once), in eval mode (BatchNorm uses
        its running statistics and never updates them, dropout is off)."""
        if self.model_obj is not None:
            return self.model_obj.eval()
        if self._loaded is None:
            if self._error is not None:
                raise LurkerError(self._error)
            try:
                self._loaded = _load(self.spec, self.weights, self.device)
            except LurkerError as e:
                self._error = f"cannot load model {self.spec!r}: {e}"
                raise LurkerError(self._error) from e
        return self._loaded.eval()

    def executor(self) -> ThreadPoolExecutor:
        """The one thread that runs the shared model's work."""
        with self._guard:
            if self._executor is None:
                self._executor = _model_thread()
            return self._executor


def _model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="lurker-model")


def _load(spec: str | None, weights: str | None, device: str | None) -> Any:
    from lurker.models import default_device, load_model

    return load_model(spec, weights, device=device or default_device()).eval()


class Session:
    """The dataset, model, unit images and live state of one served run."""

    def __init__(self, entry: RunEntry, source: ModelSource):
        self.entry = entry
        self.source = source
        run = entry.open_run()
        self.config: dict[str, Any] = run.meta.get("config") or {}
        self._guard = threading.Lock()
        self._own_lock = threading.Lock()
        self._dataset: Any = None
        self._dataset_error: str | None = None
        #: (the database's signature it was read at, the words or None, why there are none)
        self._vocab: tuple[Any, list[str | None] | None, str | None] | None = None
        self._model: Any = None
        self._model_error: str | None = None
        #: why the attached model is not the run's (its fingerprint differs): it is never
        #: computed with, and every endpoint that needs the model says this
        self._mismatch: str | None = None
        self._unit_images: Any = None
        self._trace: Trace | None = None
        self._layouts: dict[int, Any] | None = None  # op index -> probe Layout or Skip
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        # an upload's note on how it was prepared (its transparency dropped), by image id
        self._upload_notes: dict[str, str] = {}
        # an upload's file name, by image id (the pages title it so, not by its hash)
        self._upload_names: dict[str, str] = {}
        # what preparing an upload did to it (its size and channels before and after)
        self._upload_prepared: dict[str, str] = {}
        self._maps: OrderedDict[tuple[str, int], tuple[Any, Any]] = OrderedDict()
        self._map_bytes = 0
        # documents made from the dataset, by a key naming the run's generation
        self._made: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._executor = _model_thread()  # its thread starts on the first submit
        #: the background check of the model against the run's fingerprint (check_model
        #: on the model's thread), started by the first summary: the summary never waits
        self._check: Future[None] | None = None
        self._check_lock = threading.Lock()

    # -- which model -----------------------------------------------------------------------

    @property
    def uses_given(self) -> bool:
        """Whether the model given to the server attaches to this run (else the run's own
        recorded model, if any, is used)."""
        src = self.source
        if src.model_obj is not None:
            return True
        if src.spec is None:
            return False
        if src.single:
            return True
        recorded_weights = self.config.get("weights")
        return same_spec(self.config.get("model_spec"), src.spec) and (
            not recorded_weights or same_weights(recorded_weights, src.weights)
        )

    @property
    def foreign_model(self) -> bool:
        """Whether the attached model is not the one the run records (another spec or
        weights, or a model object from Python): what it makes never goes into the run's
        ``cache/``."""
        if not self.uses_given:
            return False
        src = self.source
        if src.model_obj is not None:
            return True
        return not (
            same_spec(self.config.get("model_spec"), src.spec)
            and same_weights(self.config.get("weights"), src.weights)
        )

    # -- what is available ----------------------------------------------------------------

    def read_samples(
        self, items: list[Any], read: Callable[[Any], Any]
    ) -> tuple[list[Any] | None, str | None]:
        """``read`` of each of ``items`` (samples of a page, a layer's top samples) from the
        dataset, or None and why not: all or none (no tile from a dataset that changed), and
        a sample the dataset's own code fails on is said, not a failed page."""
        reason = self.dataset_reason()
        if reason is not None:
            return None, reason
        try:
            return [read(x) for x in items], None
        except ApiError as err:
            return None, err.detail
        except Exception as err:  # the dataset's own error on a sample: the page still lists
            return None, f"the dataset raised {type(err).__name__} reading a sample: {err}"

    def dataset_reason(self) -> str | None:
        """None when the dataset can be had, else why not."""
        if self.source.dataset is not None:
            return None
        if self._dataset_error is not None:
            return self._dataset_error
        if not self.config.get("data"):
            return (
                "the run does not record its dataset (it was probed from Python); serve it "
                "with create_app(..., dataset=...) or probe it with `lurker probe --data`"
            )
        # a moved image folder: said at once (as a missing weights file is), not after
        # pages have asked for images that all fail
        spec = str(self.config["data"])
        from lurker.probe.data import code_spec_file, is_code_spec

        if is_code_spec(spec):  # file.py:fn or pkg.mod:fn: a moved file said at once too
            file = code_spec_file(spec)
            if file is not None and not file.is_file():
                return (
                    f"the run's recorded dataset file {file} (of {spec}) does not exist here "
                    "(moved or deleted); put it back there, or serve the run from Python "
                    "with create_app(RUN, dataset=...)"
                )
            return None
        if spec.partition(":")[0] != "digits" and not Path(spec).expanduser().exists():
            return (
                f"the run's recorded dataset {spec} does not exist here (moved or deleted); "
                "put it back there, or serve the run from Python with "
                "create_app(RUN, dataset=...)"
            )
        return None

    def model_reason(self) -> str | None:
        """None when a model is attached or loadable, else why not."""
        if not self.source.live:
            return "this server was started without models"
        if self._mismatch is not None:
            return self._mismatch
        if self._model_error is not None:
            return self._model_error
        if self.uses_given:
            return self.source._error
        spec = self.config.get("model_spec")
        if not spec:
            return "the run does not record its model (it was probed from Python)"
        weights = self.config.get("weights")
        if weights and not Path(weights).is_file():
            return f"the run's recorded weights {weights} do not exist here"
        return None

    @property
    def model_lock(self) -> threading.Lock:
        return self.source.lock if self.uses_given else self._own_lock

    def executor(self) -> ThreadPoolExecutor:
        """The one thread that runs this run's model work (shared with the other runs of
        the same model)."""
        return self.source.executor() if self.uses_given else self._executor

    # -- loading ---------------------------------------------------------------------------

    def dataset(self) -> Any:
        """The run's dataset as a ProbeDataset (409 with the reason when there is none)."""
        from lurker.probe import data as pdata

        with self._guard:
            if self._dataset is not None:
                return self._dataset
            reason = self.dataset_reason()
            if reason is not None:
                raise ApiError(409, f"run {self.entry.id!r} has no dataset: {reason}")
            try:
                if self.source.dataset is not None:
                    self._dataset = pdata.wrap(self.source.dataset)
                else:
                    run = self.entry.open_run()
                    size = run.meta.get("image_size") or [224]
                    self._dataset = pdata.load_run_dataset(self.config, int(size[0]))
            except LurkerError as e:
                self._dataset_error = f"cannot load the run's dataset: {e}"
                raise ApiError(409, self._dataset_error) from None
            return self._dataset

    def model(self) -> Any:
        """The live model (409 naming how to attach one when there is none)."""
        with self._guard:
            if self._model is not None:
                return self._model
            if self._mismatch is not None:
                raise wrong_model(self.entry.id, self._mismatch)
            reason = self.model_reason()
            if reason is not None:
                raise no_model(self.entry.id, reason)
            try:
                if self.uses_given:
                    model = self.source.load()
                else:
                    model = _load(
                        self.config["model_spec"], self.config.get("weights"), self.source.device
                    )
            except LurkerError as e:
                if not self.uses_given:
                    self._model_error = f"cannot load the run's model: {e}"
                raise no_model(self.entry.id, self.model_reason() or str(e)) from None
            from lurker.models import channels_first_view
            from lurker.probe.identity import model_mismatch

            # the live view, uploads and unit images feed (N, C, H, W) images, as the probe
            # did: a channels-last model (the run's channel_dim) gets them so moved
            model = channels_first_view(model, self.config.get("channel_dim"))
            # another model than the run's (other weights, a random init built otherwise)
            # would show its numbers beside the run's stored top images: checked once here
            spec, weights = self._model_origin()
            why = model_mismatch(model, self.entry.open_run().meta, self.entry.path, spec, weights)
            if why is not None:
                self._mismatch = why
                raise wrong_model(self.entry.id, why)
            self._model = model.eval()
            return self._model

    @property
    def mismatch(self) -> str | None:
        """Why the loaded model is not the run's (its fingerprint differs), once known."""
        return self._mismatch

    def unchecked(self) -> bool:
        """Whether the model is still to be loaded and compared with the run's recorded
        fingerprint (:meth:`check_model`): False once it has been, for an older run that
        records no fingerprint, and where no model can be had."""
        if self._model is not None or self.model_reason() is not None:
            return False
        return bool(self.entry.open_run().meta.get("model_fingerprint"))

    def check_model(self) -> None:
        """Load the model now where :meth:`unchecked`, so that a model other than the run's
        is known (and said by :meth:`model_reason`, the Home page's ``live_reason``) before
        a live page asks for it. Run it on the model's thread (:meth:`executor`)."""
        if not self.unchecked():
            return
        try:
            self.model()
        except ApiError:  # why is said by model_reason()
            pass
        except Exception as e:  # the model's own failure: said on the Home page, not a 500
            with self._guard:
                self._model_error = f"the model cannot be used: {type(e).__name__}: {e}"

    def start_check(self) -> Future[None] | None:
        """Start :meth:`check_model` on the model's thread where the model is still to be
        checked (once); the check under way or done, or None where there is none."""
        with self._check_lock:
            if self._check is None and self.unchecked():
                self._check = self.executor().submit(self.check_model)
            return self._check

    def check_state(self) -> str | None:
        """Where the model's check against the run's fingerprint stands, starting it if
        need be (never waiting for it): ``"checking"`` (loading and comparing, on the model's
        thread, maybe behind a long job), ``"ok"`` (it is the run's model), ``"refused"``
        (it is not, or cannot be used: :meth:`model_reason` says why); None where there is
        nothing to check (no model to be had, an older run that records no fingerprint,
        a server without models)."""
        check = self.start_check()
        if check is not None and not check.done():
            return "checking"
        if not self.source.live or not self.fingerprint:
            return None
        if self._model is not None:
            return "ok"
        if check is not None or self._mismatch is not None:
            return "ok" if self.model_reason() is None else "refused"
        return None

    def _model_origin(self) -> tuple[str | None, str | None]:
        """The spec and weights the attached model was loaded from (None, None: a model
        object given from Python)."""
        if self.uses_given:
            if self.source.model_obj is not None:
                return None, None
            return self.source.spec, self.source.weights
        return self.config.get("model_spec"), self.config.get("weights")

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the model the run was probed with, as it records it (None:
        an older run, which records none)."""
        fp = self.entry.open_run().meta.get("model_fingerprint")
        return fp if isinstance(fp, str) and fp else None

    def cache_trusted(self) -> bool:
        """Whether what the model made in the run's ``cache/`` (gradients, explanations)
        was made by the run's model: its stamp names the run's fingerprint."""
        from lurker.store.files import cache_trusted

        return cache_trusted(self.entry.path, self.fingerprint)

    def claim_cache(self) -> None:
        """Before the run's model (checked) writes into the run's ``cache/``: make the
        cache its own (files of unknown origin dropped, the stamp written)."""
        from lurker.store.files import claim_cache

        claim_cache(self.entry.path, self.fingerprint)

    def unit_images(self) -> Any:
        """lurker.probe.UnitImages over this run's model and dataset."""
        model, dataset = self.model(), self.dataset()
        with self._guard:
            if self._unit_images is None:
                from lurker.probe import UnitImages
                from lurker.probe.images import MemoryImageCache

                images = UnitImages(self.entry.open_run(), model=model, dataset=dataset)
                if self.foreign_model:  # not the run's model: keep its images out of cache/
                    images.cache = MemoryImageCache()
                self._unit_images = images
            return self._unit_images

    # -- sample and unit images ------------------------------------------------------------

    def sample_file(self, sample_id: int) -> Path:
        return self.entry.path / "cache" / "samples" / f"{sample_id:08d}.png"

    def unit_file(self, kind: str, layer: str, unit: int, which: str, rank: int) -> Path:
        folder = self.entry.path / "cache" / safe_component(kind) / safe_component(layer)
        return folder / f"{unit:05d}-{safe_component(which)}-{rank:03d}.png"

    def clip_frames(self) -> int | None:
        """The frames of the run's inputs when they are video clips ``(C, D, H, W)``."""
        return clip_frames(self.config)

    def frame_file(self, sample_id: int, frame: int) -> Path:
        return self.entry.path / "cache" / "frames" / f"{sample_id:08d}-{frame:04d}.png"

    def frame_png(self, sample_id: int, path: str | None, frame: int) -> bytes | Path:
        """Frame ``frame`` of a video clip sample (the one a clip unit's entry is shown on:
        its crop is cut from it, its box drawn on it), cached."""
        frames = self.clip_frames()
        if frames is None:
            raise ApiError(404, "this run's samples are images, not video clips: no frames")
        if not 0 <= frame < frames:
            raise ApiError(
                404, f"frame {frame} is not in a clip of {frames} frames (0..{frames - 1})"
            )
        target = self.frame_file(sample_id, frame)
        if _cached(target):
            return target
        return self._make(target, lambda: self.sample_pil(sample_id, path, frame))

    def token_length(self) -> int | None:
        """The token ids per input where the run's inputs are sequences of token ids (see
        :func:`~lurker.server.state.token_length`); None for images and clips."""
        return token_length(self.entry.open_run())

    def vocab(self) -> list[str | None] | None:
        """The words of a run of token ids by id: the vocabulary given to the server for
        this run, else the one the probe stored; None without one, and for inputs that are
        not ids. Read again when the run's database changes (a probe again of a finished
        run stores a vocabulary without sweeping), else cached: a callable is not asked
        per request."""
        return self._vocab_now()[0]

    def vocab_error(self) -> str | None:
        """Why a vocabulary given for this run shows no words (it does not fit the run:
        its ids are shown instead), ``run '<id>': ...``; None when it fits or there is
        none."""
        return self._vocab_now()[1]

    def _vocab_now(self) -> tuple[list[str | None] | None, str | None]:
        if self.token_length() is None:
            return None, None
        from .state import db_signature

        # a vocabulary given to the server depends on the run's graph alone (fixed for this
        # entry): made once; the stored one is read again when the database changes
        given = self.source.vocab is not None and self.entry.id == self.source.vocab_run
        now = None if given else db_signature(self.entry.path)
        with self._guard:
            if self._vocab is not None and self._vocab[0] == now:
                return self._vocab[1], self._vocab[2]
        run = self.entry.open_run()
        words: list[str | None] | None
        error = None
        try:
            if self.source.vocab is not None and self.entry.id == self.source.vocab_run:
                words = run_vocab(run, self.source.vocab)
            else:
                words = run.meta_now("vocab")
        except LurkerError as e:
            words, error = None, f"run {self.entry.id!r}: {e}"
        with self._guard:
            self._vocab = (now, words or None, error)
        return words or None, error

    def vector_length(self) -> int | None:
        """The values per input where the run's inputs are flat vectors of numbers, not
        token ids (see :func:`~lurker.server.state.vector_length`); None otherwise."""
        return vector_length(self.entry.open_run())

    def sample_vector(self, sample_id: int, path: str | None) -> torch.Tensor:
        """Sample ``sample_id``'s feature vector in the dtype the run's trace recorded for
        the model's input (as the probe fed it), checked against the run: a vector of
        another length is a changed dataset, refused rather than fed to the model."""
        import torch

        length = self.vector_length()
        x = self._sample_tensor(
            sample_id,
            path,
            lambda t: tuple(t.shape) == (length,),
            f"a vector of {length} values",
        )
        dtype = getattr(torch, input_dtype(self.entry.open_run()) or "", None)
        x = x.detach().cpu()
        return x.to(dtype) if isinstance(dtype, torch.dtype) else x

    def cached(
        self,
        key: tuple[Any, ...],
        make: Callable[[], Any],
        keep: Callable[[Any], bool] | None = None,
    ) -> Any:
        """``make()``, kept under ``key`` (which names the run's generation, so a re-probe
        makes it again): what reads every top sample of a layer from the dataset (a layer
        tile's feature values) is read once, not on every request. The last 64 kept; a
        value ``keep`` refuses (an answer that says why the dataset cannot give them, which
        a restored dataset would change) is made again next time."""
        with self._guard:
            if key in self._made:
                self._made.move_to_end(key)
                return self._made[key]
        value = make()
        if keep is not None and not keep(value):
            return value
        with self._guard:
            self._made[key] = value
            while len(self._made) > 64:
                self._made.popitem(last=False)
        return value

    def sample_features(self, sample_id: int, path: str | None) -> list[float | None]:
        """Sample ``sample_id``'s feature values as the model is fed them (the dataset's,
        in the input dtype the trace recorded): what the pages show in place of a picture.
        A value that is not finite is ``None`` (JSON has no NaN), never a made-up number."""
        values = self.sample_vector(sample_id, path).double().tolist()
        return [v if math.isfinite(v) else None for v in values]

    def signal_shape(self) -> tuple[int, int] | None:
        """``(C, T)`` where the run's inputs are signals, channels by time (see
        :func:`~lurker.server.state.signal_shape`); None otherwise."""
        return signal_shape(self.entry.open_run())

    def sample_signal(self, sample_id: int, path: str | None) -> list[list[float | None]]:
        """Sample ``sample_id``'s signal as the model is fed it (:meth:`_signal_tensor`),
        one list of values per channel (a channels-last ``(T, C)`` sample transposed):
        what the pages draw as lines in place of a picture. A value that is not finite is
        ``None`` (JSON has no NaN), never a made-up number."""
        x = self._signal_tensor(sample_id, path)
        if self.signal_channels_last():
            x = x.t()
        x = x.reshape(self.signal_shape() or x.shape)  # a one-axis waveform: one channel
        return [[v if math.isfinite(v) else None for v in row] for row in x.double().tolist()]

    def signal_channels_last(self) -> bool:
        """Whether the run's signals are stored ``(T, C)``, channels last (see
        :func:`~lurker.server.state.signal_layout`): the model is fed them so, the pages
        are served them channels first."""
        found = signal_layout(self.entry.open_run())
        return found is not None and found[2]

    def _signal_tensor(self, sample_id: int, path: str | None) -> torch.Tensor:
        """A signal sample as the model is fed it: the dataset's, checked against the
        run's ``(C, T)`` (``(T, C)`` for a channels-last signal), in the floating dtype the
        trace recorded for the input (float32 for integer samples, which the model is fed
        as numbers)."""
        import torch

        shape = self.signal_shape()
        # as stored: (T, C) channels last, (T,) a waveform the model gives its one channel
        stored = (self.entry.open_run().meta.get("config") or {}).get("input_shape") or []
        fed = None if shape is None else tuple(int(n) for n in stored)
        what = (
            "a signal"
            if shape is None
            else f"a waveform of {shape[1]} samples"
            if signal_waveform(self.entry.open_run())
            else f"a signal of {shape[1]} samples x {shape[0]} channels (channels last)"
            if self.signal_channels_last()
            else f"a signal of {shape[0]} channels x {shape[1]} samples"
        )
        x = self._sample_tensor(
            sample_id, path, lambda t: fed is not None and tuple(t.shape) == fed, what
        )
        dtype = getattr(torch, input_dtype(self.entry.open_run()) or "", None)
        t = x.detach().cpu()
        return (
            t.to(dtype) if isinstance(dtype, torch.dtype) and dtype.is_floating_point else t.float()
        )

    def _live_signal(self, image_id: str, sid: int, path: str | None) -> torch.Tensor:
        """A signal sample kept as a live input (the values :meth:`sample_signal` serves,
        in the model's own axes), the oldest dropped past ``LIVE_IMAGES`` as uploads are."""
        t = self._signal_tensor(sid, path)
        self._keep(image_id, t)
        return t

    def sample_tokens(
        self, sample_id: int, path: str | None, first: int | None = None
    ) -> list[int]:
        """Sample ``sample_id``'s token ids (its ``first`` ones only, where given), as the
        model was fed them (the picture of a sample of a text model), checked against the
        run as :meth:`sample_pil` checks."""
        x = self._sample_tensor(
            sample_id,
            path,
            lambda t: t.dim() == 1 and not t.is_floating_point(),
            "a sequence of token ids",
        )
        return [int(v) for v in x[:first].tolist()]

    def _sample_tensor(
        self, sample_id: int, path: str | None, fits: Callable[[Any], bool], what: str
    ) -> torch.Tensor:
        """Sample ``sample_id``'s input tensor where it still ``fits`` what the run's model
        was fed (``what``); else the dataset changed since the probe, which is said."""
        import torch

        item = self._checked_dataset(sample_id, path)[sample_id]
        x = item[0] if isinstance(item, tuple) else None
        if not isinstance(x, torch.Tensor) or not fits(x):
            shown = (
                f"of shape {tuple(x.shape)} ({x.dtype})"
                if isinstance(x, torch.Tensor)
                else "unreadable"
            )
            raise ApiError(
                409,
                f"sample {sample_id} of the dataset is {shown}, not {what} as the run's model "
                "was fed: the dataset changed since the probe",
            )
        return x

    def _checked_dataset(self, sample_id: int, path: str | None) -> Any:
        """The dataset, where it still holds sample ``sample_id`` as the run recorded it."""
        ds = self.dataset()
        if not 0 <= sample_id < len(ds):
            raise ApiError(
                409,
                f"sample {sample_id} is not in the run's dataset any more ({len(ds)} items): "
                "the dataset changed since the probe",
            )
        paths = getattr(ds, "paths", None)
        if path is not None and paths is not None and paths[sample_id] != path:
            raise ApiError(
                409,
                f"the run's dataset changed since the probe: sample {sample_id} was {path}, "
                f"the dataset now has {paths[sample_id]} there",
            )
        return ds

    def sample_pil(self, sample_id: int, path: str | None, frame: int | None = None) -> Image.Image:
        """Sample ``sample_id`` as the model saw it, from the dataset; a video clip as its
        frame ``frame`` (default the middle one)."""
        from lurker.probe import data as pdata

        length = self.token_length()
        if length is not None:
            raise ApiError(
                409,
                f"sample {sample_id} is a sequence of {length} token ids, not an image: it has "
                "no picture (the unit and sample pages show its tokens, the peak's marked)",
            )
        features = self.vector_length()
        if features is not None:
            raise ApiError(
                409,
                f"sample {sample_id} is one of the run's vectors of {features} features, not "
                "an image: it has no picture (the sample page shows the model's prediction)",
            )
        ds = self._checked_dataset(sample_id, path)
        try:
            return pdata.input_image(ds, sample_id, frame)
        except LurkerError as e:
            raise ApiError(409, str(e)) from None

    def sample_png(self, sample_id: int, path: str | None) -> bytes | Path:
        """The cached sample image, made from the dataset on first request."""
        target = self.sample_file(sample_id)
        if _cached(target):
            return target
        return self._make(target, lambda: self.sample_pil(sample_id, path))

    def crop_png(
        self,
        info: LayerInfo,
        unit: int,
        rank: int,
        sample_id: int,
        y: int,
        x: int,
        path: str | None,
        which: str = "max",
    ) -> bytes | Path:
        """The receptive-field crop of an entry whose peak ``(y, x)`` the run stores (the max
        list's, and the mean list's of runs probed since): needs only the dataset."""
        from lurker.probe.images import crop
        from lurker.probe.layout import peak_frame, position_box

        target = self.unit_file("crop", info.name, unit, which, rank)
        if _cached(target):
            return target
        run = self.entry.open_run()

        def make() -> Image.Image:
            frames = self.clip_frames()
            frame = (
                None if frames is None else peak_frame(info.layout, info.shape, y, frames, info.rf)
            )
            image = self.sample_pil(sample_id, path, frame)  # a clip: the peak's frame
            size = run.meta.get("image_size") or [image.height, image.width]
            h, w = (size[-2], size[-1]) if len(size) >= 2 else (image.height, image.width)
            box = position_box(info.layout, info.rf, y, x, (h, w)) or (0, h, 0, w)
            return crop(image, box)

        return self._make(target, make)

    def _make(self, target: Path, producer: Callable[[], Image.Image]) -> bytes | Path:
        """Write ``producer()``'s PNG to the cache; in memory only if the run is read-only,
        or was probed again while it was made (it is the old run's image)."""
        from lurker.probe.images import png_bytes
        from lurker.store import atomic_write_bytes

        data = png_bytes(producer())
        if self.entry.changed():
            return data
        try:
            atomic_write_bytes(target, data, durable=False)
        except OSError:
            return data
        return target

    def model_image(self, kind: str, layer: str, unit: int, rank: int, which: str) -> bytes | Path:
        """An image only the model can make (gradients, crops of mean-list entries): a file
        of the run's cache, or PNG bytes from memory when the model is not the run's own."""
        images = self.unit_images()
        with self.model_lock:
            if self.entry.changed():  # its top lists and model are the old run's
                raise ApiError(
                    409,
                    f"run {self.entry.id!r} was probed again while this image was asked for; "
                    "reload the page to see the new run",
                )
            try:
                found = Path(images.get(kind, layer, unit, rank, which))
                if self.foreign_model:
                    return bytes(images.cache.read(found))
                return found
            except LurkerError as e:
                raise ApiError(409, f"cannot make the {kind} image: {e}") from None

    def entry_peaks(self, layer: str, unit: int, which: str) -> list[tuple[int, int]]:
        """The peaks of a unit's top-list entries, by rank (UnitImages.peaks): those the
        run does not store (an older run's mean list) are found with the model, as its crops
        are."""
        images = self.unit_images()
        with self.model_lock:
            if self.entry.changed():
                raise ApiError(
                    409,
                    f"run {self.entry.id!r} was probed again while its peaks were asked for; "
                    "reload the page to see the new run",
                )
            try:
                return [(int(y), int(x)) for y, x in images.peaks(layer, unit, which)]
            except LurkerError as e:
                raise ApiError(409, f"cannot find the peaks: {e}") from None

    # -- live ------------------------------------------------------------------------------

    def input_dtype(self) -> str:
        """The dtype the probe fed the model, as the run's graph records it (``uint8``: raw
        images in 0..255 that the model scales itself); ``float32`` without a graph."""
        return input_dtype(self.entry.open_run()) or "float32"

    def preprocess(
        self, image: Image.Image, data: bytes | None = None
    ) -> tuple[torch.Tensor, str | None, bool]:
        """An uploaded image as the run's dataset prepares its images (size, channels,
        mean/std, dtype), a note on how it was prepared otherwise, or None, and whether the
        given dataset's own transform made it: by the given
        dataset's own loader and transform when it has them (``data``: the file's bytes,
        which its loader reads), else as the probe's image folder does. Raw uint8 images
        are kept in 0..255 (as float, as a dataset sample is fed: gradients are then taken
        w.r.t. the float image the model casts to)."""
        import torch
        from torchvision.transforms import functional as TF

        from lurker.probe import data as pdata

        run = self.entry.open_run()
        shape = self.config.get("input_shape") or [3]
        if self.clip_frames() is not None:
            raise ApiError(
                409,
                f"this run's model takes video clips {tuple(shape)} (C, D, H, W), and an "
                "uploaded image is one frame: open a dataset sample's clip in the live view "
                "instead (sample-N)",
            )
        own, note = self._dataset_transform(image, data)
        if own is not None:
            return own, None, True
        dtype = self.input_dtype()
        if dtype not in ("float32", "float64", "float16", "bfloat16", "uint8"):
            raise ApiError(
                409,
                f"this run's model was fed {dtype} inputs {tuple(shape)}, which an uploaded "
                "picture cannot be made into: open a dataset sample (sample-N) instead",
            )
        if shape and int(shape[0]) not in (1, 3):
            raise ApiError(
                409,
                f"this run's model takes inputs of {int(shape[0])} channels {tuple(shape)}, "
                "and an uploaded picture has 1 (grayscale) or 3 (RGB): lurker does not know "
                "how to make the others. Serve the run with create_app(RUN, dataset=...) of "
                "an image-folder dataset whose transform makes them, or open a dataset sample",
            )
        channels = int(shape[0]) if shape else 3
        size = run.meta.get("image_size") or shape[-2:] or [224, 224]
        h, w = (int(size[-2]), int(size[-1])) if len(size) >= 2 else (int(size[0]),) * 2
        # what the probe's image-folder loader does to the same file (alpha dropped)
        image = pdata.convert_image(image, "L" if channels == 1 else "RGB")
        image = TF.resize(image, min(h, w), antialias=True)
        image = TF.center_crop(image, [h, w])
        if dtype == "uint8":  # PILToTensor's values, fed as the live view feeds samples
            return TF.pil_to_tensor(image).float(), note, False
        t = TF.to_tensor(image)
        mean = self.config.get("mean") or [0.0] * channels
        std = self.config.get("std") or [1.0] * channels
        if len(mean) != channels or len(std) != channels:
            mean, std = [0.0] * channels, [1.0] * channels
        m = torch.tensor(mean, dtype=t.dtype).reshape(-1, 1, 1)
        s = torch.tensor(std, dtype=t.dtype).reshape(-1, 1, 1)
        return self._as_fed((t - m) / s), note, False

    def _as_fed(self, t: torch.Tensor) -> torch.Tensor:
        """A float image in the floating dtype the run's graph records for the model's
        input (a float64 or float16 model refuses float32); raw uint8 images stay float32,
        so that gradients are taken w.r.t. the float image such a model casts to."""
        import torch

        dtype = getattr(torch, self.input_dtype(), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and t.dtype != dtype:
            return t.to(dtype)
        return t

    def _dataset_transform(
        self, image: Image.Image, data: bytes | None
    ) -> tuple[torch.Tensor | None, str | None]:
        """The upload as the dataset given to the server (``create_app(dataset=...)``)
        makes a file: its ``loader`` and ``transform`` (torchvision's ImageFolder and its
        kind), so that a custom resize, crop, dtype or channel count is the probe's, and a
        note, or ``(None, note)``. Only a file dataset's (a callable ``loader``, the bytes at
        hand) is used: a dataset of in-memory images (CIFAR10, FakeData) has no resize for
        a picture of another size. A random transform (augmentation) is not used either,
        so that the same upload always gets the same answer; the note says so."""
        import tempfile

        import torch
        from PIL import Image

        from lurker.probe import data as pdata

        ds = self.source.dataset
        if isinstance(ds, pdata.WrappedDataset):
            ds = ds.dataset
        transform = getattr(ds, "transform", None)
        loader = getattr(ds, "loader", None)
        if ds is None or not callable(transform) or not callable(loader) or data is None:
            return None, None
        if isinstance(ds, pdata.ImageFolderDataset):
            return None, None  # lurker's own folder: the path below is exactly its loader's
        with tempfile.TemporaryDirectory() as tmp:
            # a suffix as the file's own (loaders check it, as torchvision's is_image_file)
            path = Path(tmp) / f"upload{_suffix(data)}"
            path.write_bytes(data)
            try:
                first = _seeded(lambda: transform(loader(str(path))), 1)
                second = _seeded(lambda: transform(loader(str(path))), 2)
            except Exception as e:
                msg = str(e).replace(str(path), "the upload").replace(tmp, "")
                raise ApiError(
                    422,
                    f"the dataset's own loader and transform failed on this image "
                    f"({type(e).__name__}: {msg})",
                ) from None
        if not _same(first, second):
            return None, (
                "the dataset's transform is random (augmentation): the image was resized and "
                "center-cropped instead, so that it gets the same answer each time"
            )
        t = pdata.pil_to_tensor(first) if isinstance(first, Image.Image) else first
        shape = [int(v) for v in self.config.get("input_shape") or []]
        if not isinstance(t, torch.Tensor) or (shape and list(t.shape) != shape):
            what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ApiError(
                422,
                f"the dataset's transform made {what} of this image, not an input shaped "
                f"{tuple(shape)} as the run's: the model cannot take it",
            )
        return self._as_fed(t.detach().cpu().float()), None

    def add_upload(self, data: bytes, image: Image.Image, name: str | None = None) -> str:
        """Keep an uploaded image; its id is the sha256 prefix of the file. ``name``: the
        file's name as uploaded (the same file uploaded again under another name takes it)."""
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with self._guard:
            if image_id in self._images:
                self._images.move_to_end(image_id)
                if name:
                    self._upload_names[image_id] = name
                return image_id
        from lurker.probe import data as pdata

        try:
            t, transform_note, by_dataset = self.preprocess(image, data)
            notes = [n for n in (pdata.transparency_note(image), transform_note) if n]
            note = "; ".join(notes) if notes else None
            prepared = prepared_line(image, t, by_dataset)
        except ApiError:
            raise
        except Exception as e:  # an image Pillow opened but cannot convert (odd modes)
            raise ApiError(
                400, f"cannot prepare this image for the model ({type(e).__name__}: {e})"
            ) from None
        with self._guard:
            self._images[image_id] = t
            if name:
                self._upload_names[image_id] = name
            if note is not None:
                self._upload_notes[image_id] = note
            self._upload_prepared[image_id] = prepared
            while len(self._images) > LIVE_IMAGES:
                old, _ = self._images.popitem(last=False)
                self._drop_maps(old)
        return image_id

    def add_input(self, t: torch.Tensor) -> str:
        """Keep an input typed in the live view (token ids, a feature vector), fed as it
        is; its id is the sha256 prefix of its dtype, shape and values, so the same input
        typed again is the same id (and the live endpoints read it as they read uploads)."""
        t = t.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
        input_id = digest.hexdigest()[:16]
        self._keep(input_id, t)
        return input_id

    def _keep(self, input_id: str, t: torch.Tensor) -> None:
        """Keep a live input as the newest, dropping the oldest (and their maps) past
        ``LIVE_IMAGES``: every kind of live input is bounded alike."""
        with self._guard:
            self._images[input_id] = t
            self._images.move_to_end(input_id)
            while len(self._images) > LIVE_IMAGES:
                old, _ = self._images.popitem(last=False)
                self._drop_maps(old)

    def layer_units(self, input_id: str) -> list[tuple[Any, Any, Any, int, Any]]:
        """Every probed layer's units on one live input, in one forward: ``(layer info,
        mean, max, positions, peak)``, mean and max ``(units,)``, over the unit's positions
        (its tokens) as the probe reduces them for its mean and max top-k lists; ``peak``
        ``(units,)`` the position of each max (the first where it ties, -1 for a unit equal
        at every position; None for a layer
        with no positions, which has one value per unit, mean and max equal), so the page
        can say which token a unit fires on. A layer whose op the live trace lacks is left
        out."""
        import torch

        tr = self.trace()
        model = self.model()
        x = self.live_input(input_id)
        index = {op.label: op.index for op in tr.ops}
        infos = [i for i in self.entry.open_run().layers if i.op in index]
        wanted: dict[int, Any] = {index[i.op]: None for i in infos}

        def grab(node: Any, value: Any) -> None:
            wanted[node.index] = _first_tensor(_detach(value))

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with self.model_lock, torch.no_grad():
            try:
                tr.run(x.unsqueeze(0).to(device), save="none", hooks={i: grab for i in wanted})
            except GraphChangedError as e:
                raise ApiError(409, f"the model takes another path on this input: {e}") from None
            except Exception as e:  # the model's own error (a sequence too long for it)
                raise model_failed("the model", e) from None
        out = []
        for info in infos:
            v = wanted[index[info.op]]
            op = tr.ops[index[info.op]]
            layout = self.layout(op)
            if not isinstance(v, torch.Tensor) or not hasattr(layout, "units"):
                continue
            u = layout.units(v.to("cpu", torch.float64))[0]  # (units, *positions)
            flat = u.dim() == 1
            u = u.reshape(u.shape[0], -1)
            # the first of equal maxima; -1 for a unit equal at every position (a dead
            # ReLU's zeros): it peaks nowhere, and position 0 would say a token it fires on
            peak = None if flat else torch.where(u.amax(1) > u.amin(1), u.argmax(1), -1)
            out.append((info, u.mean(1), u.amax(1), int(u.shape[1]), peak))
        return out

    def upload_name(self, image_id: str) -> str | None:
        """The uploaded file's name (its base name, as the browser sent it), or None."""
        with self._guard:
            return self._upload_names.get(image_id)

    def upload_note(self, image_id: str) -> str | None:
        """How an uploaded image was changed to prepare it (its transparency dropped), or
        None."""
        with self._guard:
            return self._upload_notes.get(image_id)

    def upload_prepared(self, image_id: str) -> str | None:
        """What preparing an upload did to it, in one line (:func:`prepared_line`), or
        None (a dataset sample, or an id this server does not hold)."""
        with self._guard:
            return self._upload_prepared.get(image_id)

    def live_input(self, image_id: str) -> torch.Tensor:
        """The preprocessed input of an uploaded image or of ``sample-N``."""
        with self._guard:
            t = self._images.get(image_id)
            if t is not None:
                self._images.move_to_end(image_id)
                return t
        if image_id.startswith("sample-") and image_id[7:].isdigit():
            sid = int(image_id[7:])
            _, path, _, _ = self.entry.sample_row(sid)
            if self.vector_length() is not None:  # no picture: fed as the dataset gives it
                return self.sample_vector(sid, path)
            if self.signal_shape() is not None:  # a signal (C, T): as sample_signal checks it
                return self._live_signal(image_id, sid, path)
            ds = self.dataset()
            if self.token_length() is None:
                self.sample_pil(sid, path)  # checks that the dataset still matches the run
            else:
                self.sample_tokens(sid, path)  # the same check, for token ids
            item = ds[sid]
            t = item[0].detach().cpu()
            # token ids stay integers (an embedding takes no floats); images are fed as float
            t = t if self.token_length() is not None else self._as_fed(t.float())
            self._keep(image_id, t)
            return t
        raise ApiError(
            404,
            f"no live image {image_id!r} in run {self.entry.id!r}: upload it (POST "
            "/api/runs/RUN/live/images) or name a dataset sample as sample-N; uploads are "
            f"kept while the server runs (the last {LIVE_IMAGES})",
        )

    def input_pil(self, image_id: str) -> Image.Image:
        from lurker.probe import data as pdata

        t = self.live_input(image_id)
        if self.input_dtype() == "uint8":  # raw 0..255 values: the picture is t / 255
            t = t / 255.0
        if not pdata.is_clip(t) and (t.dim() != 3 or t.shape[0] not in (1, 3)):
            raise ApiError(
                409,
                f"{image_id} is fed as a tensor of shape {tuple(t.shape)}, not an image with "
                "1 or 3 channels: it has no picture to show",
            )
        mean = self.config.get("mean") or [0.0] * t.shape[0]
        std = self.config.get("std") or [1.0] * t.shape[0]
        if len(mean) != t.shape[0]:
            mean, std = [0.0] * t.shape[0], [1.0] * t.shape[0]
        # a video clip as its middle frame, as its sample image
        return pdata.to_pil(pdata.denormalize(pdata.clip_frame(t), mean, std))

    def predictions(
        self, x: torch.Tensor, top: int = 5, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Top-``top`` classes of the model's output for one input, with their probabilities
        (:func:`lurker.models.probabilities`: the softmax of logits, or the model's own).
        On a language model's ``(1, L, V)`` the next token's at the last position, or at
        ``last`` where the sequence was padded after it (Live's typed input: the padding's
        scores would predict what follows a pad token, not the typed text)."""
        import torch

        model = self.model()
        with self.model_lock:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            try:
                with torch.no_grad():
                    out = model(x.unsqueeze(0).to(device))
            except Exception as e:  # the model's own error, said in one line
                raise model_failed("the model", e) from None
        logits = _first_tensor(out)
        position: int | None = None
        if logits is not None and self._next_token_scores(x, logits):
            # a language model's (1, L, V): a score per vocabulary entry at each position;
            # the prediction is the next token's, at the last position (the last typed
            # one where the server padded the input after it)
            position = int(logits.shape[1]) - 1
            if last is not None and 0 <= last < position:
                position = last
            logits = logits[:, position]
        if logits is None or logits.dim() != 2 or logits.shape[0] != 1:
            return []
        from lurker.models import probabilities

        probs = probabilities(logits.detach()[0].cpu(), 0)  # a final softmax's: its own
        scores = logits.detach().float()[0].cpu()
        # ranked by the logits: tiny logits (a random-init head) give a softmax that is
        # uniform in float32, whose order says nothing
        idx = scores.topk(min(top, scores.numel())).indices
        run = self.entry.open_run()
        if position is None:
            names: list[str | None] = list(class_names(run, scores.numel()))
        else:  # next tokens are named by the vocabulary (the dataset's classes else)
            names = list(self.vocab() or class_names(run, scores.numel()))
        layer = None if position is None else self.scores_layer()
        return [
            {
                "class": int(i),
                "name": names[i] if i < len(names) else None,
                "prob": float(probs[i]),
                "position": position,
                # the Explain page's target for this next token: its score at that position
                "target": None if layer is None else f"{layer}:{int(i)}:0:{position}",
            }
            for i in idx.tolist()
        ]

    def scores_layer(self) -> str | None:
        """The layer that makes the model's (first) output, as a unit target names it: the
        run's probed layer of that op, else its module path (a language model's ``head``),
        else its trace label; None where the run records no graph."""
        run = self.entry.open_run()
        graph = run.graph
        if graph is None:
            return None
        out = next((op for op in graph.ops if op.kind == "output" and op.parents), None)
        if out is None:
            return None
        op = graph.ops[out.parents[0]]
        probed = next((i.name for i in run.layers if i.op == op.label), None)
        if probed is not None:
            return probed
        if op.module and op.module in op.module_outputs:
            return op.module
        return op.label

    def _next_token_scores(self, x: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether ``logits`` are a language model's for the token ids ``x``: ``(1, L, V)``,
        one row of scores per id fed, on a run of token ids."""
        from .state import token_length

        return (
            logits.dim() == 3
            and logits.shape[0] == 1
            and x.dim() == 1
            and not x.is_floating_point()
            and logits.shape[1] == x.shape[0]
            and token_length(self.entry.open_run()) is not None
        )

    def example_input(self, model: Any) -> torch.Tensor:
        """A batch of one zero input shaped like the run's, on the model's device: what
        the model is traced on (token ids as ids: zero is a valid id; else float32)."""
        import torch

        run = self.entry.open_run()
        shape = self.config.get("input_shape")
        if not shape:
            shape = [3, *(run.meta.get("image_size") or [224, 224])]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = getattr(torch, self.input_dtype(), None)
        if (
            not isinstance(dtype, torch.dtype)
            or dtype.is_floating_point
            or dtype in (torch.uint8, torch.bool)
        ):
            dtype = torch.float32
        return torch.zeros(1, *[int(s) for s in shape], device=device, dtype=dtype)

    def trace(self) -> Trace:
        """The live model's trace (made once, on an input shaped like the run's)."""
        import torch

        from lurker.capture import settled_trace

        model = self.model()
        with self.model_lock:
            if self._trace is None:
                x0 = self.example_input(model)
                try:
                    with torch.no_grad():
                        self._trace = settled_trace(model, x0)
                except LurkerError as e:
                    raise ApiError(409, f"cannot trace the model: {e}") from None
            return self._trace

    def op(self, label: str) -> Any:
        """An op of the live trace by label (404 listing labels)."""
        tr = self.trace()
        try:
            return tr[label]
        except KeyError:
            raise ApiError(
                404,
                f"no op {label!r} in the model's trace; ops: "
                + listing([op.label for op in tr.ops]),
            ) from None

    def op_maps(self, image_id: str, label: str) -> tuple[Any, Maps | None, Maps]:
        """``(op, input maps or None, output maps)`` of an op for one image, one map per
        unit (see :func:`as_maps`), cached per (image, op)."""
        op = self.op(label)
        key = (image_id, op.index)
        with self._guard:
            hit = self._maps.get(key)
            if hit is not None:
                self._maps.move_to_end(key)
                return op, hit[0], hit[1]
        x = self.live_input(image_id)
        inp, out = self._compute(op, x)
        in_layout, out_layout = self._side_layouts(op)
        from_input, to_input = self._input_sides(op)
        pair = (
            None if inp is None else self._signal_maps(inp, from_input) or as_maps(inp, in_layout),
            self._signal_maps(out, to_input) or as_maps(out, out_layout),
        )
        with self._guard:
            self._maps[key] = pair
            self._map_bytes += sum(m.maps.numel() * 4 for m in pair if m is not None)
            while self._map_bytes > MAP_BUDGET and len(self._maps) > 1:
                _, old = self._maps.popitem(last=False)
                self._map_bytes -= sum(m.maps.numel() * 4 for m in old if m is not None)
        return op, pair[0], pair[1]

    def _drop_maps(self, image_id: str) -> None:
        self._upload_notes.pop(image_id, None)
        self._upload_prepared.pop(image_id, None)
        self._upload_names.pop(image_id, None)
        for key in [k for k in self._maps if k[0] == image_id]:
            old = self._maps.pop(key)
            self._map_bytes -= sum(m.maps.numel() * 4 for m in old if m is not None)

    def _input_sides(self, op: Any) -> tuple[bool, bool]:
        """Whether an op's input, and its output, holds the model input's channels one to
        one (see :meth:`keeps_input`): the producer of its first tensor argument, and the
        op itself."""
        from lurker.graph.nodes import OpRef, refs

        ref = next((r for r in refs(op) if isinstance(r, OpRef)), None)
        producer = self.trace().ops[ref.index] if ref is not None else None
        return producer is not None and self.keeps_input(producer), self.keeps_input(op)

    def keeps_input(self, op: Any) -> bool:
        """Whether the output of ``op`` is the model's input, channel by channel and step by
        step: the input node itself, or an op of the catalogue's elementwise ones (a
        dropout, ``x * 0.5``, ``x - mean``, an activation, a ``contiguous``, a per-channel
        norm) whose output has the input's shape, one of whose tensor arguments is such an
        output and whose others read nothing of the input (parameters, buffers, constants)
        or are such outputs too. A conv, a transpose, a reduction, a permutation of the
        channels or a mix with another tensor made from the input is not: its units are not
        the dataset's channels (naming them so would be wrong, not merely vague)."""
        tr = self.trace()
        return self.cached(
            ("keeps-input", self.entry.generation, id(tr)),
            lambda: _keeps_input(tr, self.signal_channels_last()),
        ).get(op.index, False)

    def _signal_maps(self, t: Any, model_input: bool) -> Maps | None:
        """The model's input on a signal run as one map per channel over time, whatever
        order its axes come in: a channels-last ``(1, T, C)`` batch is C lanes (read as
        stored it would be T maps of C values), a raw waveform's ``(1, T)`` one (read as
        stored: one vector). None for any other tensor: the ordinary maps."""
        found = signal_layout(self.entry.open_run()) if model_input else None
        if found is None:
            return None
        import torch

        channels, length, last = found
        shape = list(t.shape)
        v = t.detach().to("cpu", torch.float32)
        if shape == [1, length] and signal_waveform(self.entry.open_run()):  # one channel
            return Maps(shape, v.reshape(1, 1, length).contiguous(), None)
        if last and shape == [1, length, channels]:
            return Maps(shape, v[0].T.reshape(channels, 1, length).contiguous(), 2)
        return None

    def _side_layouts(self, op: Any) -> tuple[Any, Any]:
        """The layouts that tell the units of an op's input and output (see
        :meth:`layout`): the input is its first tensor argument, a producer's output; a
        convolution's input is read as the convolution reads it, channels on axis 1, so
        that its maps pair with the kernel's input channels. The model's output node's
        input and output are both the tensor it returns (its producer's output)."""
        from lurker.graph.nodes import OpRef, refs

        tr = self.trace()
        ref = next((r for r in refs(op) if isinstance(r, OpRef)), None)
        producer = tr.ops[ref.index] if ref is not None else None
        if op.kind == "output":  # the model's output: its producer's output, on both sides
            lay = self.layout(producer, ref.output) if producer is not None else None  # type: ignore[union-attr]
            return lay, lay
        conv = self.conv_kernel(op) is not None
        inp = None if producer is None or conv else self.layout(producer, ref.output)  # type: ignore[union-attr]
        return inp, self.layout(op, 0)

    def layout(self, op: Any, output: int = 0) -> Any:
        """Which axis of an op's output holds its units, and which its positions: a probed
        layer's layout as the run stores it (with the user's ``unit_dim``), else the one
        :func:`lurker.probe.layout.infer_layouts` finds, worked out once for every op
        (two extra forwards). A ``Skip`` where lurker cannot tell (an op's second output
        among them); None for values with no layout to find (the model's inputs, buffers)."""
        from lurker.probe.layout import Skip

        if op.kind != "op":
            return None
        if output != 0:
            return Skip(
                f"it is output {output} of {op.label}, and lurker finds the layout of an op's "
                "first output only"
            )
        tr = self.trace()
        with self.model_lock:
            if self._layouts is None:
                self._layouts = self._find_layouts(tr)
        return self._layouts.get(op.index)

    def _find_layouts(self, tr: Trace) -> dict[int, Any]:
        import torch

        from lurker.probe.layout import Layout, Skip, cached_layouts

        try:
            with torch.no_grad():
                found: dict[int, Any] = dict(cached_layouts(tr))
        except LurkerError as e:
            found = {op.index: Skip(str(e)) for op in tr.ops if op.kind == "op"}
        index = {op.label: op.index for op in tr.ops}
        for info in self.entry.open_run().layers:
            if info.layout and info.op in index:
                found[index[info.op]] = Layout.from_dict(info.layout)
        return found

    def _compute(self, op: Any, x: torch.Tensor) -> tuple[Any, Any]:
        """The op's input (its first tensor argument's value) and output on ``x``."""
        from lurker.graph.nodes import OpRef, refs

        tr = self.trace()
        producer_ref = next((r for r in refs(op) if isinstance(r, OpRef)), None)
        target = op
        if op.kind == "output" and producer_ref is not None:
            target = tr.ops[producer_ref.index]
        producer = tr.ops[producer_ref.index] if producer_ref is not None else None
        wanted = [target] if producer is None or op.kind == "output" else [target, producer]
        value = self._live_values(x, wanted)
        out = value(target, producer_ref.output if target is not op and producer_ref else 0)
        if out is None:
            raise ApiError(
                404,
                f"op {op.label!r} ({op.kind}) has no tensor value per image to show",
            )
        inp = None
        if op.kind == "output":  # the model returns its producer's output as it is
            inp = out
        elif producer is not None and producer_ref is not None:
            inp = value(producer, producer_ref.output)
        return inp, out

    def _live_values(self, x: torch.Tensor, nodes: list[Any]) -> Callable[[Any, int], Any]:
        """Run the model on ``x`` as far as the last of ``nodes`` (a partial forward: the
        rest is not needed) and return ``value(node, output)``: that output's tensor on
        ``x`` for a node of ``nodes``, the model's input, a buffer, or what the trace kept
        of a node the replay does not run again; None where there is no tensor."""
        import torch

        tr = self.trace()
        model = self.model()
        wanted: dict[int, Any] = {n.index: None for n in nodes if n.seq >= 0}
        last = max(wanted, default=-1)

        class _Done(Exception):
            pass

        def grab(node: Any, value: Any) -> None:
            wanted[node.index] = _detach(value)
            if node.index == last and all(v is not None for v in wanted.values()):
                raise _Done

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        xb = x.unsqueeze(0).to(device)
        if wanted:
            with self.model_lock, torch.no_grad():
                try:
                    tr.run(xb, save="none", hooks={i: grab for i in wanted})
                except _Done:  # every value wanted is in: the rest of the forward is not needed
                    pass
                except GraphChangedError as e:
                    raise ApiError(
                        409, f"the model takes another path on this image: {e}"
                    ) from None
                except Exception as e:  # (a LurkerError: inputs unlike the traced ones)
                    raise model_failed("the model", e) from None

        def value(node: Any, output: int) -> Any:
            if node.kind == "input":
                pos = [n.index for n in tr.inputs].index(node.index)
                return xb if pos == 0 else None
            if node.index in wanted:
                v = wanted[node.index]
            elif node.kind == "buffer":
                v = dict(model.named_buffers()).get(node.name)
            else:
                v = node.activation
            if isinstance(v, (tuple, list)):
                v = v[output] if output < len(v) else None
            return v if isinstance(v, torch.Tensor) else None

        return value

    def op_output(self, image_id: str, op: Any, output: int = 0) -> Any:
        """Output ``output`` of ``op`` on one input, as the model computes it (None where
        the live run gives no tensor)."""
        return self._live_values(self.live_input(image_id), [op])(op, output)

    def call_values(self, image_id: str, op: Any) -> tuple[dict[str, Any], list[str]]:
        """The op's call on one image, its arguments bound by name with the op catalogue
        (``bind``: never by position), each tensor argument its value on this image (an
        op's output, a parameter or buffer of the model); and the names of the arguments
        whose value the live run cannot give (a tensor the replay neither runs nor keeps),
        which stay None. KeyError for an op the catalogue does not know."""
        from lurker.graph.nodes import OpRef, ParamRef, refs
        from lurker.ops.catalogue import bind

        call = bind(op.name, op.args or (), op.kwargs or {}, getattr(op, "target", None))
        tr = self.trace()
        value = self._live_values(
            self.live_input(image_id),
            [tr.ops[r.index] for r in refs(op) if isinstance(r, OpRef)],
        )
        model = self.model()
        missing: list[str] = []

        def live(name: str, a: Any) -> Any:
            if isinstance(a, OpRef):
                v = value(tr.ops[a.index], a.output)
            elif isinstance(a, ParamRef):
                v = dict(model.named_parameters()).get(a.name)
                v = dict(model.named_buffers()).get(a.name) if v is None else v
                v = None if v is None else v.detach()
            elif isinstance(a, (tuple, list)):
                return type(a)(live(name, b) for b in a)
            else:
                return a
            if v is None and name not in missing:
                missing.append(name)
            return v

        return {name: live(name, a) for name, a in call.items()}, missing

    def conv_kernel(self, op: Any) -> ConvKernel | None:
        """The op's convolution kernel: for a convolution (``conv1d`` .. ``conv3d``,
        ``conv_transpose1d`` .. ``3d``, ``convolution``) whose weight argument is a
        parameter of the model, that weight with the call's ``groups`` and whether it is
        transposed, as the trace recorded the call; None for any other op (a parameter of
        rank >= 3 used otherwise, a ViT's position embedding, is no kernel)."""
        call = conv_call(op)
        if call is None:
            return None
        name, groups, transposed = call
        param = dict(self.model().named_parameters()).get(name)
        if param is None or param.dim() < 3:
            return None
        k = ConvKernel(name, param, groups, transposed)
        return k if k.valid() else None


#: Convolutions by function name: transposed or not (None: the call's ``transposed``).
_CONVS: dict[str, bool | None] = {
    **{f"conv{d}d": False for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": True for d in (1, 2, 3)},
    "convolution": None,
    "_convolution": None,
}


def conv_call(op: Any) -> tuple[str, int, bool] | None:
    """``(weight parameter name, groups, transposed)`` of a convolution op's call as the
    trace recorded it (its arguments bound by name with the op catalogue); None for any
    other op, or a convolution whose weight is not a parameter (one computed by the
    model)."""
    from lurker.graph.nodes import ParamRef
    from lurker.ops.catalogue import bind

    if op.kind != "op" or op.name not in _CONVS:
        return None
    try:
        call = bind(op.name, op.args or (), op.kwargs or {})
    except (KeyError, TypeError):
        return None
    weight, groups = call.get("weight"), call.get("groups", 1)
    transposed = _CONVS[op.name]
    if transposed is None:
        transposed = bool(call.get("transposed", False))
    if type(weight) is not ParamRef:
        return None
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        return None
    return weight.name, groups, transposed


@dataclass(frozen=True)
class ConvKernel:
    """A convolution's weight and which of its input channels feed which output channels.

    The weight is ``[out, in / groups, *kernel]`` (``[in, out / groups, *kernel]`` for a
    transposed convolution); with ``groups`` G, the channels split into G groups in order,
    and input ``i`` feeds output ``o`` only when both are in the same group, through the
    weight of ``o`` and ``i``'s place within the group.
    """

    param: str
    weight: Any
    groups: int
    transposed: bool

    @property
    def in_channels(self) -> int:
        w = self.weight.shape
        return int(w[0]) if self.transposed else int(w[1]) * self.groups

    @property
    def out_channels(self) -> int:
        w = self.weight.shape
        return int(w[1]) * self.groups if self.transposed else int(w[0])

    def valid(self) -> bool:
        return self.in_channels % self.groups == 0 and self.out_channels % self.groups == 0

    def group_of_output(self, out: int) -> int:
        return out // (self.out_channels // self.groups)

    def inputs_of(self, out: int) -> range:
        """The input channels that feed output ``out``."""
        per = self.in_channels // self.groups
        g = self.group_of_output(out)
        return range(g * per, (g + 1) * per)

    def index(self, out: int, inp: int) -> tuple[int, int] | None:
        """Where in the weight the kernel from input ``inp`` to output ``out`` is; None
        when ``inp`` does not feed ``out`` (another group)."""
        if inp not in self.inputs_of(out):
            return None
        g = self.group_of_output(out)
        if self.transposed:
            return inp, out - g * (self.out_channels // self.groups)
        return out, inp - g * (self.in_channels // self.groups)


#: Pillow's modes as a teacher would name them (others are named by their mode).
_MODE_WORDS = {
    "1": "black and white",
    "L": "grayscale",
    "LA": "grayscale with transparency",
    "I": "grayscale (32-bit)",
    "I;16": "grayscale (16-bit)",
    "F": "grayscale (float)",
    "P": "colour (palette)",
    "PA": "colour (palette) with transparency",
    "RGB": "colour (RGB)",
    "RGBA": "colour (RGB) with transparency",
    "CMYK": "colour (CMYK)",
    "YCbCr": "colour (YCbCr)",
}


def prepared_line(image: Image.Image, t: torch.Tensor, by_dataset: bool) -> str:
    """One sentence on what preparing an upload did to it: its size and colours as
    uploaded, and the model's input they became (``t``, ``(C, H, W)``), so that a viewer of
    a 16x16 grey thumbnail knows it is the 512x512 colour photo they sent, as the model saw
    it. ``by_dataset``: the given dataset's own loader and transform made ``t``."""
    from lurker.probe import data as pdata

    w, h, mode = image.width, image.height, image.mode
    was = f"{w}x{h}, {_MODE_WORDS.get(mode, mode)}"
    c = int(t.shape[0]) if t.dim() >= 3 else 1
    ih, iw = int(t.shape[-2]), int(t.shape[-1])
    channels = {1: "grayscale (1 channel)", 3: "colour (3 channels)"}.get(c, f"{c} channels")
    now = f"{iw}x{ih}, {channels}"
    if by_dataset:
        return f"Uploaded {was} → the model's input {now}, by the dataset's own transform."
    steps = []
    # the short side is resized to the input's, then the centre cut to its shape: an
    # upload whose short side is the input's already is cropped, not resized
    short_in, short_out = min(w, h), min(iw, ih)
    if short_out != short_in:
        steps.append("enlarged" if short_out > short_in else "shrunk")
    if w * ih != h * iw:
        steps.append("centre-cropped")
    grey = mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16")
    if c == 1 and not grey:
        steps.append("converted to grayscale")
    elif c == 3 and grey:
        steps.append("copied to 3 colour channels")
    elif c == 3 and mode not in ("RGB", "RGBA", "P", "PA"):
        steps.append(f"converted from {mode} to RGB")
    if pdata.has_transparency(image):  # an alpha channel, or a palette's transparent entry
        steps.append("transparency dropped")
    if not steps:
        return f"Uploaded {was}: the model's input as it is, not resized."
    done = ", ".join(steps[:-1]) + (" and " if len(steps) > 1 else "") + steps[-1]
    return f"Uploaded {was} → the model's input {now}: {done}."


def _suffix(data: bytes) -> str:
    """The file suffix of an uploaded file's image format (``.png``, ``.jpg``), for a
    loader that checks it; ``""`` for a format Pillow cannot name or names no suffix for."""
    from PIL import Image

    common = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt = im.format or ""
    except Exception:
        return ""
    if fmt in common:
        return common[fmt]
    return next((ext for ext, f in Image.registered_extensions().items() if f == fmt), "")


#: the process's random generators are global: one seeded call at a time, so that two
#: uploads (to two runs' sessions) neither restore each other's states nor reseed mid-call
_RNG_LOCK = threading.Lock()


def _seeded(make: Callable[[], Any], seed: int) -> Any:
    """``make()`` with torch's, Python's and numpy's random generators seeded by ``seed``,
    each restored after: two seeds giving different results show a random transform."""
    import random

    import torch

    with _RNG_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                return make()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _same(a: Any, b: Any) -> bool:
    """Whether two transform results are the same (tensors by value, PIL images by pixels)."""
    import torch
    from PIL import Image

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():  # a NaN the transform makes twice is the same result
            return bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()
    return type(a) is type(b)


def _cached(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return getattr(out, "logits", None)


def _detach(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return tuple(_detach(v) for v in value)
    return value


@dataclass(frozen=True)
class Maps:
    """A tensor of one image as one 2-D map per unit (float32, CPU)."""

    shape: list[int]  # the whole tensor's, batch axis included
    maps: Any  # (units, h, w)
    #: the axis of ``shape`` the maps index; None where lurker cannot tell the unit axis
    unit_axis: int | None
    #: how the maps are laid out, where it is not plain (tokens on their patch grid, the
    #: unit axis unknown)
    note: str | None = None
    #: maps of one value each, shown as one vector: its index i is map (channel) i
    one_value_maps: bool = False
    #: the tokens with no patch (a ViT's class token) of maps on a patch grid, left out
    #: of the maps: ``(token, values)``, its value at every unit (``(units,)``)
    patchless: tuple[tuple[int, Any], ...] = ()


def as_maps(t: Any, layout: Any = None) -> Maps:
    """One image's tensor as one 2-D map per unit.

    ``layout`` (a probe ``Layout``) says which axes are the batch, the units and the
    positions: the maps are the positions of each unit, tokens that stand for image
    patches placed on the patch grid (a token with no patch, a class token, left out and
    said so). Without one (the model's input, or a ``Skip``: lurker cannot tell), the
    tensor is read as stored: a leading batch axis of size 1 is dropped; then rank 0 ->
    one 1x1 map, rank 1 (a vector) -> one 1xN map, rank 2 (C, L) -> C maps of 1xL, rank
    3 (C, H, W) -> C maps of HxW, higher ranks (C, H, ...) -> C maps of H x (the rest
    flattened); a ``Skip`` adds its reason to the note. Maps of one value each (a global
    pool's ``(1, C, 1, 1)``), whatever the layout, are one vector of C values instead:
    each map is scaled to its own range, so C flat squares would show nothing.
    """
    import torch

    from lurker.probe.layout import UNIT_DIM_HINT, Layout

    shape = list(t.shape)
    v = t.detach()
    if v.is_complex():
        v = v.abs()
    v = v.to("cpu", torch.float32)
    if isinstance(layout, Layout) and v.dim() == len(shape) and shape[layout.batch] == 1:
        return _unit_maps(shape, v, layout)
    axis = 1 if v.dim() >= 2 and v.shape[0] == 1 else 0
    if v.dim() >= 1 and v.shape[0] == 1:
        v = v[0]
    reason = getattr(layout, "reason", None)  # a Skip
    if reason:
        # the probe's advice to name the axis (``--unit-dim``) is no option of this view
        reason = reason.removesuffix(UNIT_DIM_HINT)
        reason = f"{reason[:1].upper()}{reason[1:]}. Shown as stored: "
    one = _one_value_maps(shape, v, reason)
    if one is not None:
        return one
    if v.dim() == 0:
        m = v.reshape(1, 1, 1)
    elif v.dim() == 1:
        m = v.reshape(1, 1, -1)
    elif v.dim() == 2:
        m = v.reshape(v.shape[0], 1, v.shape[1])
    else:
        m = v.reshape(v.shape[0], v.shape[1], -1)
    note = f"{reason}{_as_stored(v, axis)}." if reason else None
    per_index = v.dim() >= 2 and not reason  # else one map, or the axis is unknown
    return Maps(shape, m.contiguous(), axis if per_index else None, note)


def _one_value_maps(shape: list[int], u: Any, reason: str | None = None) -> Maps | None:
    """``u`` ``(C, 1, ...)``, C maps of one position each (a global pool's output), as one
    vector of C values: each map is scaled to its own range, so C one-value maps would be
    flat squares. None where ``u`` is not that. ``reason``: a skip's, opening the note."""
    if u.dim() < 2 or u.shape[0] < 2 or u[0].numel() != 1:
        return None
    positions = u.shape[1:]
    size = "x".join(map(str, positions)) if len(positions) > 1 else f"length {positions[0]}"
    note = _ONE_POSITION.format(n=u.shape[0], size=size)
    note = f"{reason}{note}." if reason else note
    return Maps(shape, u.reshape(1, 1, -1).contiguous(), None, note, one_value_maps=True)


def _as_stored(v: Any, axis: int) -> str:
    """What the maps of ``v`` (batch axis dropped, its axis ``axis`` of the whole tensor
    first) read as stored are, in words."""
    if v.dim() == 0:
        return "its one value"
    if v.dim() == 1:
        n = v.shape[0]
        return f"its {n} value{'s' if n != 1 else ''} in order, one vector (a single 1x{n} map)"
    each = "1x" + str(v.shape[1]) if v.dim() == 2 else f"{v.shape[1]}x{v[0, 0].numel()}"
    rest = " (the axes after the next one flattened)" if v.dim() > 3 else ""
    return f"one map per index of axis {axis} ({v.shape[0]} maps of {each}{rest})"


def _unit_maps(shape: list[int], v: Any, layout: Any) -> Maps:
    """The maps of a tensor whose layout is known: ``(units, h, w)``."""
    u = layout.units(v)[0]  # (C, *positions), at most two positions
    note = None
    if u.dim() == 1:  # one value per unit: 1x1 maps would each be a flat square
        return Maps(shape, u.reshape(1, 1, -1).contiguous(), None, _ONE_VALUE.format(n=u.numel()))
    one = _one_value_maps(shape, u)
    if one is not None:
        return one
    if u.dim() == 2 and (grid := layout.patch_grid()):
        order, rows, cols, left = grid
        m = u[:, order].reshape(u.shape[0], rows, cols)
        what = f"token{'s' if len(left) > 1 else ''} {', '.join(map(str, left))}" if left else ""
        note = f"tokens placed on their {rows}x{cols} grid of image patches" + (
            f"; {what} (no patch: {'a class token' if len(left) == 1 else 'class or register tokens'})"
            " shown apart, one value per unit"
            if left
            else ""
        )
        apart = tuple((int(i), u[:, i].contiguous()) for i in left)
        return Maps(shape, m.contiguous(), layout.unit, note, patchless=apart)
    elif u.dim() == 2:
        m = u.reshape(u.shape[0], 1, -1)
    else:
        m = u
    return Maps(shape, m.contiguous(), layout.unit, note)


_ONE_VALUE = "its {n} units have one value each (no positions): one vector, a single 1x{n} map"
_ONE_POSITION = (
    "its {n} maps have one position each ({size}): shown as one vector of {n} values (a "
    "single 1x{n} map), index i being map i"
)


def finite_range(a: np.ndarray) -> tuple[float | None, float | None]:
    """Min and max over the finite values (None, None when there are none)."""
    fin = a[np.isfinite(a)]
    if not fin.size:
        return None, None
    return float(fin.min()), float(fin.max())


#: The grey of a constant map's PNG (mid-tone: neither a map's minimum nor its maximum).
CONSTANT_GREY = 128


def constant_maps(maps: Any) -> dict[int, float | None]:
    """The maps (``(units, h, w)``) whose finite values are all equal, by unit: that
    value, or None for a map with no finite value. Their PNGs have no range to show (see
    :func:`map_png`), so the page marks them with their value instead."""
    import torch

    a = torch.as_tensor(maps).detach().to("cpu", torch.float64).reshape(len(maps), -1)
    fin = torch.isfinite(a)
    lo = torch.where(fin, a, torch.inf).amin(1) if a.shape[1] else torch.full((len(a),), torch.inf)
    hi = torch.where(fin, a, -torch.inf).amax(1) if a.shape[1] else lo
    none = ~fin.any(1)
    flat = (lo == hi) | none
    return {
        int(u): None if bool(none[u]) else float(lo[u])
        for u in torch.nonzero(flat).flatten().tolist()
    }


#: The colour of a value that is not finite (NaN, +inf, -inf) in a map's PNG: magenta,
#: which no grey of a finite value can be (black would read as the map's lowest value).
NONFINITE_RGB = (255, 0, 255)


def nonfinite_counts(a: Any) -> dict[str, int]:
    """How many values of ``a`` are NaN, +inf and -inf (``{"nan": n, "+inf": n,
    "-inf": n}``, kinds with none left out; empty when every value is finite)."""
    a = np.asarray(a, dtype=np.float64)
    counts = {
        "nan": int(np.isnan(a).sum()),
        "+inf": int(np.isposinf(a).sum()),
        "-inf": int(np.isneginf(a).sum()),
    }
    return {k: n for k, n in counts.items() if n}


def nonfinite_maps(maps: Any) -> dict[int, int]:
    """The maps (``(units, h, w)``) holding values that are not finite, by unit: how many.
    Their PNGs mark those positions magenta (:data:`NONFINITE_RGB`); their min and max
    are over the finite values."""
    import torch

    if len(maps) == 0:
        return {}
    a = torch.as_tensor(maps).detach().to("cpu").reshape(len(maps), -1)
    bad = (~torch.isfinite(a)).sum(1)
    return {int(u): int(bad[u]) for u in torch.nonzero(bad).flatten().tolist()}


def map_png(a: np.ndarray) -> tuple[bytes, int, float | None, float | None]:
    """A 2-D map as an 8-bit PNG: ``round(255 * (v - min) / (max - min))`` over the map's
    finite values, as grayscale, upscaled by nearest neighbour by an integer factor when
    its longer side is under MIN_MAP_PX. A constant map (max == min, a ReLU that does not
    fire) has no range to scale: it is flat mid-grey (:data:`CONSTANT_GREY`), never
    black, which would read as "its lowest" or "missing"; the page marks it with its
    value (:func:`constant_maps`). A map with values that are not finite (a model's NaN,
    an inf from a division by zero) is an RGB PNG: its finite values the same greys, the
    others magenta (:data:`NONFINITE_RGB`), a colour no value has, so a NaN never reads as
    the map's lowest value; min and max (returned) are over the finite values, None when
    there are none.

    Returns ``(png bytes, scale, min, max)``.
    """
    from PIL import Image

    a = np.asarray(a, dtype=np.float64)
    fin = np.isfinite(a)
    lo, hi = finite_range(a)
    if lo is None or hi is None:
        pix = np.zeros(a.shape, np.uint8)
    elif hi == lo:
        pix = np.where(fin, CONSTANT_GREY, 0).astype(np.uint8)
    else:
        with np.errstate(invalid="ignore"):  # (halved: a range near float64's limit stays finite)
            scaled = np.rint(255.0 * ((a / 2 - lo / 2) / (hi / 2 - lo / 2)))
        pix = np.where(fin, np.clip(scaled, 0, 255), 0).astype(np.uint8)
    marked = not fin.all()
    if marked:
        pix = np.where(fin[..., None], pix[..., None], np.array(NONFINITE_RGB, np.uint8))
        pix = pix.astype(np.uint8)
    longest = max(a.shape) if a.size else 1
    scale = math.ceil(MIN_MAP_PX / longest) if longest < MIN_MAP_PX else 1
    if scale > 1:
        pix = np.repeat(np.repeat(pix, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pix, mode="RGB" if marked else "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), scale, lo, hi


def json_values(a: np.ndarray) -> list[list[float | None]]:
    """A 2-D array as nested lists, non-finite values as None (strict JSON)."""
    a = np.asarray(a, dtype=np.float64)
    if np.isfinite(a).all():
        return a.tolist()  # type: ignore[no-any-return]
    return [[float(v) if math.isfinite(v) else None for v in row] for row in a.tolist()]


def _keeps_input(tr: Any, channels_last: bool = False) -> dict[int, bool]:
    """Per op index of the trace ``tr``, whether its first output is its single model
    input's tensor, element for element (see :meth:`Session.keeps_input`); no op does on
    a model of several inputs (whose channels would the names be?). On a channels-last
    input the norms are not such ops: they normalise over axis 1, which is time there."""
    from lurker.graph.nodes import OpRef
    from lurker.ops.catalogue import PER_CHANNEL_NORMS, is_elementwise, value_refs

    inputs = [op for op in tr.ops if op.kind == "input"]
    if len(inputs) != 1 or not inputs[0].outputs:
        return {}
    shape = tuple(inputs[0].outputs[0].shape)
    keeps: dict[int, bool] = {inputs[0].index: True}
    for op in tr.ops:  # in call order: an op's arguments come before it
        if op.index in keeps:
            continue
        # the arguments whose values make the output: not to(other)'s other, which gives a
        # dtype and device, nor out=, which is written (a buffer's values type_as(x) would
        # otherwise carry the input's channel names)
        args = [r for r in value_refs(op) if isinstance(r, OpRef)]
        keeps[op.index] = bool(
            op.kind == "op"
            and is_elementwise(op.name)
            and not (channels_last and op.name.rstrip("_") in PER_CHANNEL_NORMS)
            and op.outputs
            and tuple(op.outputs[0].shape) == shape
            and any(r.output == 0 and keeps.get(r.index, False) for r in args)
            and all(
                # or made from no input at all (the graph's distance from one: none)
                (r.output == 0 and keeps.get(r.index, False))
                or tr.ops[r.index].dist_from_input is None
                for r in args
            )
        )
    return keeps
