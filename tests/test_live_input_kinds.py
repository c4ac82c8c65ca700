"""Live and Explain on image models whose input is not a normalised 3-channel float
square: an upload is made into the tensor the probe's loader makes from the same file
(raw uint8 values, the dataset's own resize to a non-square size, 4 channels), so the
top-5 and the saliency are the model's own on it, or the upload is refused saying why."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from lurker.probe import probe
from lurker.server import create_app


class _Net(torch.nn.Module):
    """A conv and a linear head; ``raw``: takes uint8 images in 0..255 and scales them
    itself, as a deployed model may."""

    def __init__(self, channels: int = 3, raw: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.raw = raw
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)
        with torch.no_grad():  # logits far apart: a wrong input changes the top-5 visibly
            self.fc.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw:
            x = x.float() / 255
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    """Two classes of wide RGB photos (not the aspect ratio of any input below)."""
    root = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(2):
            y, x = np.mgrid[0:60, 0:120]
            px = np.stack([x * 2, y * 4, (x + y + 40 * i) % 255], -1) + g.integers(
                0, 40, (60, 120, 3)
            )
            Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def _served(tmp_path, net, ds, given: bool):
    probe(net, ds, out=tmp_path / "run", k=2, batch_size=2, progress=False).close()
    app = create_app(tmp_path / "run", model_obj=net, dataset=ds if given else None)
    return TestClient(app)


def _upload(client: TestClient, path) -> dict:
    r = client.post("/api/runs/run/live/images", files={"file": ("x.png", path.read_bytes())})
    assert r.status_code == 200, r.text
    return r.json()


def _oracle_probs(net, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        probs = torch.softmax(net(x[None]).float(), 1)[0]
    return probs.sort(descending=True).values.tolist()


@pytest.mark.parametrize("given", [False, True])
def test_a_raw_uint8_model_gets_the_uploads_raw_values(tmp_path, folder, given):
    net = _Net(raw=True).eval()
    ds = datasets.ImageFolder(folder, T.Compose([T.Resize(16), T.CenterCrop(16), T.PILToTensor()]))
    with _served(tmp_path, net, ds, given) as client:
        path, _ = ds.samples[1]
        body = _upload(client, folder / path)
        x = ds[1][0]  # what the probe fed: uint8
        assert x.dtype == torch.uint8
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, x), abs=1e-6)
        # saliency: the gradient w.r.t. the float image the model casts to, by hand
        ex = client.get(
            f"/api/runs/run/live/{body['image']}/explain/saliency", params={"target": "2"}
        )
        assert ex.status_code == 200, ex.text
        xf = x.float()[None].requires_grad_(True)
        net(xf)[0, 2].backward()
        heat = xf.grad[0].abs().sum(0)
        assert ex.json()["shape"] == [16, 16]
        assert ex.json()["sum"] == pytest.approx(float(heat.sum()), rel=1e-4)
        assert ex.json()["max"] == pytest.approx(float(heat.max()), rel=1e-4)
        # the pictures shown are the image, not its 0..255 values clipped to white
        want = x.permute(1, 2, 0).numpy().astype(int)
        urls = [f"/api/runs/run/live/{body['image']}/input.png"]
        urls += ["/api/runs/run/samples/1/image.png"] if given else []
        for url in urls:
            shown = Image.open(io.BytesIO(client.get(url).content)).convert("RGB")
            assert np.abs(np.asarray(shown).astype(int) - want).max() <= 1, url


def test_a_non_square_dataset_transform_is_the_uploads(tmp_path, folder):
    net = _Net().eval()
    ds = datasets.ImageFolder(folder, T.Compose([T.Resize((24, 40)), T.ToTensor()]))
    with _served(tmp_path, net, ds, True) as client:
        path, _ = ds.samples[2]
        body = _upload(client, folder / path)
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, ds[2][0]), abs=1e-6)
        ex = client.get(
            f"/api/runs/run/live/{body['image']}/explain/saliency", params={"target": "1"}
        )
        xf = ds[2][0][None].requires_grad_(True)
        net(xf)[0, 1].backward()
        assert ex.json()["shape"] == [24, 40]
        assert ex.json()["sum"] == pytest.approx(float(xf.grad.abs().sum()), rel=1e-4)


def _rgbd(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.mean(0, keepdim=True)])  # RGB + a "depth" channel


def test_a_four_channel_model(tmp_path, folder):
    net = _Net(channels=4).eval()
    ds = datasets.ImageFolder(
        folder, T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), _rgbd])
    )
    path, _ = ds.samples[0]
    with _served(tmp_path, net, ds, False) as client:  # no transform to make the 4th from
        r = client.post(
            "/api/runs/run/live/images", files={"file": ("x.png", (folder / path).read_bytes())}
        )
        assert r.status_code == 409 and "4 channels" in r.json()["detail"]
        assert "dataset=" in r.json()["detail"]
    with TestClient(create_app(tmp_path / "run", model_obj=net, dataset=ds)) as client:
        body = _upload(client, folder / path)
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, ds[0][0]), abs=1e-6)


def test_a_float64_model_gets_float64_uploads_and_samples(tmp_path, folder):
    """The probe fed float64 (the dataset's dtype, the model's): an upload and a sample
    are fed as such, not as float32, which the model's float64 weights refuse."""
    net = _Net().double().eval()
    ds = datasets.ImageFolder(
        folder, T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), lambda x: x.double()])
    )
    with _served(tmp_path, net, ds, False) as client:
        path, _ = ds.samples[3]
        body = _upload(client, folder / path)  # lurker's own resize and crop: the same here
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, ds[3][0]), abs=1e-6)
    with _served(tmp_path / "b", net, ds, True) as client:
        r = client.get("/api/runs/run/live/sample-3")
        assert r.status_code == 200, r.text
        got = [p["prob"] for p in r.json()["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, ds[3][0]), abs=1e-6)
        ex = client.get("/api/runs/run/live/sample-3/explain/saliency", params={"target": "0"})
        assert ex.status_code == 200, ex.text
        xf = ds[3][0][None].clone().requires_grad_(True)
        net(xf)[0, 0].backward()
        assert ex.json()["sum"] == pytest.approx(float(xf.grad.abs().sum()), rel=1e-6)


def test_an_in_memory_dataset_keeps_lurkers_resize(tmp_path, folder):
    """FakeData has a transform but no file loader (nor a resize): an upload of another
    size is resized and cropped by lurker, as before the dataset's transform was used."""
    net = _Net().eval()
    ds = datasets.FakeData(4, (3, 16, 16), 5, transform=T.ToTensor(), random_offset=0)
    probe(net, ds, out=tmp_path / "run", k=2, batch_size=2, progress=False).close()
    photo = folder / "a" / "0.png"
    oracle = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])(
        Image.open(photo).convert("RGB")
    )
    with TestClient(create_app(tmp_path / "run", model_obj=net, dataset=ds)) as client:
        body = _upload(client, photo)
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, oracle), abs=1e-6)


def test_a_pil_only_transform_is_fed_as_the_probe_feeds_it(tmp_path, folder):
    """A folder dataset whose transform stops at a PIL image: the probe turns it into a
    [0, 1] tensor, and so does an upload."""
    net = _Net().eval()
    ds = datasets.ImageFolder(folder, T.Compose([T.Resize((12, 20))]))
    with _served(tmp_path, net, ds, True) as client:
        path, _ = ds.samples[1]
        body = _upload(client, folder / path)
        x = torch.from_numpy(np.asarray(ds[1][0]).copy()).permute(2, 0, 1).float() / 255
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, x), abs=1e-6)


def test_a_random_transform_gives_each_upload_one_answer(tmp_path, folder):
    """Augmentation in the dataset's transform (a random crop and flip) would make the
    same upload's answer random: lurker's own resize and crop is used instead, said."""
    net = _Net().eval()
    ds = datasets.ImageFolder(
        folder,
        T.Compose(
            [T.RandomResizedCrop(16, scale=(0.2, 1)), T.RandomHorizontalFlip(), T.ToTensor()]
        ),
    )
    photo = folder / "b" / "1.png"
    oracle = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])(
        Image.open(photo).convert("RGB")
    )
    for sub in ("one", "two"):  # two servers: the upload is not just cached
        with _served(tmp_path / sub, net, ds, True) as client:
            body = _upload(client, photo)
            got = [p["prob"] for p in body["predictions"]]
            assert got == pytest.approx(_oracle_probs(net, oracle), abs=1e-6)
            assert "random" in body["input_note"]


def test_a_loader_that_checks_the_suffix_reads_the_upload(tmp_path, folder):
    """A loader guarded by torchvision's is_image_file, reading lazily (the transform
    opens the file): the upload is a .png file that exists while the transform runs."""
    from torchvision.datasets.folder import is_image_file

    def lazy_loader(path: str) -> str:
        if not is_image_file(path):
            raise ValueError(f"{path} is not an image file")
        return path  # lazy: the transform reads the file

    net = _Net().eval()
    opened = T.Lambda(lambda path: Image.open(path).convert("RGB"))
    tf = T.Compose([opened, T.Resize((24, 40)), T.ToTensor()])
    ds = datasets.ImageFolder(folder, tf, loader=lazy_loader)
    with _served(tmp_path, net, ds, True) as client:
        path, _ = ds.samples[2]
        body = _upload(client, folder / path)
        got = [p["prob"] for p in body["predictions"]]
        assert got == pytest.approx(_oracle_probs(net, ds[2][0]), abs=1e-6)
        assert body["input_note"] is None


def test_a_failing_loader_does_not_show_the_servers_temp_path(tmp_path, folder):
    def loader(path: str) -> Image.Image:
        raise OSError(f"cannot read {path}")

    net = _Net().eval()
    ok = datasets.ImageFolder(folder, T.Compose([T.Resize((24, 40)), T.ToTensor()]))
    probe(net, ok, out=tmp_path / "run", k=2, batch_size=2, progress=False).close()
    bad = datasets.ImageFolder(folder, ok.transform, loader=loader)
    with TestClient(create_app(tmp_path / "run", model_obj=net, dataset=bad)) as client:
        data = (folder / "a" / "0.png").read_bytes()
        r = client.post("/api/runs/run/live/images", files={"file": ("x.png", data)})
        assert r.status_code == 422
        assert "cannot read the upload" in r.json()["detail"]
        assert "/tmp" not in r.json()["detail"] and "upload.png" not in r.json()["detail"]


def test_the_randomness_check_of_two_uploads_at_once_does_not_mix_their_seeds():
    """The check seeds the process's global generators: two uploads at once (two runs'
    sessions) must not reseed each other mid-transform (a fixed transform read as random)
    nor leave the generators at another call's seed."""
    import threading
    import time

    from lurker.server.session import _seeded

    def draws() -> list[float]:
        a = torch.rand(1).item()
        time.sleep(0.2)  # another upload's check starts here
        return [a, torch.rand(1).item()]

    alone = _seeded(draws, 1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    got: dict[str, list[float]] = {}
    t = threading.Thread(target=lambda: got.setdefault("a", _seeded(draws, 1)))
    t.start()
    time.sleep(0.05)
    _seeded(lambda: (torch.rand(1), time.sleep(0.4)), 2)  # outlasts the first one
    t.join()
    assert got["a"] == alone
    assert torch.equal(torch.rand(3), before)  # the generators as they were
