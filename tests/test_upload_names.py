"""An upload keeps its file's name, which the Live and Explain pages title it by (its id
is a content hash)."""

from __future__ import annotations

import io

import torch
from fastapi.testclient import TestClient

from explorer_fixtures import ExplorerRun, explorer_run  # noqa: F401
from lurker.server import create_app


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (16, 16), value).save(buf, format="PNG")
    return buf.getvalue()


def test_an_upload_is_named_by_its_file(explorer_run: ExplorerRun) -> None:  # noqa: F811
    torch.manual_seed(0)
    client = TestClient(create_app(explorer_run.path, model_obj=explorer_run.model))
    base = f"/api/runs/{explorer_run.path.name}/live"
    data = _png(40)
    # a client that sends a path (Windows or POSIX): its last part is the name
    up = client.post(f"{base}/images", files={"file": ("C:\\photos\\dog 1.png", data)}).json()
    assert up["name"] == "dog 1.png" and up["image"] != "dog 1.png"
    assert client.get(f"{base}/{up['image']}").json()["name"] == "dog 1.png"
    # the same file uploaded again under another name: the same image, the new name
    again = client.post(f"{base}/images", files={"file": ("a/b/cat.png", data)}).json()
    assert again["image"] == up["image"] and again["name"] == "cat.png"
    assert client.get(f"{base}/{up['image']}").json()["name"] == "cat.png"
    # a dataset sample has no file name
    assert client.get(f"{base}/sample-0").json()["name"] is None
