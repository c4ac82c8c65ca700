"""What a notebook cell ending in a lurker result shows: one readable line (a dataclass's
default repr printed every array, hundreds of lines) or, for images, a PNG grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import lurker
from lurker.examples import DigitsNet, digits_tensors
from lurker.map import make_map
from lurker.probe import probe


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    x, y = digits_tensors(16)
    x, y = x[:300], y[:300]
    data = torch.utils.data.TensorDataset(x, y)
    out = tmp_path_factory.mktemp("nb") / "run"
    run = probe(model, data, out=out, layers=["features.8"], k=4, progress=False, embed=True)
    return model, x, y, run


def _one_line(text: str) -> None:
    assert "\n" not in text and len(text) < 200, text


def test_a_map_and_an_embedding_are_one_line_with_their_facts(digits_run):
    """``m = run.map()`` ending a cell printed seven arrays and the meta (23 kB, 312 lines
    for 300 points); now one line: method, layer, points and, against the model's own
    predictions, how many are misclassified."""
    model, x, y, run = digits_run
    m = make_map(run, method="pca").map()
    e = run.embedding()
    with torch.no_grad():
        wrong = int((model(x).argmax(1) != y).sum())  # the oracle: the model itself
    _one_line(repr(m))
    _one_line(repr(e))
    assert repr(m) == (
        f"<MapData pca of {m.meta['layer']!r}: 300 points, 300 with a prediction, "
        f"300 labeled, {wrong} misclassified>"
    )
    assert repr(e) == (
        f"<Embedding of {e.meta['layer']!r}: 300 samples, features (300, "
        f"{e.features.shape[1]}) float16, 300 with a prediction>"
    )


def test_concepts_are_one_line_naming_the_top_units():
    """A ``Concepts`` ending a cell printed every tensor (heatmaps included: 64 lines for
    one digit); now one line with the layer, target and each row's top units."""
    torch.manual_seed(0)
    model = DigitsNet().eval()
    x, _ = digits_tensors(16)
    c = lurker.explain.concepts(model, x[:3], target=[3, 1, 4], layer="features.8", top=10)
    text = repr(c)
    assert "\n" not in text and len(text) < 300, text
    assert "'features.8'" in text and "target [3, 1, 4]" in text
    assert f"top units {str(c.units[0].tolist()[:8])[:-1]}, ...]" in text
    assert "(3 rows)" in text and f"heatmaps {tuple(c.heatmaps.shape)}" in text


def test_stored_featviz_shows_the_images_a_fresh_result_shows(digits_run):
    """``run.featviz(layer)`` ending a cell printed the activations and settings and no
    picture; it now shows the stored images as the same grid as the ``FeatViz`` stored."""
    model, _, _, run = digits_run
    fv = lurker.featviz(model, "features.8", units=[0, 1, 2], images_per_unit=2, steps=2, size=16)
    fv.save(run)
    stored = run.featviz("features.8")
    _one_line(repr(stored))
    assert (
        repr(stored)
        == "<StoredFeatViz 'features.8' channel: 3 units, 2 copies each, images 1x16x16>"
    )
    png = stored._repr_png_()
    assert png is not None and png.startswith(b"\x89PNG")
    grid = Image.open(io.BytesIO(png))
    assert grid.size == (2 * 66 - 2, 3 * 66 - 2)  # a row per unit, 16 px scaled to 64
    fresh = Image.open(io.BytesIO(fv._repr_png_()))
    assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(fresh.convert("RGB")))
    # each tile is the unit's image, scaled by nearest neighbour
    want = np.asarray(fv.image(2, 1).convert("RGB").resize((64, 64), Image.Resampling.NEAREST))
    assert np.array_equal(np.asarray(grid.convert("RGB"))[132:196, 66:130], want)


def test_a_runs_layers_are_short_lines(digits_run):
    """``run.layers`` ending a cell printed each layer's receptive-field record and layout
    (about 500 characters a layer); each is now its name, op, kind and units."""
    *_, run = digits_run
    layer = run.layer("features.8")
    assert layer.rf is not None and layer.rf["x"]["size"] > 1  # still there to read
    _one_line(repr(layer))
    assert repr(layer) == (
        f"LayerInfo(name='features.8', module='features.8', op={layer.op!r}, kind='Conv2d', "
        f"num_units=32, shape={layer.shape}, position=0)"
    )


def test_a_long_thin_image_is_not_zoomed_into_a_huge_grid():
    """A 4 x 200 image was zoomed 16 times to make its short side 64 px: four of them were
    a 12,806 px wide PNG. The zoom now stops where the long side would pass 512 px."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    fv = lurker.featviz(model, "0", units=[0, 1, 2, 3], steps=1, size=(4, 200))
    grid = Image.open(io.BytesIO(fv._repr_png_()))
    assert grid.size == (4 * (400 + 2) - 2, 8)  # zoom 2: 200 -> 400 (x 4 would pass 512)
    want = np.asarray(fv.image(3).convert("RGB").resize((400, 8), Image.Resampling.NEAREST))
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:, 3 * 402 :], want)
