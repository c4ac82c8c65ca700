"""A top list's tied tail, in a real browser (Debian's chromium via Playwright) over the
shared digits run probed with relevance:

a unit of the first Linear layer that feeds a dead ReLU carries no LRP relevance on any
sample, or on all but a few; its relevance list ends with samples of relevance 0, which
every sample where it carried nothing shares, so the probe fills them in by sample id
(#0, #1, ...). A teacher opening sample 5 of `make demo` was told 22 units of
classifier.1 "rank it" in their relevance lists, and unit 61's relevance tab showed
digits 0 to 5 as "where it carried the decision most".

- the sample page leaves those entries out and counts them as ties;
- the unit page dims them and says they are ties, keeping the samples that stand out.

Oracle: the run's store (each list's values and sample ids), read with numpy.
"""

from __future__ import annotations

from typing import Any

import pytest

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    get_json,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


def tail_length(values: list[float], k: int | None = None) -> int:
    """How many zeros end a full list of ``k`` (brute force): two or more, else none; a
    full list all of one value, whatever it is, is ties in whole."""
    if k is not None and len(values) < k:
        return 0
    n = 0
    for v in reversed(values):
        if v != values[-1]:
            break
        n += 1
    if n < 2 or (values[-1] != 0 and n < len(values)):
        return 0
    return n


@pytest.fixture(scope="module")
def lists(served: dict[str, Any]) -> dict[tuple[str, int, str], list[tuple[int, float]]]:
    """Every list of every unit that is not constant: (sample id, value) in rank order."""
    from lurker.store import Run

    out = {}
    with Run.open(served["run"].path) as run:
        for info in run.layers:
            for u in run.units(info.name):
                for which in run.top_lists:
                    out[(info.name, u.index, which)] = [
                        (e.sample_id, e.value) for e in u.top(which) if e.sample_id >= 0
                    ]
    return out


def test_relevance_list_zero_tail_is_dimmed_and_said(
    browser: Any, served: dict[str, Any], lists: dict[Any, Any]
) -> None:
    """The unit's document is rewritten in flight so that its relevance list ends in 3
    zeros (the demo's classifier.1 unit 61 ends in 6): the page's reading is tested."""
    layer, unit = "features.8", 0
    entries = lists[(layer, unit, "relevance")]
    assert tail_length([v for _, v in entries]) == 0  # the stored list has no tied tail

    def tail(route: Any) -> None:
        doc = route.fetch().json()
        for e in doc["top"]["relevance"][-3:]:
            e["value"] = 0.0
        doc["tied_tail"]["relevance"] = 3  # as the server counts such a list's tail
        route.fulfill(json=doc)

    with strict_page(browser, width=1280, height=800) as pg:
        pg.route(f"**/api/runs/*/layers/{layer}/units/{unit}", tail)
        pg.goto(f"{served['url']}/unit/{layer}/{unit}?tab=relevance")
        pg.wait_for_selector("#tied-tail")
        figs = pg.locator(".top-entry")
        assert figs.count() == len(entries)
        dimmed = [
            int(f.get_attribute("data-sample"))
            for f in figs.all()
            if "tied" in (f.get_attribute("class") or "").split()
        ]
        assert dimmed == [sid for sid, _ in entries[-3:]]
        said = pg.inner_text("#tied-tail")
        assert "The last 3 samples of this list (dimmed) have the value 0" in said
        assert "carried none of the decision" in said
        assert f"only the first {len(entries) - 3} stand out" in said
        assert pg.locator("#tied-list").count() == 0  # not the whole list
        # the max list of the same unit ends in no tie: no note, nothing dimmed
        pg.click('button[data-tab="max"]')
        pg.wait_for_function("() => !document.querySelector('#tied-tail')")
        assert pg.locator(".top-entry.tied").count() == 0


def test_unit_documents_count_the_tails_the_sample_pages_leave_out(
    served: dict[str, Any], lists: dict[Any, Any]
) -> None:
    """The unit page dims what the server counts as each list's tied tail, by the sample
    pages' rule (zeros ending a full list, in a run of more samples than it holds): it had
    its own rule, which dimmed zeros ending a list that was not full, so the two pages could
    disagree. Brute force over every list of every unit."""
    api = served["url"].replace("#/r/", "api/runs/")
    from lurker.store import Run

    with Run.open(served["run"].path) as run:
        k, samples = run.meta["k"], run.num_samples
    assert samples > k
    seen = 0
    for layer, unit in sorted({(layer, unit) for layer, unit, _ in lists}):
        doc = get_json(f"{api}/layers/{layer}/units/{unit}")
        for which in doc["tied_tail"]:
            want = tail_length([v for _, v in lists[(layer, unit, which)]], k)
            assert doc["tied_tail"][which] == want, (layer, unit, which)
            seen += want > 0
    assert seen, "the digits run should have tied tails"


def test_a_zero_tail_of_a_list_that_is_not_full_is_no_tie() -> None:
    """Fewer samples than the list holds, or a run no larger than it: every sample is
    listed, so its zeros rank (they are all the samples there are)."""
    from lurker.server.state import tied_tail_count

    assert tied_tail_count([3.0, 0.0, 0.0], 5, 100) == 0  # not full
    assert tied_tail_count([3.0, 2.0, 0.0, 0.0, 0.0], 5, 5) == 0  # the run is the list
    assert tied_tail_count([3.0, 2.0, 0.0, 0.0, 0.0], 5, 6) == 3
    assert tied_tail_count([3.0, 2.0, 1.0, 1.0, 1.0], 5, 100) == 0  # not zeros: they rank
    assert tied_tail_count([3.0, 2.0, 1.0, 0.0, None], 5, 100) == 0  # a NaN last


def test_sample_page_leaves_tied_tails_out(
    browser: Any, served: dict[str, Any], lists: dict[Any, Any]
) -> None:
    api = served["url"].replace("#/r/", "api/runs/")
    constant = {
        (layer, unit)
        for layer, unit, which in lists
        if which == "max" and get_json(f"{api}/layers/{layer}/units/{unit}")["constant"]
    }
    # the sample in the most tied tails (of units that are not constant; full lists only)
    k = max(len(entries) for entries in lists.values())
    in_tail: dict[int, int] = {}
    for (layer, unit, _), entries in lists.items():
        if (layer, unit) in constant:
            continue
        for sid, _ in entries[len(entries) - tail_length([v for _, v in entries], k) :]:
            in_tail[sid] = in_tail.get(sid, 0) + 1
    assert in_tail, "the digits run should have tied tails"
    sid = max(in_tail, key=lambda s: in_tail[s])
    # brute force: the lists that rank it, each tied tail cut off
    want = sorted(
        (layer, unit, which)
        for (layer, unit, which), entries in lists.items()
        if (layer, unit) not in constant
        and sid in [s for s, _ in entries[: len(entries) - tail_length([v for _, v in entries], k)]]
    )
    with strict_page(browser, width=1280, height=800) as pg:
        pg.goto(f"{served['url']}/sample/{sid}")
        pg.wait_for_selector("#left-out")
        got = sorted(
            (
                c.locator("xpath=ancestor::section[1]").get_attribute("data-layer"),
                int(c.get_attribute("data-unit")),
                c.get_attribute("data-list"),
            )
            for c in pg.locator(".chip").all()
        )
        assert got == want
        said = pg.inner_text("#left-out")
        assert "that are ties, ranked by sample id alone" in said
        left = sum(int(a.get_attribute("data-count")) for a in pg.locator("#left-out a").all())
        assert left >= in_tail[sid]
