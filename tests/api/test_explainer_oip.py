"""The explainer in-process against an Open Inference Protocol black box (a fake OIP server in an
httpx.MockTransport that runs the tiny black box, label-only): the URL alone selects the protocol, the
photo goes as tensors resized on the query path, queries equal the server's count, readiness and
failures map as for /predict. Also RequestOracle with boxes that do and do not take files.
Real kserve.ModelServer processes: tests/integration/test_oip_explainer.py."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from advexplain.services.explainer.app import create_app
from advexplain.services.explainer.service import RequestOracle
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.images import decode_photo
from advexplain.shared.oip import OipClassifier
from advexplain.shared.pixels import encode_png

CLASSES = ["defective", "functional"]
CLIENT = "explainer-oip"
MODEL_URL = "http://oip-box:8080/v2/models/blackbox"
PHOTO = (96, 80)  # width x height: neither model's size or aspect ratio


class FakeOipServer:
    """The tiny black box behind OIP v2 REST: FP32 NCHW [-1, 3, S, S] in, INT64 class indices out."""

    def __init__(self, model: LocalClassifier):
        self.model = model
        self.size = model.image_size
        self.images = 0
        self.shapes: list[list[int]] = []
        self.paths: list[str] = []
        self.clients: set[str | None] = set()
        self.ready_status = 200
        self.infer_status = 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        if path in ("/v2/health/ready", "/v2/models/blackbox/ready"):
            return httpx.Response(self.ready_status, json={"ready": self.ready_status == 200})
        if request.method == "GET" and path == "/v2/models/blackbox":
            return httpx.Response(200, json={"name": "blackbox", "inputs": [
                {"name": "images", "datatype": "FP32", "shape": [-1, 3, self.size, self.size]}]})
        if request.method == "POST" and path == "/v2/models/blackbox/infer":
            if self.infer_status != 200:
                return httpx.Response(self.infer_status, json={"error": "model not ready"})
            tensor = json.loads(request.content)["inputs"][0]
            self.clients.add(request.headers.get("X-Client-Id"))
            self.shapes.append(tensor["shape"])
            x = torch.tensor(np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"]))
            labels = self.model.predict_proba(x).argmax(1)
            self.images += len(labels)
            return httpx.Response(200, json={"outputs": [{"name": "labels", "datatype": "INT64",
                                                          "shape": [len(labels)], "data": labels.tolist()}]})
        return httpx.Response(404, json={"error": f"no route {path}"})


@pytest.fixture(scope="module")
def local(tiny_models) -> LocalClassifier:
    return LocalClassifier.from_checkpoint(tiny_models["blackbox"])


@pytest.fixture
def server(local) -> FakeOipServer:
    return FakeOipServer(local)


@pytest.fixture
def explainer(server, tiny_models):
    settings = ExplainerSettings(surrogate=[tiny_models["surrogate"]], blackbox_url=MODEL_URL, client_id=CLIENT,
                                 device="cpu", threads=1)
    http = httpx.Client(transport=httpx.MockTransport(server))
    with TestClient(create_app(settings, blackbox_client=http)) as client:
        yield client


def photo_png(cell: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cell.permute(1, 2, 0).numpy()).resize(PHOTO, Image.Resampling.LANCZOS).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mistakes(local) -> list[tuple[bytes, str]]:
    """(PNG at 96x80, true label) of photos the OIP box gets wrong, judged as the explainer sends them."""
    from advexplain.shared.data import load_photos

    photos = load_photos("elpv", "validation")
    box = OipClassifier(MODEL_URL, CLASSES, client=httpx.Client(transport=httpx.MockTransport(FakeOipServer(local))))
    found = []
    for i in range(len(photos)):
        data = photo_png(photos.photos[i])
        if int(box.predict_proba(decode_photo(data, 10**8).image.unsqueeze(0)).argmax()) != photos.labels[i]:
            found.append((data, CLASSES[photos.labels[i]]))
            if len(found) == 4:
                return found
    raise AssertionError("the tiny black box should get some photos wrong")


def test_an_oip_url_makes_the_explainer_speak_oip(explainer, server, mistakes):
    health = explainer.get("/healthz")
    assert health.status_code == 200 and health.json()["blackbox"] == "ok", health.text
    successes = 0
    for data, label in mistakes:
        before = server.images
        resp = explainer.post("/explain", files={"image": ("x.png", data, "image/png")}, data={"label": label})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["queries"] == server.images - before, "queries must equal the server's own count"
        assert body["original_prediction"] != label and (body["width"], body["height"]) == PHOTO
        adversarial = base64.b64decode(body["images"]["adversarial"])
        assert Image.open(io.BytesIO(adversarial)).size == PHOTO
        if body["success"]:
            successes += 1
            check = OipClassifier(MODEL_URL, CLASSES, client_id=CLIENT,
                                  client=httpx.Client(transport=httpx.MockTransport(server)))
            assert (
                CLASSES[int(check.predict_proba(decode_photo(adversarial, 10**8).image.unsqueeze(0)).argmax())] == label
            )
    assert successes >= 1
    # Only the OIP routes were used, and every image went as a tensor at the model's size.
    assert not any(path in ("/predict", "/healthz") for path in server.paths)
    assert all(shape[1:] == [3, server.size, server.size] for shape in server.shapes)
    assert server.clients == {CLIENT}


def test_readiness_and_failures_map_as_for_predict(explainer, server, mistakes):
    server.ready_status = 503
    health = explainer.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "/v2/health/ready answered 503" in health.json()["blackbox_detail"]
    server.ready_status, server.infer_status = 200, 503
    data, label = mistakes[0]
    resp = explainer.post("/explain", files={"image": ("x.png", data, "image/png")}, data={"label": label})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "blackbox_unavailable"
    server.infer_status = 500
    resp = explainer.post("/explain", files={"image": ("x.png", data, "image/png")}, data={"label": label})
    assert resp.status_code == 502, resp.text


# -- RequestOracle: the upload's own bytes only for a box that takes files ----------------------

class FilesBox:
    """A /predict-like box: predict_files for encoded files, predict_proba for tensors."""

    classes = ("a", "b")

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def predict_files(self, files):
        self.calls.append(("files", list(files)))
        return torch.tensor([[1.0, 0.0]] * len(files))

    def predict_proba(self, x):
        self.calls.append(("tensor", x.clone()))
        return torch.tensor([[0.0, 1.0]] * x.shape[0])


class TensorBox(FilesBox):
    """A box that takes tensors only (an OIP model, or any Classifier)."""

    predict_files = None


def test_request_oracle_sends_the_upload_once_to_a_box_that_takes_files():
    photo = torch.rand(3, 7, 5)
    upload = encode_png(photo)
    box = FilesBox()
    oracle = RequestOracle(box, photo, upload)
    oracle.predict_proba(photo.unsqueeze(0))
    oracle.predict_proba(photo.unsqueeze(0))
    assert [kind for kind, _ in box.calls] == ["files", "tensor"] and box.calls[0][1] == [upload]
    assert oracle.images == 2 and oracle.classes == box.classes


def test_request_oracle_sends_the_photo_tensor_to_a_box_without_files():
    photo = torch.rand(3, 7, 5)
    before = photo.clone()
    box = TensorBox()
    oracle = RequestOracle(box, photo, encode_png(photo))
    oracle.predict_proba(photo.unsqueeze(0))
    oracle.predict_proba(torch.rand(2, 3, 7, 5))
    assert [kind for kind, _ in box.calls] == ["tensor", "tensor"]
    assert torch.equal(box.calls[0][1][0], photo) and torch.equal(photo, before)
    assert oracle.images == 3


def test_request_oracle_without_an_upload_sends_tensors():
    photo = torch.rand(3, 4, 4)
    box = FilesBox()
    oracle = RequestOracle(box, photo, None)  # a downscaled upload: its bytes are not what is explained
    oracle.predict_proba(photo.unsqueeze(0))
    assert [kind for kind, _ in box.calls] == ["tensor"] and oracle.images == 1
