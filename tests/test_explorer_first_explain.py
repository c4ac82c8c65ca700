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
