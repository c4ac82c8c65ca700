"""Rough edges of the explorer that users tripped over, in a real browser (Debian's
chromium via Playwright) over the shared digits run with its model attached, and the
graph view document they rest on:

- a sample page reached from a unit opens Live at that unit's op with the unit marked
  (it opened on the first probed op, whatever the user came from);
- Home's "in graph" links are coloured as links (they were grey, read as plain text);
- the layer page's kernels are numbered by unit and in the grid's order, and its note
  says in words what the run's pixel range means for them;
- on a phone (390x844) the charts' axis text stays at least 10 px (the charts shrank with
  their card to 7 px text);
- the graph page shows an op's call arguments (`training`, `eps`...) in its tooltip and
  under the bar for the selected op (tests/test_graph_call_args.py: the document).

Oracles: the run's layer records and the model's own modules (`training`, `eps`), read
apart from the page.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest
from torch import nn

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    explorer_run,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

PHONE = (390, 844)


def _op_of(api: str, layer: str) -> str:
    """The op the run's layer record names (the run summary, read apart from the page)."""
    import json
    import urllib.request

    layers = json.loads(urllib.request.urlopen(api).read())["layers"]
    return next(entry["op"] for entry in layers if entry["name"] == layer)


# ---------------------------------------------------------------------- browser

skip_without_browser()


def test_a_sample_reached_from_a_unit_opens_live_at_that_unit(
    browser: Any, served: dict[str, Any]
) -> None:
    unit = 2
    op = _op_of(served["api"], FEATVIZ_LAYER)
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"] + f"/unit/{FEATVIZ_LAYER}/{unit}?tab=max")
        link = pg.locator(".top-entry .sample-link").first
        link.wait_for()
        sample = link.inner_text().lstrip("#")
        link.click()
        pg.wait_for_selector("#open-live")
        href = pg.locator("#open-live").get_attribute("href")
        q = urllib.parse.parse_qs(href.split("?", 1)[1])
        assert q == {"image": [f"sample-{sample}"], "op": [op], "unit": [str(unit)]}, href
        pg.locator("#open-live").click()
        pg.wait_for_selector("#marked-unit img")
        assert pg.locator("#marked-unit").get_attribute("data-channel") == str(unit)
        # reached any other way (no unit in its query): Live's default, no unit marked
        pg.goto(served["url"] + f"/sample/{sample}")
        pg.wait_for_selector("#open-live")
        href = pg.locator("#open-live").get_attribute("href")
        assert urllib.parse.parse_qs(href.split("?", 1)[1]) == {"image": [f"sample-{sample}"]}
        # a unit the layer lacks is not passed on
        pg.goto(served["url"] + f"/sample/{sample}?layer={FEATVIZ_LAYER}&unit=100000")
        pg.wait_for_selector("#open-live")
        assert "unit=" not in pg.locator("#open-live").get_attribute("href")


def test_home_s_in_graph_links_look_like_links(browser: Any, served: dict[str, Any]) -> None:
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"])
        pg.wait_for_selector("table.layers a.graph-link")
        colour = pg.locator("table.layers a.graph-link").first.evaluate(
            "e => getComputedStyle(e).color"
        )
        layer = pg.locator("table.layers td a").first.evaluate("e => getComputedStyle(e).color")
        muted = pg.evaluate(
            "() => { const s = document.createElement('span'); s.className = 'muted';"
            " document.body.append(s); const c = getComputedStyle(s).color; s.remove(); return c; }"
        )
    assert colour == layer != muted, (colour, layer, muted)


def test_the_layer_s_kernels_are_numbered_and_in_the_grid_s_order(
    browser: Any, served: dict[str, Any]
) -> None:
    import json
    import urllib.request

    api = served["api"]
    layer = json.loads(urllib.request.urlopen(api + "/filters").read())["layers"][0]
    units = len(json.loads(urllib.request.urlopen(f"{api}/layers/{layer}/filters").read())["units"])
    order = "els => els.map(e => +e.dataset.unit)"
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"] + f"/layer/{layer}?sort=max")
        pg.wait_for_selector("#filters .filter-cell")
        pg.wait_for_function(
            f"document.querySelectorAll('.unit-grid .unit-card').length === {units}"
        )
        numbers = pg.eval_on_selector_all(
            "#filters .filter-cell",
            "els => els.map(e => [+e.dataset.unit, e.querySelector('.filter-num').textContent])",
        )
        assert sorted(u for u, _ in numbers) == list(range(units))
        assert all(str(u) == text for u, text in numbers), numbers
        by_max = pg.eval_on_selector_all(".unit-grid .unit-card", order)
        assert by_max != list(range(units))  # (else the test could not tell the orders apart)
        assert [u for u, _ in numbers] == by_max
        note = pg.locator("#filters").inner_text()
        assert "by max" in note
        # the pixel range in words, not "normalised as none (pixels in [0, 1])"
        assert "normalised as none" not in note and "0 (black) to 1 (white)" in note
        pg.locator(".toolbar button", has_text="index").click()
        pg.wait_for_function("document.querySelector('.filter-grid').dataset.order === 'index'")
        assert pg.eval_on_selector_all("#filters .filter-cell", order) == list(range(units))
        assert "In unit order" in pg.locator("#filters-order").inner_text()


# the smallest axis text on the page's charts, in CSS px as drawn (its font size times
# the scale the chart is drawn at)
SMALLEST_AXIS_TEXT = """() => Math.min(...[...document.querySelectorAll('svg.chart')].flatMap(svg => {
  const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
  return [...svg.querySelectorAll('.tick text, .axis-label text, text.label')]
    .map(t => parseFloat(getComputedStyle(t).fontSize) * scale);
}))"""


@pytest.mark.parametrize(
    ("path", "charts"),
    [(f"/unit/{FEATVIZ_LAYER}/1", 2), (f"/layer/{FEATVIZ_LAYER}", 1)],
    ids=["unit", "layer"],
)
def test_chart_axis_text_stays_readable_on_a_phone(
    browser: Any, served: dict[str, Any], path: str, charts: int
) -> None:
    with strict_page(browser, *PHONE) as pg:
        pg.goto(served["url"] + path)
        pg.wait_for_function("document.querySelectorAll('svg.chart .tick').length > 0")
        pg.wait_for_load_state("networkidle")
        assert pg.locator("svg.chart").count() == charts
        smallest = pg.evaluate(SMALLEST_AXIS_TEXT)
        width = pg.evaluate("document.documentElement.scrollWidth")
    assert smallest >= 10, f"axis text {smallest:.1f} px on a phone"
    assert width <= PHONE[0]


def test_the_graph_page_shows_an_op_s_call(browser: Any, served: dict[str, Any]) -> None:
    model = served["run"].model
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"] + "/graph?focus=batch_norm_1")
        pg.wait_for_selector(".graph-call")
        call = pg.locator(".graph-call").inner_text()
        assert call.startswith("batch_norm_1 batch_norm(")
        assert f"training={bn.training}" in call and f"eps={bn.eps}" in call
        assert pg.locator("svg.graph .train-badge").count() == 0  # an eval model's run
        node = pg.locator('svg.graph [data-k] >> text="batch_norm_1"').first
        node.hover()
        pg.wait_for_selector(".graph-tip:not([hidden])")
        tip = pg.locator(".graph-tip").inner_text()
        assert "call: batch_norm(" in tip and "training=False" in tip
