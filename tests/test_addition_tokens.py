"""The tokens of what ``lurker featviz`` and ``lurker map`` add to a run (``Run.additions``,
``Run.featviz_tokens``): what the explorer's open pages poll to notice new results.

Each write stores a fresh token in the run's meta, in its own transaction, so reading them
is one meta row, never a scan of the featviz table (which grows with every image). Oracle:
the writes this test makes, in another process as ``lurker featviz`` would, and the SQL
the reader runs (a trace of its statements).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from explorer_fixtures import probe_digits

A, B = "features.4", "features.8"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    out = root / "d"
    probe_digits(out, root / "d.pt", k=3, embed=True)
    return out


def _write_elsewhere(out: Path, layer: str, seed: int) -> None:
    """``lurker featviz`` writing two units of ``layer``, in another process."""
    code = (
        "import sys, numpy as np\n"
        "from lurker.store.featviz import write_featviz\n"
        "px = np.random.default_rng(int(sys.argv[3])).integers(0, 255, (3, 8, 8), np.uint8)\n"
        "write_featviz(sys.argv[1], sys.argv[2], 'channel', "
        "[(0, 0, 1.0, px), (1, 0, 2.0, px)], {'seed': int(sys.argv[3])})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out), layer, str(seed)], check=True)


def _statements(run: object) -> list[str]:
    """Trace the SQL the run's connection runs from now on."""
    seen: list[str] = []
    run._conn.set_trace_callback(seen.append)  # type: ignore[attr-defined]
    return seen


def _reads_featviz_rows(sql: str) -> bool:
    """A statement that reads the featviz table's rows (its change counter is another)."""
    return re.search(r"\bFROM featviz\b(?!_)", sql) is not None


def test_a_featviz_write_changes_its_layers_token_and_nothing_else(run_dir: Path) -> None:
    from lurker.map import make_map
    from lurker.store import Run

    with Run.open(run_dir) as run:  # open across the writes, as the server holds it
        assert run.additions() == {"featviz": None, "map": None}
        assert run.featviz_tokens() == {}
        _write_elsewhere(run_dir, A, 0)
        first = run.featviz_tokens()
        assert set(first) == {A}
        adds = run.additions()
        assert adds["featviz"] is not None and adds["map"] is None
        assert run.additions() == adds and run.featviz_tokens() == first  # reading: the same
        _write_elsewhere(run_dir, B, 1)
        second = run.featviz_tokens()
        assert second[A] == first[A] and set(second) == {A, B}
        # the same images made again: the write is new, so is the token (the browser's
        # copy of the old picture must not be shown for it)
        _write_elsewhere(run_dir, B, 1)
        third = run.featviz_tokens()
        assert third[A] == first[A] and third[B] != second[B]
        before_map = run.additions()
        make_map(run_dir, method="pca").close()
        after_map = run.additions()
        assert after_map["map"] is not None and after_map["featviz"] == before_map["featviz"]
        assert run.featviz_tokens() == third
        make_map(run_dir, method="pca").close()  # the same map again: still a new write
        assert run.additions()["map"] != after_map["map"]
        # cheap: one meta row and the table's row count, never its rows
        seen = _statements(run)
        run.additions()
        run.featviz_tokens()
        assert seen and not [s for s in seen if _reads_featviz_rows(s)], seen


def test_a_run_written_before_the_tokens_still_has_exact_ones(tmp_path: Path) -> None:
    """A run whose featviz rows were written by a lurker without the stored tokens: its
    tokens are hashed from its rows (each layer its own), and the first write that stores
    them keeps the other layers' tokens as they were."""
    from lurker.store import Run
    from lurker.store.featviz import write_featviz

    out = tmp_path / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    px = np.zeros((1, 8, 8), np.uint8)
    for layer in (A, B):
        write_featviz(out, layer, "channel", [(0, 0, 1.0, px)], {"steps": 4})
    with sqlite3.connect(out / "run.db") as conn:  # as an older lurker left it
        conn.execute("DELETE FROM meta WHERE key = 'additions'")
    with Run.open(out) as run:
        old = run.featviz_tokens()
        assert set(old) == {A, B} and old[A] != old[B]
        assert run.additions()["featviz"] is not None
        assert run.featviz_tokens() == old  # (hashed again: the same)
        write_featviz(out, A, "channel", [(0, 0, 3.0, px)], {"steps": 8})
        now = run.featviz_tokens()
        assert now[B] == old[B] and now[A] != old[A]
        seen = _statements(run)
        run.featviz_tokens()
        assert not [s for s in seen if _reads_featviz_rows(s)], seen  # stored now: no scan


def test_a_reprobe_drops_the_tokens_with_the_images(tmp_path: Path) -> None:
    """``lurker probe --overwrite`` drops the feature visualizations: their tokens go too
    (a token of images the run no longer holds would say it holds some)."""
    from lurker.store import Run

    out, weights = tmp_path / "d", tmp_path / "d.pt"
    probe_digits(out, weights, k=3)
    _write_elsewhere(out, A, 0)
    with Run.open(out) as run:
        assert set(run.featviz_tokens()) == {A}
    probe_digits(out, weights, k=3, overwrite=True)
    with Run.open(out) as run:
        assert run.featviz_tokens() == {} and run.additions() == {"featviz": None, "map": None}


def test_writes_that_store_no_token_still_change_the_tokens(tmp_path: Path) -> None:
    """Rows or a map written by a lurker from before the tokens (which leaves the stored
    tokens as they were) still change them: the stored ones are trusted only while the
    featviz table is as the last token write left it, and the map's meta is in its token.
    A write of no images changes nothing."""
    from lurker.map import make_map
    from lurker.store import Run
    from lurker.store.featviz import write_featviz
    from lurker.store.writer import connect_rw

    out = tmp_path / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    px = np.zeros((1, 8, 8), np.uint8)
    write_featviz(out, A, "channel", [(0, 0, 1.0, px)], {"steps": 4})
    make_map(out, method="pca").close()
    with Run.open(out) as run:
        layers, adds = run.featviz_tokens(), run.additions()
        write_featviz(out, B, "channel", [], {"steps": 4})
        assert run.featviz_tokens() == layers and run.additions() == adds
        conn = connect_rw(out / "run.db")  # as an older lurker writes: rows alone, the
        try:  # unit's rows deleted and made again (the same rowid: the same row count)
            conn.execute("CREATE TEMP TABLE old AS SELECT * FROM featviz")
            conn.execute("DELETE FROM featviz")
            conn.execute(
                "INSERT INTO featviz (layer_id, objective, unit, copy, activation, shape, "
                "image, settings) SELECT layer_id, objective, unit, copy, 5.0, shape, image, "
                "settings FROM old"
            )
            conn.execute("UPDATE meta SET value = json_set(value, '$.seed', 7) WHERE key = 'map'")
        finally:
            conn.close()
        assert run.featviz_tokens()[A] != layers[A]
        now = run.additions()
        assert now["featviz"] != adds["featviz"] and now["map"] != adds["map"]


def test_a_featviz_table_an_older_lurker_made_again_is_read_from_its_rows(tmp_path: Path) -> None:
    """An older lurker's re-probe drops the featviz table (and its change triggers) but not
    the stored tokens; its featviz then makes the table again, without triggers: the tokens
    are hashed from the rows, not the stored ones trusted."""
    from lurker.store import Run
    from lurker.store.featviz import DDL, write_featviz
    from lurker.store.writer import connect_rw

    out = tmp_path / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    px = np.zeros((1, 8, 8), np.uint8)
    write_featviz(out, A, "channel", [(0, 0, 1.0, px)], {"steps": 4})
    with Run.open(out) as run:
        stored = run.featviz_tokens()
        conn = connect_rw(out / "run.db")
        try:
            conn.execute("DROP TABLE featviz")
            assert run.featviz_tokens() == {} and run.additions()["featviz"] is None
            conn.execute(DDL)
            layer_id = conn.execute("SELECT id FROM layers WHERE name = ?", (B,)).fetchone()[0]
            conn.execute(
                "INSERT INTO featviz VALUES (?, 'channel', 0, 0, 2.0, '[1, 8, 8]', x'00', '{}')",
                (layer_id,),
            )
        finally:
            conn.close()
        now = run.featviz_tokens()
        assert set(now) == {B} and now != stored


def test_a_write_after_an_older_lurkers_keeps_no_stale_token(tmp_path: Path) -> None:
    """An older lurker rewrites layer A's images (no token); the next write, of layer B,
    must not store A's token from before that rewrite (a page that knew it would keep the
    old images), but the token A's rows give now."""
    from lurker.store import Run
    from lurker.store.featviz import scan_featviz_tokens, write_featviz
    from lurker.store.writer import connect_rw

    out = tmp_path / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    px = np.zeros((1, 8, 8), np.uint8)
    write_featviz(out, A, "channel", [(0, 0, 1.0, px)], {"steps": 4})
    with Run.open(out) as run:
        first = run.featviz_tokens()[A]
    conn = connect_rw(out / "run.db")  # as an older lurker rewrites A: rows alone
    try:
        conn.execute("UPDATE featviz SET activation = 9.0")
        rows_now = scan_featviz_tokens(conn)[A]
    finally:
        conn.close()
    write_featviz(out, B, "channel", [(0, 0, 1.0, px)], {"steps": 4})
    with Run.open(out) as run:
        now = run.featviz_tokens()
        assert now[A] != first and now[A] == rows_now and set(now) == {A, B}
