"""Every PNG endpoint of the explorer answers alike: ``image/png``, how long the browser
may keep it (``Cache-Control``), and the map headers a page script reads (exposed to other
origins). The routes share one helper; this pins what each answers."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi.testclient import TestClient

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    ExplorerRun,
    explorer_run,
)

B = "/api/runs/digits"
LIVE = f"{B}/live/sample-3"
#: (URL, the X-Lurker-* headers it carries): every PNG route of the API
ROUTES = [
    (f"{B}/samples/3/image.png", []),
    (f"{B}/layers/{FEATVIZ_LAYER}/units/1/featviz/channel/0.png", []),
    (f"{B}/layers/features.4/units/2/max/0/input.png", []),
    (f"{B}/layers/features.4/units/2/max/0/crop.png", []),
    (f"{B}/layers/features.4/units/2/max/0/grad.png", []),
    (f"{B}/layers/features.0/filters.png", []),
    (f"{B}/layers/features.0/units/3/filter.png?scale=4", []),
    (f"{LIVE}/input.png", []),
    (f"{LIVE}/ops/conv2d_2/output/5.png", ["Scale", "Min", "Max", "Nonfinite"]),
    (f"{LIVE}/explain/saliency.png?target=1&overlay=0", ["Scale", "Min", "Max", "Target"]),
    (f"{LIVE}/explain/concepts/2.png?layer=features.4", ["Scale", "Min", "Max", "Target"]),
]


@pytest.fixture(scope="module")
def client(explorer_run: ExplorerRun) -> Any:  # noqa: F811
    from lurker.server import create_app

    with TestClient(create_app(explorer_run.path, model_obj=explorer_run.model)) as c:
        yield c


@pytest.mark.parametrize(("url", "mapped"), ROUTES, ids=[u for u, _ in ROUTES])
def test_a_png_route_answers_a_png_the_browser_asks_for_again(
    client: TestClient, url: str, mapped: list[str]
) -> None:
    from PIL import Image

    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    # the run's files revalidate (an ETag: 304 when unchanged); made images are made again
    assert r.headers["cache-control"] == "no-cache"
    Image.open(io.BytesIO(r.content)).verify()
    names = [f"X-Lurker-{n}" for n in mapped]
    assert sorted(k for k in r.headers if k.startswith("x-lurker-")) == sorted(
        n.lower() for n in names
    )
    if names:  # a page of another origin (an export's viewer) reads the map's scale and range
        assert r.headers["access-control-expose-headers"] == ", ".join(names)
        assert int(r.headers["x-lurker-scale"]) >= 1
        assert float(r.headers["x-lurker-min"]) <= float(r.headers["x-lurker-max"])
    else:
        assert "access-control-expose-headers" not in r.headers


def test_the_schema_says_every_png_route_answers_a_png(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    pngs = {p: v["get"] for p, v in paths.items() if p.endswith(".png")}
    assert len(pngs) == 11
    for p, op in pngs.items():
        assert op["responses"]["200"]["content"] == {"image/png": {}}, p
        assert op["summary"], p


def test_a_sample_image_is_the_image_the_live_view_shows(client: TestClient) -> None:
    """The same sample as the model saw it: the run's cached file and the live input."""
    assert client.get(f"{B}/samples/3/image.png").content == client.get(f"{LIVE}/input.png").content
