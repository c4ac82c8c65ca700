"""File helpers of the run store: atomic writes and safe cache file names."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lurker.store.errors import RunExistsError, RunInUseError, StoreError
from lurker.store.schema import LOCK_NAME

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

#: Prefix of the temporary files :func:`atomic_write_bytes` (and run creation) leave
#: behind only if the process dies mid-write; safe to delete once their writer is gone.
TMP_PREFIX = ".lurker-tmp-"
#: A temporary file this old is stale whoever wrote it: a write lives for moments.
STALE_TMP_SECONDS = 3600.0
#: ``.lurker-tmp-<pid>@<host>@<name>.XXXX``: the writing process and its machine.
_TMP_WRITER = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)@([^@]*)@")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_COMPONENT = 96


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    The bytes go to a temporary file in the same directory (same filesystem, so the
    final :func:`os.replace` is atomic), are fsynced, then renamed over ``path``; a crash
    at any point leaves at most a stray ``.lurker-tmp-*`` file, never a truncated
    ``path``. Parent directories are created. Returns ``path`` as a :class:`Path`.

    ``durable=False`` skips both fsyncs, for many small files of derived data (cache
    images): still atomic for readers and when the process is killed, but a power cut
    before the OS flushes them may leave empty files (readers of the cache treat an
    empty file as missing).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_tmp_tag()}{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide files from servers
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)
    return target


@functools.cache
def _host() -> str:
    """This machine's name as temporary file names hold it (read once per process)."""
    return _UNSAFE.sub("_", socket.gethostname())[:40] or "host"


def _tmp_tag() -> str:
    """The start of this process's temporary file names: they name their writer, so that
    :func:`remove_stale_tmp` can tell a killed writer's file from one being written."""
    return f"{TMP_PREFIX}{os.getpid()}@{_host()}@"


def _writer_gone(name: str) -> bool:
    """Whether the temporary file ``name`` names a process of this machine that has exited
    (False when it names none, another machine's, or one still running)."""
    m = _TMP_WRITER.match(name)
    if m is None or m[2] != _host() or os.name == "nt":  # (Windows' os.kill would kill it)
        return False
    try:
        os.kill(int(m[1]), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process (still running), a bad pid
        return False
    return False


def remove_stale_tmp(folder: str | os.PathLike[str]) -> int:
    """Delete the ``.lurker-tmp-*`` files under ``folder`` whose writer is gone: killed
    mid-write (``lurker images`` stopped by SIGKILL), they are never valid data and
    reruns would keep them for good. A file whose writer still runs (a ``lurker serve``
    writing an image into the same folder now) is kept, unless older than
    :data:`STALE_TMP_SECONDS` (files of other machines and of lurker before writers were
    named in them). Returns how many were removed."""
    removed = 0
    now = time.time()
    for entry in Path(folder).rglob(f"{TMP_PREFIX}*"):
        try:
            stale = _writer_gone(entry.name) or now - entry.stat().st_mtime > STALE_TMP_SECONDS
            if stale and entry.is_file():
                entry.unlink()
                removed += 1
        except OSError:  # gone meanwhile (renamed into place by its writer), or unreadable
            continue
    return removed


def fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (best effort: not every OS can fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def safe_component(text: str) -> str:
    """Turn ``text`` into one path component that is safe on any filesystem.

    Names made only of ``[A-Za-z0-9._-]`` are kept (readable cache folders); anything
    else is replaced by ``_`` and suffixed with a short hash of the original, so two
    different names (``a/b`` and ``a_b``) never share a file. ``..`` and dot-names are
    hashed too, so a component can never climb out of the cache.
    """
    clean = _UNSAFE.sub("_", text)
    if clean == text and text and not text.startswith(".") and len(text) <= _MAX_COMPONENT:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    stem = clean.strip("._")[:_MAX_COMPONENT] or "x"
    return f"{stem}-{digest}"


def cache_file(
    root: Path, kind: str, layer: str, unit: int, rank: int, list: str, ext: str = "png"
) -> Path:
    """Path of one cached image under ``root/cache`` (parent directories created).

    Layout: ``cache/<kind>/<layer>/<unit:05d>-<list>-<rank:03d>.<ext>`` with every
    component passed through :func:`safe_component`. A sample's own image is not per
    unit: see :func:`sample_file`.
    """
    for label, value in (("unit", unit), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"cache_path: {label} must be a non-negative int, got {value!r}")
    suffix = safe_component(ext.lstrip(".") or "bin")
    folder = root / "cache" / safe_component(kind) / safe_component(layer)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{unit:05d}-{safe_component(list)}-{rank:03d}.{suffix}"


@contextlib.contextmanager
def run_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the run directory ``root`` for this process while it writes the run.

    A second writer (another probe into the same directory) fails at once with
    :class:`RunInUseError` naming the holder's process id, instead of repeating the whole
    sweep. The lock is an ``flock`` on ``root/.lock``, so the OS releases it when the
    holder exits or crashes. A directory this call created and that holds nothing else on
    release (the probe failed before it made its run) is removed again.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunExistsError(
            f"{root} is a file, not a run directory; choose another out directory",
            cli=f"{root} is a file, not a run directory; choose another --out",
        )
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the run directory {root} ({e.strerror or e}); choose an out "
            "directory you can write to",
            cli=f"cannot create the run directory {root} ({e.strerror or e}); choose an "
            "--out you can write to",
        ) from e
    if fcntl is None:
        yield
        return
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"run {root} is in use by another process (pid {holder}), which is writing "
                "it. Wait for that process to finish (or stop it), or choose another out "
                "directory.",
                cli=f"run {root} is in use by another process (pid {holder}), which is "
                "writing it. Wait for that process to finish (or stop it), or choose another "
                "--out.",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            if [p.name for p in root.iterdir()] == [LOCK_NAME]:
                path.unlink()  # still held: a waiting process sees the inode change
                if created:
                    root.rmdir()
        os.close(fd)


def lock_holder(root: str | os.PathLike[str]) -> str | None:
    """The process id holding ``root``'s run lock (a probe writing it now), else None."""
    path = Path(root) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def sample_file(root: Path, sample_id: int, ext: str = "png") -> Path:
    """Path of one sample's cached image: ``cache/samples/<sample_id:08d>.<ext>``.

    One file per sample, however many units rank it (parent directory created).
    """
    if isinstance(sample_id, bool) or not isinstance(sample_id, int) or sample_id < 0:
        raise ValueError(f"sample_file: sample_id must be a non-negative int, got {sample_id!r}")
    folder = root / "cache" / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sample_id:08d}.{safe_component(ext.lstrip('.') or 'bin')}"


#: The file in ``cache/`` whose identity is the cache's generation (a server's image
#: token): made when missing, removed when the cache's pictures are replaced wholesale.
GENERATION_MARKER = ".generation"
#: The file in ``cache/`` naming the model that made what the cache holds of a model's
#: making (:data:`MODEL_MADE`): ``{"model_fingerprint": fp}``, the run's recorded one.
MODEL_STAMP = "model.json"
#: The ``cache/`` folders whose files a model makes (gradients, the crops of entries whose
#: peak the run does not store, explanations with their predictions): trusted only under
#: a stamp naming the run's model. Crops of stored peaks are the dataset's alone, but sit
#: in ``crop/`` beside those, so the folder goes with them.
MODEL_MADE = ("grad", "grad_crop", "crop", "explain")


def cache_origin(root: str | os.PathLike[str]) -> str | None:
    """The fingerprint of the model that made the model-made files of run ``root``'s
    cache, as its stamp records it; None without a (readable) stamp."""
    import json

    try:
        doc = json.loads((Path(root) / "cache" / MODEL_STAMP).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    fp = doc.get("model_fingerprint") if isinstance(doc, dict) else None
    return fp if isinstance(fp, str) and fp else None


def cache_trusted(root: str | os.PathLike[str], fingerprint: str | None) -> bool:
    """Whether the model-made files of run ``root``'s cache are the run's model's: its
    stamp names ``fingerprint`` (the run's ``model_fingerprint``). A run that records
    none (an older run) is not checked. Files without a stamp (made by a lurker before
    it kept one, maybe with another model) or under another model's are not trusted."""
    return not fingerprint or cache_origin(root) == fingerprint


def cache_unknown(root: str | os.PathLike[str], fingerprint: str | None) -> bool:
    """Whether run ``root``'s cache holds model-made files it does not trust
    (:func:`cache_trusted`): said where they would have been shown."""
    if cache_trusted(root, fingerprint):
        return False
    cache = Path(root) / "cache"
    for name in MODEL_MADE:
        with contextlib.suppress(OSError), os.scandir(cache / name) as it:
            if any(True for _ in it):
                return True
    return False


#: why untrusted model-made files are not shown, for the messages that say so
UNKNOWN_ORIGIN = (
    "made before lurker recorded which model made a run's cached images (or by another "
    "model than the run's), so of unknown origin: not shown"
)


def claim_cache(root: str | os.PathLike[str], fingerprint: str | None) -> None:
    """Make run ``root``'s cache the model ``fingerprint``'s (the run's, checked by the
    caller) before it writes a model-made file there: files it does not trust are
    deleted (moved aside first, so no reader sees half a folder) and the stamp written.
    Raises OSError where the cache cannot be written (a read-only run)."""
    import json
    import shutil

    if cache_trusted(root, fingerprint):
        return
    cache = Path(root) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    dropped = False
    for name in MODEL_MADE:
        folder = cache / name
        if not folder.exists():
            continue
        aside = cache / f"{_tmp_tag()}untrusted-{name}-{os.urandom(4).hex()}"
        try:
            os.replace(folder, aside)
        except FileNotFoundError:  # another writer of the same model moved it meanwhile
            continue
        dropped = True
        shutil.rmtree(aside, ignore_errors=True)
    doc = json.dumps({"model_fingerprint": fingerprint}).encode("utf-8")
    atomic_write_bytes(cache / MODEL_STAMP, doc, durable=False)
    if dropped:
        # other pictures will come under the same names: a new cache generation, so that
        # no browser keeps its copies of the dropped ones (a fresh cache only stamped
        # keeps its generation: nothing it served changes)
        with contextlib.suppress(FileNotFoundError):
            (cache / GENERATION_MARKER).unlink()
