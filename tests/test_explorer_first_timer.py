"""What a first-time viewer (a teacher) needs said on the Live and Explain pages, in a real
browser (Debian's chromium via Playwright) over the shared digits run with its model:

- Live, for an upload: what preparing it did (its size and colours as sent -> the model's
  input size and channels, from the server), and a muted caveat that a prediction on a
  picture unlike the dataset means little; neither for a dataset sample;
- Explain: each method card says what the method computes (the method's own summary,
  not only a hover title), and integrated gradients' delta says what it is.

Oracles: the model's first convolution (its input channels), the run's recorded input
shape and the explain methods' registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


@pytest.mark.parametrize("width", [800, 1280])
def test_live_says_how_an_upload_was_prepared_and_that_it_is_unlike_the_data(
    browser: Any, served: dict[str, Any], tmp_path: Path, width: int
) -> None:
    from PIL import Image

    from lurker.store import Run

    with Run.open(served["run"].path) as run:
        channels, height, wide = (int(v) for v in run.meta["config"]["input_shape"])
    assert channels == served["run"].model.features[0].in_channels == 1
    path = tmp_path / "photo.png"
    Image.new("RGB", (120, 80), (200, 30, 40)).save(path)  # colour, wider than tall
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/live?image=sample-0")
        pg.wait_for_selector("#image-name")
        # a dataset sample: nothing was done to it, and it is the data the model learned
        assert pg.locator("#input-prepared").count() == 0
        assert pg.locator("#upload-caveat").count() == 0
        pg.set_input_files("#live-file", str(path))
        pg.wait_for_selector("#input-prepared")
        line = pg.inner_text("#input-prepared")
        assert "120x80, colour (RGB)" in line, line
        assert f"{wide}x{height}, grayscale (1 channel)" in line, line
        assert "shrunk" in line and "centre-cropped" in line and "grayscale" in line, line
        caveat = pg.locator("#upload-caveat")
        assert caveat.is_visible()
        assert "dataset" in caveat.inner_text() and "means little" in caveat.inner_text()
        assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")
        if width == 1280:
            pg.screenshot(path=str(tmp_path / "live.png"), full_page=True)


def _palette_with_transparent_entry() -> Any:
    from PIL import Image

    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 200, 50, 50] + [0] * 762)
    im.paste(1, (0, 0, 8, 16))
    im.info["transparency"] = 0  # palette entry 0 transparent (a PNG's tRNS chunk)
    return im


@pytest.mark.parametrize(
    "make, said",
    [
        # the model's own size, grey: kept as it is
        (
            lambda: ("L", (16, 16)),
            "Uploaded 16x16, grayscale: the model's input as it is, not resized.",
        ),
        # its short side is the model's already: cropped, not resized (review: said shrunk)
        (
            lambda: ("L", (16, 40)),
            "Uploaded 16x40, grayscale → the model's input 16x16, grayscale (1 channel): "
            "centre-cropped.",
        ),
        # a palette whose entry 0 is transparent: no alpha mode, but its alpha is dropped
        (
            _palette_with_transparent_entry,
            "Uploaded 16x16, colour (palette) → the model's input 16x16, grayscale (1 channel): "
            "converted to grayscale and transparency dropped.",
        ),
        (
            lambda: ("CMYK", (32, 32)),
            "Uploaded 32x32, colour (CMYK) → the model's input 16x16, grayscale (1 channel): "
            "shrunk and converted to grayscale.",
        ),
    ],
)
def test_upload_document_names_the_preparation(
    served: dict[str, Any], make: Any, said: str
) -> None:
    """The sentence comes from the server (what it did), not guessed by the page; a sample
    has none."""
    import io
    import json
    import urllib.request

    from PIL import Image

    base = served["url"].split("#")[0] + "api/runs/" + served["run"].path.name + "/live"
    made = make()
    image = made if isinstance(made, Image.Image) else Image.new(made[0], made[1], 90)
    buf = io.BytesIO()
    image.save(buf, "PNG" if image.mode != "CMYK" else "JPEG")
    boundary = "qf86boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="g.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + buf.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        base + "/images",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req) as r:
        doc = json.load(r)
    assert doc["prepared"] == said
    with urllib.request.urlopen(base + "/sample-0") as r:
        assert json.load(r)["prepared"] is None


def test_explain_cards_say_what_each_method_and_delta_is(
    browser: Any, served: dict[str, Any]
) -> None:
    from lurker.explain.base import METHODS

    with strict_page(browser, width=1280, height=800) as pg:
        pg.goto(served["url"] + "/explain?image=sample-0")
        pg.wait_for_selector(".explain-card[data-method=saliency] .method-summary")
        cards = pg.eval_on_selector_all(
            ".explain-card[data-method]:not(.unavailable)",
            "els => els.map(e => [e.dataset.method,"
            " e.querySelector('.method-summary')?.innerText ?? null])",
        )
        assert cards
        for name, text in cards:
            assert text == METHODS[name].summary, name
        pg.wait_for_selector(".explain-card[data-method=integrated_gradients] .delta-note")
        note = pg.inner_text(".explain-card[data-method=integrated_gradients] .delta-note")
        assert "completeness" in note and "baseline" in note
        # only where a delta is shown
        assert pg.locator(".explain-card[data-method=saliency] .delta-note").count() == 0
