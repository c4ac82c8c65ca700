"""`lurker probe --data` takes code that makes any dataset, as MODEL takes any model.

A text model (token ids) and a tabular one (feature vectors) are probed from the command
line with ``--data file.py:make_dataset``; the run records the spec (its file made
absolute), and serving the run with no dataset given (as `lurker serve RUN` does) shows
the tokens and feature values of its samples. Oracle: the tensors the dataset file makes,
loaded here on its own with runpy.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from lurker.cli import main

VOCAB, LENGTH, N, K = 12, 8, 24, 3
WORDS = ["<pad>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "x", "y"]

TEXT_FILE = f"""
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding({VOCAB}, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(self.emb(x).transpose(1, 2)).amax(2))


def build():
    return Text()


def make_dataset():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, {VOCAB}, ({N}, {LENGTH}), generator=g)
    return TensorDataset(ids, torch.arange({N}) % 2)


def not_a_dataset():
    return 42


def an_array():
    import numpy

    return numpy.zeros(({N}, {LENGTH}), dtype="int64")


def inputs_only():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, {VOCAB}, ({N}, {LENGTH}), generator=g))


def numpy_items():
    return [(x.numpy(), int(y)) for x, y in make_dataset()]


def named_items():
    return [{{"ids": torch.zeros({LENGTH}, dtype=torch.long), "y": 0}}] * 4


def broken():
    raise OSError("corpus.txt is missing")


def unseeded():
    ids = torch.randint(0, {VOCAB}, ({N}, {LENGTH}))  # other ids at every call
    return TensorDataset(ids, torch.arange({N}) % 2)
"""

TABLE_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Table(TensorDataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        super().__init__(torch.randn(30, 5, generator=g), torch.arange(30) % 3)
        self.feature_names = ["age", "height", "weight", "income", "score"]
        self.classes = ["low", "mid", "high"]


def build():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
"""


def _probe(*args: str) -> Any:
    return CliRunner().invoke(main, ["probe", *args, "-k", str(K), "-b", "8"])


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The dataset files in ``tmp_path/src``, the current directory while probing."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "text.py").write_text(TEXT_FILE)
    (src / "table.py").write_text(TABLE_FILE)
    monkeypatch.chdir(src)
    return src


def _serve(run: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> TestClient:
    """The run served with no dataset (as `lurker serve RUN`), from another directory."""
    from lurker.server import create_app

    monkeypatch.chdir(run.parent)  # the relative spec must not be what finds the file
    return TestClient(create_app(run, **kw))


def test_a_text_run_probed_from_a_file_spec_shows_its_tokens_when_served(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lurker.store import Run

    run = tmp_path / "runs" / "text"
    r = _probe("text.py:build", "--data", "text.py:make_dataset", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    with Run.open(run) as opened:
        recorded = opened.meta["config"]["data"]
        model_spec = opened.meta["config"]["model_spec"]
    assert recorded == f"{files / 'text.py'}:make_dataset"  # absolute: found from anywhere
    assert model_spec == f"{files / 'text.py'}:build"  # the model's file too
    ids = runpy.run_path(str(files / "text.py"))["make_dataset"]().tensors[0]
    with _serve(run, monkeypatch) as c:
        info = c.get("/api/runs/text").json()
        assert info["dataset"]["spec"] == recorded and info["dataset"]["size"] == N
        for unit in (0, 1, 3):
            doc = c.get(f"/api/runs/text/layers/conv/units/{unit}").json()
            assert doc["top"]["max"], doc
            for e in doc["top"]["max"] + doc["top"]["mean"]:
                assert e["tokens"] == ids[e["sample_id"]].tolist()
        layer = c.get("/api/runs/text/layers/conv").json()
        for u in layer["units"]:
            start = u["top_max_tokens_start"]  # the tokens around its peak
            window = ids[u["top_max"]][start : start + len(u["top_max_tokens"])]
            assert u["top_max_tokens"] and u["top_max_tokens"] == window.tolist()
        sample = c.get("/api/runs/text/samples/5").json()
        assert sample["tokens"] == ids[5].tolist()
        # the model loads from its recorded file, served from another directory
        assert sample["prediction"], sample["prediction_error"]


def test_a_tabular_run_probed_from_a_class_spec_shows_its_features_when_served(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "table"
    r = _probe("table.py:build", "--data", "./table.py:Table", "-o", str(run), "-l", "1")
    assert r.exit_code == 0, r.output
    data = runpy.run_path(str(files / "table.py"))["Table"]()
    rows = data.tensors[0].double()
    with _serve(run, monkeypatch) as c:
        ds = c.get("/api/runs/table").json()["dataset"]
        assert ds["feature_names"] == data.feature_names and ds["classes"] == data.classes
        unit = c.get("/api/runs/table/layers/1/units/2").json()
        assert unit["features_error"] is None and unit["top"]["max"]
        for e in unit["top"]["max"] + unit["top"]["mean"]:
            assert e["features"] == rows[e["sample_id"]].tolist()
        sample = c.get("/api/runs/table/samples/7").json()
        assert sample["features"] == rows[7].tolist() and sample["features_error"] is None


def test_the_vocab_option_stores_the_words_of_the_ids(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (files / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    run = tmp_path / "runs" / "words"
    r = _probe(
        "text.py:build", "-d", "text.py:make_dataset", "-o", str(run), "-l", "conv",
        "--vocab", "vocab.txt",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ids = runpy.run_path(str(files / "text.py"))["make_dataset"]().tensors[0]
    with _serve(run, monkeypatch) as c:
        assert c.get("/api/runs/words").json()["dataset"]["vocab_size"] == VOCAB
        doc = c.get("/api/runs/words/layers/conv/units/1").json()
        for e in doc["top"]["max"]:
            assert e["token_text"] == [WORDS[i] for i in ids[e["sample_id"]].tolist()]
        assert c.get("/api/runs/words/samples/4").json()["token_text"] == [
            WORDS[i] for i in ids[4].tolist()
        ]


def test_a_vocab_too_short_is_refused_before_the_sweep(files: Path, tmp_path: Path) -> None:
    (files / "short.txt").write_text("\n".join(WORDS[:5]) + "\n")
    run = tmp_path / "runs" / "short"
    r = _probe(
        "text.py:build", "-d", "text.py:make_dataset", "-o", str(run), "--vocab", "short.txt"
    )
    assert r.exit_code != 0 and "holds 5 tokens" in r.output, r.output
    assert "Traceback" not in r.output and not (run / "run.db").exists()


IMAGES_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(10, 3, 12, 12, generator=g), torch.arange(10) % 2)
"""


def test_an_image_size_for_a_dataset_made_by_code_is_refused_not_ignored(
    files: Path, tmp_path: Path
) -> None:
    """Items made by code are fed at their own size: --image-size 32 on 12x12 items used to
    be dropped silently, probing other images than the user asked for. It is refused, naming
    the fix, before the model is loaded; left out, the same probe runs at the items' size."""
    from lurker.store import Run

    (files / "images.py").write_text(IMAGES_FILE)
    run = tmp_path / "runs" / "images"
    args = ["images.py:build", "--data", "images.py:make_dataset", "-o", str(run)]
    r = _probe(*args, "--image-size", "32")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--image-size" in r.output and "resize in the dataset, or leave it out" in r.output
    assert not run.exists()
    r = _probe(*args)
    assert r.exit_code == 0, r.output
    with Run.open(run) as opened:
        assert opened.meta["image_size"] == [12, 12]


@pytest.mark.parametrize("spec", ["text.py:inputs_only", "text.py:numpy_items"])
def test_a_dataset_spec_takes_the_items_a_python_dataset_may_have(
    files: Path, tmp_path: Path, spec: str
) -> None:
    """``(input,)`` items (unlabelled) and numpy inputs, which ``lurker.probe`` takes from
    Python, were refused on the command line ("item 0 is a 1-item tuple, not an (input,
    label) pair"): probed alike, top samples as a forward hook over the items finds them."""
    import torch

    from lurker.store import Run

    run = tmp_path / "runs" / spec.partition(":")[2]
    r = _probe("text.py:build", "--data", spec, "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    made = runpy.run_path(str(files / "text.py"))
    torch.manual_seed(0)  # as lurker builds a random-init MODEL spec: the same weights
    model, data = made["build"](), made[spec.partition(":")[2]]()
    with Run.open(run) as opened:
        if spec.endswith("inputs_only"):
            assert opened.classes == []
        got: list[torch.Tensor] = []
        model.conv.register_forward_hook(lambda m, i, o: got.append(o[0].amax(-1)))
        with torch.no_grad():
            for item in data:
                model(torch.as_tensor(item[0])[None])
        peaks = torch.stack(got)
        for u in range(peaks.shape[1]):
            want = sorted(range(len(data)), key=lambda i: (-peaks[i, u].item(), i))[:K]
            assert [e.sample_id for e in opened.unit("conv", u).top("max")] == want


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("nowhere.py:make_dataset", r"file '.*nowhere\.py'.* does not exist"),
        ("text.py:make_datset", r"has no attribute 'make_datset'\. Did you mean 'make_dataset'"),
        ("no_such_pkg.data:make", r"module 'no_such_pkg\.data' could not be found"),
        (
            "text.py:not_a_dataset",
            r"gave an object of type int, not a dataset with __len__ and __getitem__",
        ),
        (  # (an array's rows are no (input, label) items: it raised a TypeError from deep
            # in the wrapper, reading its mean() method as normalisation statistics)
            "text.py:an_array",
            r"gave an object of type ndarray, not a dataset with __len__ and __getitem__",
        ),
        ("text.py:named_items", r"item 0 is a dict \(keys 'ids', 'y'\).*d\['image'\]"),
        ("text.py:broken", r"calling 'broken\(\)' raised OSError: corpus\.txt is missing"),
    ],
)
def test_a_bad_dataset_spec_is_said_in_one_paragraph(
    files: Path, tmp_path: Path, spec: str, said: str
) -> None:
    import re

    run = tmp_path / "runs" / "bad"
    r = _probe("text.py:build", "--data", spec, "-o", str(run))
    assert r.exit_code != 0
    assert re.search(f"Dataset spec '{re.escape(spec)}'.*{said}", r.output), r.output
    assert "Traceback" not in r.output and not (run / "run.db").exists()


def test_a_moved_dataset_file_is_said_by_the_server(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "moved"
    r = _probe("text.py:build", "--data", "text.py:make_dataset", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    (files / "text.py").rename(files / "elsewhere.py")
    with _serve(run, monkeypatch) as c:
        sample = c.get("/api/runs/moved/samples/0").json()
    assert sample["tokens"] is None  # said, not a 500 or a folder's "moved" message
    assert f"dataset file {files / 'text.py'} (of " in sample["tokens_error"]
    assert "does not exist here" in sample["tokens_error"]


def test_a_dataset_spec_that_makes_other_items_when_read_again_is_refused(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unseeded random dataset gives other ids each time it is made: the server would
    show them under the probe's numbers. The run records a fingerprint of a few items and
    the server refuses a dataset that no longer matches it, saying why."""
    run = tmp_path / "runs" / "unseeded"
    r = _probe("text.py:build", "--data", "text.py:unseeded", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    with _serve(run, monkeypatch) as c:
        doc = c.get("/api/runs/unseeded/layers/conv/units/0").json()
        assert all(e["tokens"] is None for e in doc["top"]["max"])
        assert "another dataset than the one probed" in doc["tokens_error"]
        assert "seed" in doc["tokens_error"]
        sample = c.get("/api/runs/unseeded/samples/3").json()
        assert sample["tokens"] is None and "seed" in sample["tokens_error"]
    # the seeded one (same call, same items) is served as before: the check passes
    monkeypatch.chdir(files)
    run = tmp_path / "runs" / "seeded"
    r = _probe("text.py:build", "--data", "text.py:make_dataset", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    with _serve(run, monkeypatch) as c:
        doc = c.get("/api/runs/seeded/layers/conv/units/0").json()
        assert doc["tokens_error"] is None and doc["top"]["max"][0]["tokens"]


def test_a_relative_spec_given_again_names_the_recorded_absolute_one(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lurker serve RUNS --model text.py:build` from the file's directory attaches to the
    runs that recorded it (absolute since the probe), and not from elsewhere."""
    from lurker.specs import absolute_spec, same_spec

    recorded = absolute_spec("text.py:build")
    assert recorded == f"{files / 'text.py'}:build"
    assert same_spec(recorded, "text.py:build") and same_spec(recorded, recorded)
    assert absolute_spec("torchvision:resnet18") == "torchvision:resnet18"
    monkeypatch.chdir(tmp_path)
    assert not same_spec(recorded, "text.py:build")  # another file, or none, here


def test_which_specs_are_code() -> None:
    from lurker.probe.data import is_code_spec

    for code in ("text.py:make", "C:\\src\\text.py:make", "pkg.data:make", "_data:make"):
        assert is_code_spec(code), code
    for not_code in ("digits", "digits:train", "C:\\data\\imgs", "a:b", "/data/imgs:v2"):
        assert not is_code_spec(not_code), not_code


def test_the_fingerprint_tells_a_changed_dataset_not_roundoff() -> None:
    """Made again on another machine, a standardised float dataset differs by roundoff
    (its sums are near 0): the same. Missing values (NaN) stay missing: the same. Other
    values, another kind of input, or an item that no longer reads: said, not a crash."""
    import torch
    from torch.utils.data import Dataset, TensorDataset

    from lurker.probe.data import fingerprint, fingerprint_differs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g)
    x = x - x.mean(0)  # zero-centred: each row's sum near 0
    y = torch.arange(40) % 3
    was = fingerprint(TensorDataset(x, y))
    ulp = x + torch.sign(x) * x.abs() * 2**-23  # one float32 ulp on every value
    assert fingerprint_differs(was, TensorDataset(ulp, y)) is None
    nan = x.clone()
    nan[:, 3] = float("nan")
    assert fingerprint_differs(fingerprint(TensorDataset(nan, y)), TensorDataset(nan, y)) is None
    other = x.clone()
    other[0, 5] += 0.5
    assert "item 0's input holds other values" in fingerprint_differs(was, TensorDataset(other, y))
    ints = TensorDataset((x * 10).long(), y)
    assert "another kind" in fingerprint_differs(was, ints)

    class Broken(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int):
            raise OSError("the corpus moved")

    assert "OSError: the corpus moved" in fingerprint_differs(was, Broken())


def test_a_finished_run_probed_again_from_another_directory_is_the_same_probe(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run names its dataset by the spec with its file absolute: the same file given
    by another relative path is the same dataset (was: 'holds a run ... with
    dataset='text.py:make_dataset ...', not 'src/text.py:make_dataset ...')."""
    run = tmp_path / "runs" / "again"
    r = _probe("text.py:build", "--data", "text.py:make_dataset", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)
    r = _probe(
        "src/text.py:build", "--data", "./src/text.py:make_dataset", "-o", str(run), "-l", "conv"
    )
    assert r.exit_code == 0, r.output
    assert "not '" not in r.output


def test_a_run_probed_from_a_relative_spec_can_be_mapped(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lurker map RUN` reloads the recorded (absolute) spec; the run described its dataset
    by the relative one typed, and the map refused it as "not the dataset the run was
    probed with" while naming the same spec twice."""
    from lurker.store import Run

    run = tmp_path / "runs" / "table"
    r = _probe("table.py:build", "--data", "table.py:Table", "-o", str(run))
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)  # from another directory, as a user maps it later
    r = CliRunner().invoke(main, ["map", str(run), "--method", "pca"])
    assert r.exit_code == 0, r.output
    with Run.open(run) as done:
        assert str(files / "table.py") in str(done.meta["dataset"])


def test_a_layers_feature_tiles_come_back_with_the_dataset(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer's feature tiles are cached per generation: a reason they are missing (the
    dataset file moved away) must not be cached with them, or the tiles stay missing once
    the file is back."""
    run = tmp_path / "runs" / "table"
    r = _probe("table.py:build", "--data", "table.py:Table", "-o", str(run), "-l", "1")
    assert r.exit_code == 0, r.output
    (files / "table.py").rename(files / "away.py")
    with _serve(run, monkeypatch) as c:
        layer = c.get("/api/runs/table/layers/1").json()
        assert layer["features"] is None and "does not exist here" in layer["features_error"]
        (files / "away.py").rename(files / "table.py")
        layer = c.get("/api/runs/table/layers/1").json()
        assert layer["features_error"] is None and layer["features"]


def test_a_code_dataset_with_missing_values_and_its_own_vocab(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN in a fingerprinted item crashed the probe writing the run's meta (strict
    JSON); a `--data file.py:fn` dataset's own `vocab` attribute was not read (the probe
    looked on lurker's wrapper)."""
    from lurker.store import Run

    (files / "gaps.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n"
        "def make_dataset():\n"
        "    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))\n"
        "    x[0, 2] = float('nan')\n"
        "    return TensorDataset(x, torch.arange(20) % 2)\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))\n"
        "class Worded(TensorDataset):\n"
        "    vocab = " + repr(WORDS) + "\n"
        "    def __init__(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        ids = torch.randint(0, "
        + str(VOCAB)
        + ", ("
        + str(N)
        + ", "
        + str(LENGTH)
        + "), generator=g)\n"
        "        super().__init__(ids, torch.arange(" + str(N) + ") % 2)\n"
    )
    run = tmp_path / "runs" / "gaps"
    r = _probe("gaps.py:build", "--data", "gaps.py:make_dataset", "-o", str(run), "-l", "1")
    assert r.exit_code == 0, r.output
    with _serve(run, monkeypatch) as c:  # the NaN stays NaN when made again: the same data
        sample = c.get("/api/runs/gaps/samples/0").json()
        assert sample["features_error"] is None and sample["features"][2] is None
    monkeypatch.chdir(files)
    run = tmp_path / "runs" / "worded"
    r = _probe("text.py:build", "--data", "gaps.py:Worded", "-o", str(run), "-l", "conv")
    assert r.exit_code == 0, r.output
    with Run.open(run) as opened:
        assert opened.meta["vocab"] == WORDS
