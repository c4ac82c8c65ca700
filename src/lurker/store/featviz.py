"""Feature visualizations stored in a run: the ``featviz`` table of ``run.db``.

An additive table (made by the first write; runs without it read as having none), so no
schema version changes: older lurkers ignore it. One row per image: the layer, the
objective, the unit (or direction) index, the copy (several images per unit), the
activation the image reached, the image as a PNG (grey for 1 channel, RGB for 3, the
channels stacked vertically in one grey image otherwise) with its ``(C, H, W)`` shape,
and the settings it was made with (JSON). A write replaces each of its units' images as
a whole (every copy of that unit and objective), so a layer can be done in pieces and a
unit never mixes images of two runs (two settings). Torch-free, like the rest of the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lurker.store.errors import MissingFromRunError, StoreError
from lurker.store.files import run_lock
from lurker.store.schema import DB_NAME, dump_json

__all__ = [
    "StoredFeatViz",
    "UnitFeatViz",
    "direction_featviz",
    "featviz_png",
    "preview_grid_png",
    "featviz_signal",
    "signal_values",
    "featviz_units",
    "unit_featviz",
    "write_featviz",
]

DDL = """
CREATE TABLE IF NOT EXISTS featviz (
    layer_id   INTEGER NOT NULL REFERENCES layers(id),
    objective  TEXT NOT NULL,
    unit       INTEGER NOT NULL,
    copy       INTEGER NOT NULL,
    activation REAL,
    shape      TEXT NOT NULL,
    image      BLOB NOT NULL,
    settings   TEXT NOT NULL,
    PRIMARY KEY (layer_id, objective, unit, copy)
);
"""


#: The counter of changes to the featviz table, kept by triggers in the run's database,
#: so that a lurker that writes no tokens (made before them) moves it too.
WRITES_DDL = (
    "CREATE TABLE IF NOT EXISTS featviz_writes (n INTEGER NOT NULL)",
    "INSERT INTO featviz_writes (n) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM featviz_writes)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS featviz_{when.lower()} AFTER {when} ON featviz "
        "BEGIN UPDATE featviz_writes SET n = n + 1; END"
        for when in ("INSERT", "DELETE", "UPDATE")
    ),
)
_WRITES_KEPT_BY = (
    "featviz",
    "featviz_writes",
    "featviz_insert",
    "featviz_delete",
    "featviz_update",
)

#: The meta key of the additions' tokens: ``{"featviz": {layer name: token}, "map": token,
#: "featviz_writes": n}``, a fresh random token written with each write, in its
#: transaction (see :meth:`lurker.store.Run.additions`). ``featviz_writes`` is the counter
#: of the table's changes (``WRITES_DDL``) as that write left it: another value means rows
#: were written since by a lurker that writes no token, whose tokens are then hashed from
#: the rows instead.
ADDITIONS_KEY = "additions"


def read_additions(conn: Any) -> dict[str, Any]:
    """The run's additions tokens as stored (``{}``: a run written before them)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (ADDITIONS_KEY,)).fetchone()
    return dict(json.loads(row[0]) or {}) if row else {}


def write_addition(
    conn: Any, kind: str, layer: str | None = None, stored_fresh: bool = True
) -> None:
    """Give ``kind`` (``featviz`` of ``layer``, or ``map``) a new token, inside the caller's
    write transaction. The other layers keep the tokens they had: the stored ones, or,
    where none are stored or they were stale before this write (``stored_fresh`` False: an
    older lurker wrote rows since), those a scan of their rows gives, as a reader gets."""
    adds = read_additions(conn)
    new = secrets.token_hex(8)
    if kind == "featviz":
        layers = adds.get("featviz") if stored_fresh else None
        if layers is None:
            layers = scan_featviz_tokens(conn)
        adds["featviz"] = {**layers, str(layer): new}
        adds["featviz_writes"] = featviz_writes(conn)
    else:
        adds[kind] = new
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (ADDITIONS_KEY, json.dumps(adds))
    )


def featviz_writes(conn: Any) -> int | None:
    """The count of the featviz table's changes, or None where the table or the triggers
    that keep it are missing (no featviz; a run whose table an older lurker dropped or made
    again without them): what tells a write that stored no token."""
    marks = ", ".join("?" * len(_WRITES_KEPT_BY))
    found = conn.execute(
        f"SELECT count(*) FROM sqlite_master WHERE name IN ({marks})", _WRITES_KEPT_BY
    ).fetchone()[0]
    if found != len(_WRITES_KEPT_BY):
        return None
    row = conn.execute("SELECT n FROM featviz_writes").fetchone()
    return None if row is None else int(row[0])


def scan_featviz_tokens(conn: Any) -> dict[str, str]:
    """Each layer's featviz token hashed from its rows (settings and activations tell two
    writes apart without reading the images): what a run written before the stored tokens
    gets, one full scan of the table."""
    if not has_featviz_table(conn):
        return {}
    rows = conn.execute(
        "SELECT l.name, f.rowid, f.objective, f.unit, f.copy, f.activation, f.settings, "
        "length(f.image) FROM featviz f JOIN layers l ON l.id = f.layer_id ORDER BY f.rowid"
    ).fetchall()
    by_layer: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_layer.setdefault(row[0], []).append(row[1:])
    return {
        name: hashlib.sha256(repr(rs).encode()).hexdigest()[:16] for name, rs in by_layer.items()
    }


def has_featviz_table(conn: Any) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='featviz'")
    return row.fetchone() is not None


def encode_png(pixels: np.ndarray) -> bytes:
    """``(C, H, W)`` uint8 -> PNG bytes (grey, RGB, or channels stacked in one grey image)."""
    from PIL import Image

    c = pixels.shape[0]
    if c == 3:
        img = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
    else:
        img = Image.fromarray(np.ascontiguousarray(pixels.reshape(-1, pixels.shape[-1])), "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


#: the most images a notebook's view of a layer's feature visualizations draws
PREVIEW_TILES = 128


def preview_grid_png(tiles: Sequence[Any], copies: int = 1) -> bytes | None:
    """PIL images as one PNG grid, what a notebook shows for feature visualizations (a
    fresh ``FeatViz`` or a stored one): a row per unit with ``copies > 1`` (else 8 a row),
    the first :data:`PREVIEW_TILES`, each scaled up (nearest) to at least 64 px so a 16 px
    image shows, but never past 512 px along its longer side (a 4 x 200 image zoomed 16
    times made a grid 12,806 px wide). None for no tiles."""
    import math

    from PIL import Image

    tiles = list(tiles)[:PREVIEW_TILES]
    if not tiles:
        return None
    cols = copies if copies > 1 else min(8, len(tiles))
    w, h = tiles[0].size
    zoom = max(1, min(math.ceil(64 / min(w, h)), 512 // max(w, h)))
    tw, th, gap = w * zoom, h * zoom, 2
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * (tw + gap) - gap, rows * (th + gap) - gap), "white")
    for k, tile in enumerate(tiles):
        big = tile.convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
        grid.paste(big, ((k % cols) * (tw + gap), (k // cols) * (th + gap)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """PNG bytes written by :func:`encode_png` -> ``(C, H, W)`` uint8."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(data)))
    c, h, w = shape
    return arr.transpose(2, 0, 1).copy() if c == 3 else arr.reshape(c, h, w)


def write_featviz(
    root: str | os.PathLike[str],
    layer: str,
    objective: str,
    rows: Sequence[tuple[int, int, float, np.ndarray]],
    settings: dict[str, Any],
    extra: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Store images in the run at ``root``: ``rows`` of ``(unit, copy, activation,
    pixels)``, pixels ``(C, H, W)`` uint8. ``layer`` is any name the run knows the layer
    by. The units written lose their earlier images of ``objective`` first (a unit made
    again with fewer copies keeps none of the old ones, whose settings differ). Holds the
    run's lock (a probe writing the run makes this fail at once). ``extra``: per unit, keys
    added to its settings (a signal's ``peaks``: what it reached, not how it was made)."""
    from lurker.store.run import Run
    from lurker.store.writer import connect_rw

    path = Path(root)
    with Run.open(path) as run:  # a complete run, or an error that says so
        info = run.layer(layer)
    doc = dump_json(settings)
    docs = {int(u): dump_json({**settings, **more}) for u, more in (extra or {}).items()}
    encoded = [
        (
            info.id,
            objective,
            int(u),
            int(k),
            float(a),
            dump_json(list(p.shape)),
            encode_png(p),
            docs.get(int(u), doc),
        )
        for u, k, a, p in rows
    ]
    if not encoded:  # nothing written: no new token (open pages would refetch for nothing)
        return
    with run_lock(path):
        conn = connect_rw(path / DB_NAME)
        try:
            conn.execute("BEGIN IMMEDIATE")
            # whether the stored tokens still stand for the rows (no older lurker wrote since)
            n = featviz_writes(conn)
            fresh = n is not None and read_additions(conn).get("featviz_writes") == n
            conn.execute(DDL)
            for statement in WRITES_DDL:
                conn.execute(statement)
            conn.executemany(
                "DELETE FROM featviz WHERE layer_id = ? AND objective = ? AND unit = ?",
                [(info.id, objective, u) for u in sorted({int(r[0]) for r in rows})],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO featviz (layer_id, objective, unit, copy, activation, "
                "shape, image, settings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                encoded,
            )
            write_addition(conn, "featviz", info.name, fresh)  # what open pages of the layer poll
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot write feature visualizations into run {path}: {e}") from e
        finally:
            conn.close()


@dataclass(frozen=True)
class StoredFeatViz:
    """A layer's stored feature visualizations (``Run.featviz``), read without torch.

    ``units``: the unit (or direction) of each row; ``activations``: ``(units, copies)``,
    the objective each image reached (NaN past a unit's own copies, when units were made
    with different ``images_per_unit``); ``settings``: how they were made (of the last
    write; :meth:`unit_settings` gives a unit's own); :meth:`images` decodes them,
    :meth:`png` gives one image's stored PNG as is.
    """

    layer: str
    objective: str
    units: list[int]
    copies: int
    activations: np.ndarray
    settings: dict[str, Any]
    _pngs: dict[tuple[int, int], tuple[bytes, list[int]]] = field(repr=False)
    _settings: dict[int, dict[str, Any]] = field(repr=False, default_factory=dict)

    def unit_settings(self, unit: int) -> dict[str, Any]:
        """How ``unit``'s images were made (a layer made in pieces can differ per unit)."""
        if int(unit) not in self._settings:
            raise MissingFromRunError(
                f"no feature visualization of unit {unit} of layer {self.layer!r}; stored "
                f"units: {self.units[:20]}",
                missing="featviz",
            )
        return self._settings[int(unit)]

    def png(self, unit: int, copy: int = 0) -> bytes:
        """The stored PNG of ``unit``'s image ``copy``."""
        found = self._pngs.get((int(unit), int(copy)))
        if found is None:
            raise MissingFromRunError(
                f"no feature visualization of unit {unit} (copy {copy}) of layer "
                f"{self.layer!r}; stored units: {self.units[:20]}",
                missing="featviz",
            )
        return found[0]

    def images(self) -> np.ndarray:
        """All images as float32 ``(units, copies, C, H, W)`` in [0, 1] (8-bit precision);
        NaN past a unit's own copies (units made with different ``images_per_unit``)."""
        shapes = sorted({tuple(shape) for _, shape in self._pngs.values()})
        if len(shapes) > 1:
            raise StoreError(
                f"feature visualizations of layer {self.layer!r} were made at different sizes "
                f"({', '.join('x'.join(map(str, s)) for s in shapes)}), so they do not fit "
                "one array: read them one unit at a time with png(unit), or make the layer "
                "again at one size"
            )
        c, h, w = shapes[0]
        out = np.full((len(self.units), self.copies, c, h, w), np.nan, dtype=np.float32)
        for i, u in enumerate(self.units):
            for k in range(self.copies):
                found = self._pngs.get((u, k))
                if found is not None:
                    out[i, k] = decode_png(*found).astype(np.float32) / 255.0
        return out

    def __repr__(self) -> str:
        """One line (the dataclass's printed the activations and settings): the layer,
        objective, units and the images' shape."""
        shapes = sorted({tuple(shape) for _, shape in self._pngs.values()})
        kind = "signals" if self.settings.get("input") == "signal" else "images"
        size = ", ".join("x".join(map(str, sh)) for sh in shapes) or "none"
        copies = f", {self.copies} copies each" if self.copies > 1 else ""
        return (
            f"<StoredFeatViz {self.layer!r} {self.objective}: {len(self.units)} units"
            f"{copies}, {kind} {size}>"
        )

    def _repr_png_(self) -> bytes | None:
        """What a notebook shows for ``run.featviz(layer)``: the stored images as a grid
        (:func:`preview_grid_png`), as for a fresh ``FeatViz``. None for signals (the repr
        says their shape) and for images of different sizes (no one grid holds them)."""
        from PIL import Image

        if self.settings.get("input") == "signal":
            return None
        if len({tuple(shape) for _, shape in self._pngs.values()}) != 1:
            return None
        tiles = [
            Image.open(io.BytesIO(self._pngs[(u, k)][0]))
            for u in self.units
            for k in range(self.copies)
            if (u, k) in self._pngs
        ]
        return preview_grid_png(tiles, self.copies)

    def signals(self) -> np.ndarray:
        """A run of signals' as float32 ``(units, copies, C, T)``, in the model's input
        units, each unit decoded by its own settings (:func:`signal_values`: its channels'
        dataset ranges, or ``amplitude * (2 * image - 1)``; a layer made in pieces may have
        several; 8-bit precision: steps of ``(max - min) / 255``); NaN past a unit's own
        copies. Refused for images."""
        images = self.images()
        out = np.full(images.shape[:3] + images.shape[-1:], np.nan, dtype=np.float32)
        for i, u in enumerate(self.units):
            values = signal_values(images[i], self.unit_settings(u))
            if values is None:
                raise StoreError(
                    f"the feature visualizations of layer {self.layer!r} are images, not "
                    f"signals (unit {u}'s at least): read them with images()"
                )
            out[i] = values
        return out


def signal_values(pixels: np.ndarray, settings: dict[str, Any]) -> np.ndarray | None:
    """Signal pixels ``(..., C, 1, T)`` in [0, 1] (stored, or a fresh result's) as
    ``(..., C, T)`` values in the model's input units, by the settings they were made
    with: ``bounds`` (each channel's ``[min, max]``, the dataset's range) maps [0, 1] onto
    each channel's range, ``amplitude`` (older runs, ``amplitude=``) onto ``±amplitude``;
    in the pixels' float dtype (float32 for others). None where the settings are no
    signal's."""
    if settings.get("input") != "signal":
        return None
    x = np.asarray(pixels)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    x = x[..., 0, :]
    bounds = settings.get("bounds")
    if bounds is not None:
        lo = np.asarray(bounds[0], dtype=x.dtype)[:, None]
        hi = np.asarray(bounds[1], dtype=x.dtype)[:, None]
        if lo.shape[0] != x.shape[-2]:
            return None
        return lo + x * (hi - lo)
    amp = settings.get("amplitude")
    if amp is None:
        return None
    return (x * 2 - 1) * x.dtype.type(amp)


def _decoded_signal(shape: str, image: bytes, doc: str) -> np.ndarray | None:
    """A stored row's signal ``(C, T)`` float32, in the model's input units (by its own
    settings, :func:`signal_values`); None where the stored image is no signal."""
    pixels = decode_png(bytes(image), json.loads(shape)).astype(np.float32) / 255.0
    return signal_values(pixels, json.loads(doc))


def featviz_signal(
    run: Any, layer: str, unit: int, copy: int = 0, objective: str = "channel"
) -> list[list[float]] | None:
    """One stored signal ``(C, T)`` as lists, in the model's input units (as
    :meth:`StoredFeatViz.signals`), or None where the stored image is no signal."""
    info = run.layer(layer)
    rows = run._query(
        "SELECT shape, image, settings FROM featviz WHERE layer_id = ? AND objective = ? "
        "AND unit = ? AND copy = ?",
        (info.id, objective, int(unit), int(copy)),
    )
    values = _decoded_signal(*rows[0]) if rows else None
    return None if values is None else values.tolist()


def featviz_signals(run: Any, layer: str, objective: str) -> dict[int, np.ndarray]:
    """Every unit's first stored signal ``(C, T)`` of a layer and objective, float32 in the
    model's input units (as :func:`featviz_signal`, in one query: what a layer's grid
    draws); empty where none is stored or the stored images are no signals."""
    if not run._has_table("featviz"):
        return {}
    info = run.layer(layer)
    found: dict[int, np.ndarray] = {}
    for unit, shape, image, doc in run._query(
        "SELECT unit, shape, image, settings FROM featviz WHERE layer_id = ? AND objective = ? "
        "AND copy = 0 ORDER BY unit",
        (info.id, objective),
    ):
        values = _decoded_signal(shape, image, doc)
        if values is None:
            return {}
        found[int(unit)] = values
    return found


def read_featviz(run: Any, layer: str, objective: str | None) -> StoredFeatViz:
    """What :meth:`lurker.store.Run.featviz` returns (see there)."""
    info = run.layer(layer)
    fix = f"make them with `lurker featviz {run.path} --layer {info.name}`"
    if not run._has_table("featviz"):
        raise MissingFromRunError(
            f"run {run.path} holds no feature visualizations; {fix}", missing="featviz"
        )
    objectives = [
        o
        for (o,) in run._query(
            "SELECT DISTINCT objective FROM featviz WHERE layer_id = ? ORDER BY objective",
            (info.id,),
        )
    ]
    if not objectives:
        raise MissingFromRunError(
            f"run {run.path} holds no feature visualizations of layer {info.name!r}; {fix}",
            missing="featviz",
        )
    if objective is None:
        objective = "channel" if "channel" in objectives else objectives[0]
    elif objective not in objectives:
        raise MissingFromRunError(
            f"layer {info.name!r} of run {run.path} has feature visualizations for "
            f"objective(s) {', '.join(objectives)}, not {objective!r}",
            missing="featviz",
        )
    rows = run._query(
        "SELECT unit, copy, activation, shape, image, settings, rowid FROM featviz "
        "WHERE layer_id = ? AND objective = ? ORDER BY unit, copy",
        (info.id, objective),
    )
    units = sorted({int(r[0]) for r in rows})
    copies = 1 + max(int(r[1]) for r in rows)
    acts = np.full((len(units), copies), np.nan)
    where = {u: i for i, u in enumerate(units)}
    pngs: dict[tuple[int, int], tuple[bytes, list[int]]] = {}
    settings: dict[int, dict[str, Any]] = {}
    for u, k, a, shape, image, doc, _ in rows:
        acts[where[u], k] = np.nan if a is None else a
        pngs[(int(u), int(k))] = (bytes(image), json.loads(shape))
        settings.setdefault(int(u), json.loads(doc))
    last = json.loads(max(rows, key=lambda r: r[6])[5])  # the latest write's (highest rowid)
    return StoredFeatViz(info.name, objective, units, copies, acts, last, pngs, settings)


def featviz_layers(run: Any) -> list[str]:
    """Names of the run's layers that have stored feature visualizations, in layer order."""
    if not run._has_table("featviz"):
        return []
    ids = {i for (i,) in run._query("SELECT DISTINCT layer_id FROM featviz")}
    return [info.name for info in run.layers if info.id in ids]


@dataclass(frozen=True)
class UnitFeatViz:
    """One unit's stored feature visualizations, without their images (``unit_featviz``)."""

    layer: str
    unit: int
    objective: str
    objectives: list[str]
    activations: list[float | None]  # per copy: the objective each image reached
    settings: dict[str, Any]


def unit_featviz(
    run: Any, layer: str, unit: int, objective: str | None = None
) -> UnitFeatViz | None:
    """``unit``'s stored feature visualizations of ``layer`` (default objective "channel"
    where present), or None when there are none: a small query, for a unit page."""
    info = run.layer(layer)
    if not run._has_table("featviz"):
        return None
    # a direction's "unit" is the direction's index, not this unit: never shown as its own
    objectives = [
        o
        for (o,) in run._query(
            "SELECT DISTINCT objective FROM featviz WHERE layer_id = ? AND unit = ? "
            "AND objective != 'direction' ORDER BY objective",
            (info.id, int(unit)),
        )
    ]
    if not objectives:
        return None
    if objective is None:
        objective = "channel" if "channel" in objectives else objectives[0]
    rows = run._query(
        "SELECT copy, activation, settings FROM featviz WHERE layer_id = ? AND objective = ? "
        "AND unit = ? ORDER BY copy",
        (info.id, objective, int(unit)),
    )
    if not rows:
        return None
    return UnitFeatViz(
        info.name,
        int(unit),
        objective,
        objectives,
        [None if a is None else float(a) for _, a, _ in rows],
        json.loads(rows[-1][2]),
    )


def featviz_png(
    run: Any, layer: str, unit: int, copy: int = 0, objective: str = "channel"
) -> bytes:
    """The stored PNG of one image; :class:`MissingFromRunError` when there is none."""
    info = run.layer(layer)
    rows = (
        run._query(
            "SELECT image FROM featviz WHERE layer_id = ? AND objective = ? AND unit = ? "
            "AND copy = ?",
            (info.id, objective, int(unit), int(copy)),
        )
        if run._has_table("featviz")
        else []
    )
    if not rows:
        raise MissingFromRunError(
            f"no feature visualization of unit {unit} (copy {copy}, objective {objective!r}) "
            f"of layer {info.name!r}; make them with `lurker featviz {run.path} --layer "
            f"{info.name}`",
            missing="featviz",
        )
    return bytes(rows[0][0])


def featviz_units(run: Any, layer: str, objective: str = "channel") -> list[int]:
    """The units of ``layer`` with a stored image for ``objective`` (a layer grid's list)."""
    if not run._has_table("featviz"):
        return []
    info = run.layer(layer)
    rows = run._query(
        "SELECT DISTINCT unit FROM featviz WHERE layer_id = ? AND objective = ? ORDER BY unit",
        (info.id, objective),
    )
    return [int(u) for (u,) in rows]


@dataclass(frozen=True)
class DirectionFeatViz:
    """One direction's stored feature visualizations (objective ``"direction"``), without
    their images: a direction is a mix of a layer's units, not one of them, so the
    explorer shows it on the layer's page, by the direction's index (``direction_featviz``)."""

    index: int
    activations: list[float | None]  # per copy: the objective each image reached
    direction: list[float]  # the direction itself, one weight per unit of the layer


def direction_featviz(run: Any, layer: str) -> list[DirectionFeatViz]:
    """The directions of ``layer`` with stored images, by index; each with the direction
    its images were made with (from their settings), so a reader sees which units mix."""
    if not run._has_table("featviz"):
        return []
    info = run.layer(layer)
    # the settings (which hold every direction of the write) of one copy per direction
    # only, each distinct document parsed once: they grow with directions x units
    rows = run._query(
        "SELECT unit, copy, activation, CASE WHEN copy = 0 THEN settings END FROM featviz "
        "WHERE layer_id = ? AND objective = 'direction' ORDER BY unit, copy",
        (info.id,),
    )
    acts: dict[int, list[float | None]] = {}
    vectors: dict[int, list[float]] = {}
    parsed: dict[str, list[Any]] = {}
    for unit, copy, a, doc in rows:
        got = acts.setdefault(int(unit), [])
        got.extend([None] * (int(copy) + 1 - len(got)))
        got[int(copy)] = None if a is None else float(a)
        if doc is not None and int(unit) not in vectors:
            given = parsed.get(doc)
            if given is None:
                given = parsed[doc] = json.loads(doc).get("directions") or []
            vectors[int(unit)] = (
                [float(v) for v in given[int(unit)]] if int(unit) < len(given) else []
            )
    return [DirectionFeatViz(d, acts[d], vectors.get(d, [])) for d in sorted(acts)]


def featviz_images(run: Any) -> Iterator[tuple[str, str, int, int, bytes]]:
    """Every stored image as ``(layer name, objective, unit, copy, PNG bytes)`` (an export
    writes them all), one layer at a time."""
    if not run._has_table("featviz"):
        return
    for info in run.layers:
        rows = run._query(
            "SELECT objective, unit, copy, image FROM featviz WHERE layer_id = ? "
            "ORDER BY objective, unit, copy",
            (info.id,),
        )
        for objective, unit, copy, image in rows:
            yield info.name, str(objective), int(unit), int(copy), bytes(image)
