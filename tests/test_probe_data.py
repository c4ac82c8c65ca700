"""Probe datasets: digits, wrapped datasets, and image folders that survive bad files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms

from lurker.errors import LurkerError
from lurker.probe.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ProbeDataset,
    Skipped,
    collate,
    denormalize,
    digits,
    image_folder,
    input_image,
    load_dataset,
    to_pil,
    wrap,
)

# ------------------------------------------------------------------ digits


def test_digits_shapes_labels_range() -> None:
    ds = digits(16)
    assert len(ds) == 1797
    assert isinstance(ds, ProbeDataset)
    img, label, sid = ds[5]
    assert img.shape == (1, 16, 16) and img.dtype == torch.float32
    assert sid == 5 and label == ds.labels[5]
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.paths is None and ds.skipped == []
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    assert sorted(set(ds.labels)) == list(range(10))
    imgs = torch.stack([ds[i][0] for i in range(0, len(ds), 7)])
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0 and imgs.max() > 0.9


def test_digits_native_size_is_exact_and_channels_repeat() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = digits(8)
    for i in (0, 100, 1796):
        img, label, _ = ds[i]
        assert torch.equal(img[0], torch.tensor(raw.images[i], dtype=torch.float32) / 16.0)
        assert label == int(raw.target[i])
    rgb = digits(24, channels=3)
    img = rgb[3][0]
    assert img.shape == (3, 24, 24)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.equal(img[0], digits(24)[3][0][0])


def test_digits_split_deterministic_and_disjoint() -> None:
    train, test = digits(8, split="train"), digits(8, split="test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert set(train.origin).isdisjoint(test.origin)
    assert sorted(train.origin + test.origin) == list(range(1797))
    again = digits(8, split="train")
    assert again.origin == train.origin
    assert torch.equal(again[10][0], train[10][0])
    assert digits(8, split="train", seed=1).origin != train.origin
    assert [train[i][2] for i in range(3)] == [0, 1, 2]  # ids are indices of this dataset
    with pytest.raises(LurkerError, match="split"):
        digits(8, split="val")
    with pytest.raises(LurkerError, match="channels"):
        digits(8, channels=2)


def test_digits_through_dataloader() -> None:
    ds = digits(12, channels=3, split="test")
    images, labels, ids = next(iter(DataLoader(ds, batch_size=32, collate_fn=collate)))
    assert images.shape == (32, 3, 12, 12)
    assert labels.dtype == torch.long and ids.tolist() == list(range(32))


# ------------------------------------------------------------------ wrap


def test_wrap_image_label_and_image_only() -> None:
    x = torch.rand(5, 3, 4, 4)
    w = wrap(TensorDataset(x, torch.arange(5) + 10))
    img, label, sid = w[2]
    assert torch.equal(img, x[2]) and label == 12 and sid == 2
    assert w.class_names == [] and w.paths is None and len(w) == 5

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[i]

    img, label, sid = wrap(Plain())[1]
    assert torch.equal(img, x[1]) and label == -1 and sid == 1
    ds = digits(8)
    assert wrap(ds) is ds


# ------------------------------------------------------------------ image folder


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: tuple[int, int] = (18, 22)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[Path]]:
    """root/{cat,dog}/ with 3 good images each, one random-bytes .jpg, one truncated JPEG."""
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        (root / name / "a.png").write_bytes(_png((200 * c, 50, 100)))
        (root / name / "b.jpg").write_bytes(_jpeg(c))
        (root / name / "c.jpeg").write_bytes(_jpeg(10 + c, (30, 30)))
    corrupt = root / "cat" / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(5).integers(0, 256, 600, dtype=np.uint8).tobytes())
    full = _jpeg(7, (40, 40))
    truncated = root / "dog" / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    return root, [corrupt, truncated]


def test_image_folder_skips_corrupt_up_front(tree: tuple[Path, list[Path]]) -> None:
    root, (corrupt, truncated) = tree
    ds = image_folder(root, 16)
    assert ds.class_names == ["cat", "dog"]
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD
    # random bytes fail the header check; the truncated JPEG has a valid header
    assert [p for p, _ in ds.skipped] == [str(corrupt)]
    assert "UnidentifiedImageError" in ds.skipped[0][1]
    assert len(ds) == 7 and ds.paths is not None and str(truncated) in ds.paths
    assert str(corrupt) not in ds.paths


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_dataloader_drops_bad_files(
    tree: tuple[Path, list[Path]], workers: int, verify: bool
) -> None:
    root, bad = tree
    ds = image_folder(root, 16, verify=verify)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    ids = torch.cat([b[2] for b in batches])
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert ds.paths is not None
    for i, label in zip(ids.tolist(), labels.tolist()):
        assert ds.targets[i] == label
        assert Path(ds.paths[i]).name in {"a.png", "b.jpg", "c.jpeg"}
    skipped = dict(ds.skipped)  # recorded in the main process even when workers hit them
    assert set(skipped) == {str(p) for p in bad}
    assert "truncated" in skipped[str(bad[1])]


def test_image_folder_item_and_collate_of_skipped(tree: tuple[Path, list[Path]]) -> None:
    root, (_, truncated) = tree
    ds = image_folder(root, 16)
    assert ds.paths is not None
    i = ds.paths.index(str(truncated))
    item = ds[i]
    assert isinstance(item, Skipped) and item.sample_id == i and item.path == str(truncated)
    images, labels, ids = collate([item])
    assert images.shape == (0, 3, 16, 16) and labels.numel() == 0 and ids.numel() == 0
    good = ds[0]
    assert not isinstance(good, Skipped)
    images, labels, ids = collate([good, item])
    assert images.shape == (1, 3, 16, 16) and ids.tolist() == [0]
    with pytest.raises(LurkerError, match="cannot be read"):
        input_image(ds, i)


def test_image_folder_grayscale(tree: tuple[Path, list[Path]]) -> None:
    root, _ = tree
    ds = load_dataset(str(root), 12, channels=1)
    item = ds[0]
    assert not isinstance(item, Skipped)
    assert item[0].shape == (1, 12, 12) and len(ds.mean) == 1
    assert input_image(ds, 0).mode == "L"


def test_image_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(LurkerError) as err:
        image_folder(missing)
    assert str(missing) in str(err.value) and "class_name" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loose.jpg").write_bytes(_jpeg(0))
    with pytest.raises(LurkerError) as err:
        image_folder(empty)
    assert str(empty) in str(err.value) and "class_name" in str(err.value)
    (empty / "cls").mkdir()
    (empty / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(LurkerError, match="class_name"):
        image_folder(empty)
    (empty / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(LurkerError, match="could be read"):
        image_folder(empty)


def test_wrap_plain_image_folder_finds_paths_and_normalize(tree: tuple[Path, list[Path]]) -> None:
    root, _ = tree
    t = transforms.Compose(
        [
            transforms.Resize((8, 8)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.2] * 3),
        ]
    )
    w = wrap(datasets.ImageFolder(str(root), transform=t))
    assert w.class_names == ["cat", "dog"] and w.paths is not None and len(w.paths) == 8
    assert w.mean == (0.5, 0.5, 0.5) and w.std == (0.2, 0.2, 0.2)
    img, label, sid = w[0]
    assert img.shape == (3, 8, 8) and label == 0 and sid == 0


# ------------------------------------------------------------------ load_dataset, display


def test_load_dataset(tree: tuple[Path, list[Path]]) -> None:
    root, _ = tree
    assert load_dataset("digits", 10)[0][0].shape == (1, 10, 10)
    assert load_dataset("digits", 10, channels=3)[0][0].shape == (3, 10, 10)
    assert len(load_dataset("digits:test", 8)) == 360
    folder = load_dataset(str(root), 16)
    assert folder.class_names == ["cat", "dog"]
    with pytest.raises(LurkerError, match="unknown dataset"):
        load_dataset("mnist-from-the-internet", 28)
    with pytest.raises(LurkerError, match="channels"):
        load_dataset(str(root), 16, channels=4)


def test_denormalize_and_to_pil(tree: tuple[Path, list[Path]]) -> None:
    root, _ = tree
    ds = image_folder(root, 14)
    assert ds.paths is not None
    i = ds.paths.index(str(root / "dog" / "a.png"))
    shown = input_image(ds, i)  # a flat colour survives resize, crop and normalisation
    assert shown.mode == "RGB" and shown.size == (14, 14)
    assert np.abs(np.asarray(shown).astype(int) - [200, 50, 100]).max() <= 1

    x = torch.rand(3, 5, 6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    normed = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(denormalize(normed, mean, std), x, atol=1e-6)
    assert denormalize(torch.full((1, 2, 2), 10.0), (0.0,), (1.0,)).max() == 1.0
    gray = to_pil(torch.tensor([[0.0, 1.0], [0.5, 0.25]]))
    assert gray.mode == "L" and np.asarray(gray).tolist() == [[0, 255], [128, 64]]
    rgb = to_pil(x)
    assert rgb.mode == "RGB" and rgb.size == (6, 5) and np.asarray(rgb).dtype == np.uint8
    with pytest.raises(LurkerError):
        to_pil(torch.rand(2, 4, 4))


def test_sample_rows_first_image_description(tree: tuple[Path, list[Path]]) -> None:
    root, (_, truncated) = tree
    test = digits(8, split="test")
    rows = test.sample_rows()
    assert len(rows) == 360 and rows[0] == (0, None, test.labels[0], test.origin[0])
    assert "digits:test" in test.description
    assert torch.equal(test.first_image(), test[0][0])
    folder = image_folder(root, 16)
    assert folder.paths is not None
    rows = folder.sample_rows()
    assert [r[1] for r in rows] == folder.paths and [r[2] for r in rows] == folder.targets
    assert [r[0] for r in rows] == [r[3] for r in rows] == list(range(len(folder)))
    assert folder.description == str(root) and str(truncated) in folder.paths
    assert folder.first_image().shape == (3, 16, 16)
    w = wrap(TensorDataset(torch.rand(3, 1, 2, 2), torch.tensor([2, -1, 0])))
    assert w.sample_rows() == [(0, None, 2, 0), (1, None, None, 1), (2, None, 0, 2)]
    assert w.description == "TensorDataset"
    assert wrap(TensorDataset(torch.rand(2, 1, 2, 2))).sample_rows()[1] == (1, None, None, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_images_of_different_shapes_name_the_samples_and_the_fix(tmp_path: Path, workers: int):
    """A torchvision ImageFolder whose transform keeps the aspect ratio (Resize(s) alone)
    gives images of several shapes; the batch cannot be stacked, and the error names two
    such samples with their shapes and the transform that fixes it, not torch.stack's."""
    for cls, sizes in (("a", [(20, 24), (20, 20)]), ("b", [(24, 20)])):
        (tmp_path / cls).mkdir()
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / cls / f"{i}.png")
    tf = transforms.Compose([transforms.Resize(16), transforms.ToTensor()])
    ds = wrap(datasets.ImageFolder(str(tmp_path), transform=tf))
    loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate)
    with pytest.raises(
        LurkerError,
        match=r"items 0 and 1 have images of shapes \(3, 16, 19\) and \(3, 16, 16\).*CenterCrop",
    ):
        next(iter(loader))


# ------------------------------------------------------------------ transparency


def _clear_tree(root: Path) -> dict[str, bool]:
    """root/{a,b}/ with RGBA PNGs (a transparent corner, or alpha 255 everywhere), a
    palette PNG whose colour key is used, an RGB PNG and a JPEG; by path, whether the file
    has a pixel that is not fully opaque (numpy over the decoded alpha: the oracle)."""
    rng = np.random.default_rng(3)
    files: dict[str, Image.Image] = {}
    for i in range(3):
        rgba = np.zeros((20, 24, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 256, (20, 24, 3))
        rgba[..., 3] = 255
        if i != 1:
            rgba[:6, :6, 3] = 40 * i  # a translucent (or clear) corner
        files[f"a/rgba{i}.png"] = Image.fromarray(rgba, "RGBA")
    pal = Image.fromarray(rng.integers(0, 4, (20, 24)).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.info["transparency"] = 2  # index 2 (green) is transparent
    files["b/palette.png"] = pal
    files["b/rgb.png"] = Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8), "RGB")
    files["b/photo.jpg"] = Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8), "RGB")
    clear = {}
    for rel, im in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, transparency=im.info["transparency"]) if im.mode == "P" else im.save(path)
        with Image.open(path) as back:
            alpha = np.asarray(back.convert("RGBA"))[..., 3]
        clear[str(path)] = bool((alpha < 255).any())
    return clear


@pytest.mark.parametrize("workers", [0, 1])
def test_image_folder_lists_files_whose_transparency_was_dropped(tmp_path: Path, workers: int):
    """Each file's alpha is checked as it is loaded (no second read): ``transparent`` lists
    the files with a pixel that is not fully opaque, in the main process whatever
    ``num_workers`` was, and ``skipped`` is not changed by it."""
    clear = _clear_tree(tmp_path / "imgs")
    want = sorted(p for p, c in clear.items() if c)
    assert len(want) == 3  # rgba0 (alpha 0), rgba2 (alpha 80), the palette's colour key
    ds = image_folder(tmp_path / "imgs", 16)
    assert ds.transparent == []  # nothing loaded yet
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "open", counting_open)
        batches = list(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate))
    assert sum(len(b[0]) for b in batches) == 6
    assert sorted(ds.transparent) == want
    assert ds.skipped == []
    if workers == 0:  # one open per file: the alpha is read from the image being loaded
        assert sorted(opened) == sorted(clear)


def test_probe_reports_transparent_files_once_in_meta_and_a_warning(tmp_path: Path):
    from lurker.probe import probe

    clear = _clear_tree(tmp_path / "imgs")
    want = sorted(p for p, c in clear.items() if c)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(784, 2)
    )
    ds = image_folder(tmp_path / "imgs", 16)
    with pytest.warns(UserWarning) as caught:
        run = probe(model, ds, out=tmp_path / "run", k=2, batch_size=4, progress=False)
    assert run is not None
    said = [str(w.message) for w in caught if "transparency" in str(w.message)]
    assert len(said) == 1  # once per run
    assert said[0].startswith("probe: 3 images of the folder have transparency (")
    assert Path(want[0]).name in said[0] and Path(want[1]).name in said[0]
    assert run.meta["transparent_images"] == {"count": 3, "examples": want[:2]}
    assert run.skipped == []
    run.close()
    # a dataset the probe does not decode itself (a wrapped one): not checked, not "0"
    opaque = wrap(TensorDataset(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])))
    r2 = probe(model, opaque, out=tmp_path / "r2", k=2, progress=False)
    assert r2 is not None and r2.meta["transparent_images"] is None
    r2.close()


class _Stop(BaseException):
    """An interruption of the sweep (as a kill would be), after a checkpoint."""


def test_a_resumed_probe_still_counts_the_files_of_the_interrupted_part(tmp_path: Path):
    """The files whose transparency was dropped before an interruption are kept in the
    checkpoint: the resumed call (a new dataset object, which loads only the rest) reports
    all of them, not only those it loaded itself."""
    from lurker.probe import probe
    from lurker.probe.data import ImageFolderDataset

    clear = _clear_tree(tmp_path / "imgs")
    want = sorted(p for p, c in clear.items() if c)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(784, 2)
    )

    class Stopping(ImageFolderDataset):
        def __getitem__(self, index: int) -> Any:
            if index == 4:
                raise _Stop
            return super().__getitem__(index)

    ds = Stopping(tmp_path / "imgs", 16)
    assert ds.paths is not None and [Path(p).name for p in ds.paths[:4]] == [
        "rgba0.png", "rgba1.png", "rgba2.png", "palette.png",
    ]  # fmt: skip
    kw: dict[str, Any] = dict(out=tmp_path / "run", k=2, batch_size=2, progress=False)
    with pytest.raises(_Stop):
        probe(model, ds, checkpoint_every=1, **kw)
    fresh = image_folder(tmp_path / "imgs", 16)
    with pytest.warns(UserWarning, match="3 images of the folder have transparency"):
        run = probe(model, fresh, **kw)
    assert run is not None and run.meta["sweep"]["resumed_from"] == 4
    assert sorted(fresh.transparent or []) == [want[0]]  # what this call loaded itself
    assert run.meta["transparent_images"] == {"count": 3, "examples": want[:2]}
    run.close()


# ------------------------------------------------------------------ awkward real files


def test_an_empty_class_folder_is_a_class_without_samples_not_an_error(tmp_path: Path) -> None:
    """One empty class folder (a class with no validation images yet) made the whole folder
    "no images found"; the other classes keep their sorted-folder indices, as a model
    trained with torchvision's ImageFolder on the full tree numbers them."""
    root = tmp_path / "imgs"
    for name, color in [("ant", (200, 0, 0)), ("cat", (0, 0, 200))]:
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(_png(color))
    (root / "bee").mkdir()  # sorts between the two
    with pytest.warns(UserWarning, match=r"1 class folder \(bee\) holds no images"):
        ds = image_folder(root, 8)
    assert ds.class_names == ["ant", "bee", "cat"]
    assert [Path(p).parent.name for p in ds.paths or []] == ["ant", "cat"]
    assert ds.labels_list() == [0, 2]  # cat is class 2, as sorted folders number it
    assert ds[1][1] == 2
    (root / "ant" / "x.png").unlink()
    (root / "cat" / "x.png").unlink()
    with pytest.raises(LurkerError, match=r"its class folders \(ant, bee, cat\) hold no files"):
        image_folder(root, 8)


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path: Path) -> None:
    """Pillow's convert("RGB") clips a 16-bit grayscale PNG at 255: every pixel above 255
    of 65535 was fed as white. Oracle: the same values divided by 257 (numpy)."""
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "imgs" / "a" / "deep.png")
    assert Image.open(path).mode.startswith("I")  # a 16-bit file, as Pillow reads it
    want = np.rint(values / 257.0).astype(np.float32) / 255.0
    ds = image_folder(tmp_path / "imgs", 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = ds[0][0]
    assert image.shape == (3, 16, 16)
    for c in range(3):  # grey in every channel, every level kept
        np.testing.assert_allclose(image[c].numpy(), want, atol=1e-6)
    gray = image_folder(tmp_path / "imgs", 16, mean=(0.0,), std=(1.0,), channels=1)
    np.testing.assert_allclose(gray[0][0][0].numpy(), want, atol=1e-6)


def test_float_images_are_read_in_their_range_and_others_skipped_by_name(tmp_path: Path) -> None:
    """A float TIFF in [0, 1] is scaled by 255 (Pillow clips it to black); one whose values
    have no image reading is skipped with a reason that says so, not fed clipped."""
    unit = np.linspace(0, 1, 8 * 8, dtype=np.float32).reshape(8, 8)
    _save(Image.fromarray(unit, "F"), tmp_path / "imgs" / "a" / "unit.tif")
    _save(Image.fromarray(unit * 1000 - 1, "F"), tmp_path / "imgs" / "a" / "wild.tif")
    # float rounding just below 0 is a 0, not a reason to skip the file
    _save(Image.fromarray(unit - 1e-7, "F"), tmp_path / "imgs" / "b" / "rounded.tif")
    ds = image_folder(tmp_path / "imgs", 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    item = ds[0]
    np.testing.assert_allclose(item[0][0].numpy(), np.rint(unit * 255) / 255, atol=1e-6)
    assert isinstance(ds[1], Skipped) and "values from -1.0" in ds[1].reason
    np.testing.assert_allclose(ds[2][0][0].numpy(), np.rint(unit * 255) / 255, atol=1e-6)
    assert [Path(p).name for p, _ in ds.skipped] == ["wild.tif"]
