"""A first-time user's gaps, in a real browser over the shared digits run:

- the output layer's units are named by their class (unit page, layer grid), and no
  other layer's;
- the graph's modules and probed-layer links are reached with the keyboard (Tab into the
  graph, arrow keys in execution order, Enter opens and closes a module and follows a
  probed layer's link), the item shown and scrolled into view;
- Live and Explain title an upload by its file's name, not its content hash.

Oracles: the run's graph (its output op, its module groups and probed ops in execution
order), its recorded class names, and the name of the file uploaded.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


def _output_layers(path: Path) -> tuple[str, str, list[str]]:
    """The probed layer whose op makes the model's output, a probed hidden Linear, and the
    class names, read from the run's graph and manifest."""
    from lurker.store import Run

    with Run.open(path) as run:
        graph = run.graph
        producer = graph.ops[graph.outputs[0].parents[0]].label
        output = next(layer.name for layer in run.layers if layer.op == producer)
        hidden = next(
            layer.name
            for layer in run.layers
            if layer.op != producer and graph[layer.op].name == "linear"
        )
        return output, hidden, list(run.classes)


def test_output_units_are_named_by_their_class(browser: Any, served: dict[str, Any]) -> None:
    output, hidden, classes = _output_layers(served["run"].path)
    assert len(classes) == 10
    with strict_page(browser, width=1100, height=800) as pg:
        pg.goto(served["url"] + f"/unit/{output}/4")
        pg.wait_for_selector("#output-class")
        text = pg.inner_text("#output-class")
        assert f"unit 4 — the score (logit) of class '{classes[4]}'" in text
        pg.goto(served["url"] + f"/layer/{output}?sort=index")
        pg.wait_for_selector(".unit-card .unit-class")
        names = pg.eval_on_selector_all(
            ".unit-card",
            "cs => cs.map(c => [+c.dataset.unit, c.querySelector('.unit-class')?.textContent])",
        )
        assert sorted(names) == [[u, f"class '{classes[u]}'"] for u in range(10)]
        assert "score (logit) of each class" in pg.inner_text("#class-units")
        # a hidden Linear is not the classes: no names, on its unit page or its grid
        pg.goto(served["url"] + f"/unit/{hidden}/4")
        pg.wait_for_selector(".unit-head h1")
        assert pg.locator("#output-class").count() == 0
        pg.goto(served["url"] + f"/layer/{hidden}")
        pg.wait_for_selector(".unit-card")
        assert pg.locator(".unit-class, #class-units").count() == 0


def _in_view(pg: Any) -> bool:
    """The keyboard's item is painted, ringed, and wholly inside the graph's view (an open
    module taller than the view: its title)."""
    return pg.evaluate(
        """() => {
        let k = document.querySelector('svg.graph .kb');
        if (!k) return false;
        if (k.matches('.frame')) k = k.querySelector('.title');
        const a = k.getBoundingClientRect(), b = document.querySelector('svg.graph').getBoundingClientRect();
        return a.top >= b.top && a.bottom <= b.bottom && a.left >= b.left && a.right <= b.right;
    }"""
    )


def test_graph_is_reachable_with_the_keyboard(browser: Any, served: dict[str, Any]) -> None:
    with urllib.request.urlopen(served["api"] + "/graph") as r:
        doc = json.load(r)
    features = next(g for g, gr in enumerate(doc["groups"]) if gr["p"] == "features")
    probed = [k for k, n in enumerate(doc["nodes"]) if n.get("L")]  # execution order
    first, last = probed[0], probed[-1]
    assert doc["nodes"][first].get("m") and doc["nodes"][last]["L"] == "classifier.3"
    with strict_page(browser, width=1000, height=520) as pg:
        pg.goto(served["url"] + "/graph")
        pg.wait_for_selector(".graph-page[data-ready]")
        kb = lambda: pg.get_attribute(".graph-page", "data-kb")  # noqa: E731
        pg.focus(".graph-tools input[type=search]")
        for _ in range(3):  # search -> Fit -> Collapse -> the graph
            pg.keyboard.press("Tab")
        assert pg.evaluate("document.activeElement.matches('svg.graph')")
        # the first item in execution order: the features module (an open frame)
        assert kb() == f"g{features}" and _in_view(pg)
        pg.keyboard.press("Enter")  # closes it
        pg.wait_for_selector(f"svg.graph .box[data-k=g{features}]")
        assert kb() == f"g{features}"
        pg.keyboard.press("Enter")  # opens it again
        pg.wait_for_selector(f"svg.graph .frame[data-k=g{features}]")
        pg.keyboard.press("ArrowDown")  # into it: its first probed op
        assert kb() == f"n{first}" and _in_view(pg)
        assert pg.get_attribute("svg.graph .kb", "data-k") == f"n{first}"
        # the last probed layer is below the first view; End goes there and shows it
        pg.keyboard.press("End")
        assert kb() == f"n{last}"
        pg.wait_for_function("() => document.querySelector('svg.graph .kb') !== null")
        assert _in_view(pg)
        pg.keyboard.press("Enter")  # follows its link
        pg.wait_for_function("() => location.hash.endsWith('/layer/classifier.3')")


def test_uploads_are_titled_by_their_file_name(
    browser: Any, served: dict[str, Any], tmp_path: Path
) -> None:
    from PIL import Image

    path = tmp_path / "my cat.png"
    Image.new("L", (20, 20), 90).save(path)
    with strict_page(browser, width=1100, height=800) as pg:
        pg.goto(served["url"] + "/live?image=sample-0")
        pg.wait_for_selector("#image-name")
        assert pg.inner_text("#image-name") == "sample 0"
        pg.set_input_files("#live-file", str(path))
        pg.wait_for_function("() => /image=(?!sample)/.test(location.hash)")
        pg.wait_for_function(
            "() => document.querySelector('#image-name')?.textContent === 'my cat.png'"
        )
        image_id = pg.evaluate("new URLSearchParams(location.hash.split('?')[1]).get('image')")
        assert image_id and image_id not in pg.inner_text(".live-result")
        pg.click("#explain-this")
        pg.wait_for_selector(".explain-image #image-name")
        assert pg.inner_text(".explain-image #image-name") == "my cat.png"
