"""A teacher opening the explorer on the demo's digits run for the first time, in a real
browser (Debian's chromium via Playwright) at 1280 px:

- the Home page's count of cached images, which grows as pages are viewed, says so in
  its label and its hover title (and how to make them ahead of time), rather than a bare
  number that changes unexplained;
- each Explain card's title keeps its "signed" / ">= 0" tag on the title's line
  ("Integrated gradients" was long enough to push it onto a second one).

Oracles: the run's own summary (the count the server reports) and the boxes the browser
lays out.
"""

from __future__ import annotations

from typing import Any

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    get_json,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


def test_home_says_the_cached_image_count_grows_as_pages_are_viewed(
    browser: Any, served: dict[str, Any]
) -> None:
    count = get_json(served["api"])["holds"]["cached_images"]
    with strict_page(browser, width=1280, height=900) as pg:
        pg.goto(served["url"])
        pg.wait_for_selector("dl.facts dt")
        labels = pg.eval_on_selector_all("dl.facts dt", "els => els.map(e => e.textContent)")
        assert "images cached so far" in labels and "cached images" not in labels
        value = pg.locator("dd .cached-images")
        assert value.inner_text().startswith(f"{count:,}")
        title = value.get_attribute("title")
        assert "first view" in title and "lurker images RUN" in title


def test_explain_card_titles_keep_their_tag_on_one_line(
    browser: Any, served: dict[str, Any]
) -> None:
    with strict_page(browser, width=1280, height=900) as pg:
        pg.goto(served["url"] + "/explain?image=sample-0")
        pg.wait_for_selector(".explain-card[data-method=integrated_gradients] h3 .name")
        rows = pg.eval_on_selector_all(
            ".explain-card[data-method]:not(.unavailable) h3",
            """els => els.map(h => {
                const n = h.querySelector('.name').getBoundingClientRect();
                const t = h.querySelector('.name + span').getBoundingClientRect();
                const line = parseFloat(getComputedStyle(h).lineHeight);
                return [h.closest('.explain-card').dataset.method, n.top, n.height, t.top, line];
            })""",
        )
        assert any(r[0] == "integrated_gradients" for r in rows)
        for method, name_top, name_height, tag_top, line in rows:
            # the title on one line, and the tag's top within it, not on a line below
            assert name_height < 1.5 * line, f"{method}: its title wraps at 1280 px"
            assert tag_top < name_top + line / 2, f"{method}: its tag wrapped below the title"


def test_explain_cards_show_the_settings_each_method_ran_with(
    browser: Any, served: dict[str, Any]
) -> None:
    """A researcher reproducing a heatmap in Python needs its settings on the card
    (before: only in the caption's hover title, never seen on a touch screen or a
    projector): every option the server's JSON gives, by name, LRP's per-op bookkeeping
    and the gamma-box options of another composite left out, a baseline of None said as
    zeros. Oracles: the JSON of each method and ``lurker.explain``'s own defaults."""
    import inspect

    import lurker

    def default(method: str, name: str) -> Any:
        compute = lurker.explain.METHODS[method].compute
        return inspect.signature(compute).parameters[name].default

    with strict_page(browser, width=1280, height=900) as pg:
        pg.goto(served["url"] + "/explain?image=sample-0")
        shown: dict[str, str] = {}
        for method in ("saliency", "integrated_gradients", "smoothgrad", "occlusion", "lrp"):
            line = pg.locator(f".explain-card[data-method={method}] .method-settings code")
            line.wait_for()
            shown[method] = line.inner_text()
    api = served["api"] + "/live/sample-0/explain"
    for method, text in shown.items():
        options = get_json(f"{api}/{method}.json?target=top")["options"]
        for key, value in options.items():
            if key in ("flows", "relevance_start", "relevance_input"):
                assert key not in text
            elif key in ("gamma", "low", "high"):
                assert f"{key}=" not in text  # epsilon_plus_flat reads none of them
            elif value is None:
                assert f"{key}=0 (zeros)" in text if key == "baseline" else f"{key}=" not in text
            else:
                assert f"{key}=" in text, (method, key, text)
    ig = shown["integrated_gradients"]
    assert f"n_steps={default('integrated_gradients', 'n_steps')}" in ig
    assert f"integration={default('integrated_gradients', 'integration')}" in ig
    assert "baseline=0 (zeros)" in ig
    assert "seed=0" in shown["smoothgrad"] and "stdev=0.15" in shown["smoothgrad"]
    assert shown["saliency"] == "abs=True"
    assert "composite=epsilon_plus_flat" in shown["lrp"] and "epsilon=1.00e-6" in shown["lrp"]
