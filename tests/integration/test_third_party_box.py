"""A classifier the project did not train its way, served label-only by onnxruntime behind /predict only.

The box (bench/third_party_box.py) has another architecture, a 32x32 input reached by
resize-shorter-side + centre crop, ImageNet normalisation and another training split; it has no
/healthz and lists its classes nowhere. The explainer, distillation and evaluate must work
against it with nothing but /predict, on uploads at their own sizes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from advexplain.launch import ServiceProcess
from advexplain.shared.data import load_photos
from advexplain.shared.images import decode_photo
from advexplain.shared.saliency import photo_detail
from bench.third_party_box import train
from tests.commands import distill_surrogate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("defective", "functional")
# Uploads at sizes neither model uses, one of them a JPEG.
SIZES = [((150, 120), "PNG"), ((200, 170), "JPEG"), ((120, 150), "PNG")]


class ThirdPartyBox(ServiceProcess):
    """`python -m bench.third_party_box serve`: ready when /stats answers (it has no /healthz)."""

    def __init__(self, model: Path, **kwargs):
        super().__init__("thirdparty", [], health_path="/stats",
                         env={"PYTHONPATH": str(ROOT)}, **kwargs)
        self.model = model

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.third_party_box", "serve", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(self.port)]

    def counted(self) -> int:
        return httpx.get(f"{self.url}/stats", timeout=10).json()["images"]

    def predict(self, data: bytes) -> str:
        resp = httpx.post(f"{self.url}/predict", files={"image": ("x", data, "application/octet-stream")}, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()["predictions"][0]["label"]


@pytest.fixture(scope="module")
def box_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thirdparty") / "box"
    record = train("elpv", out, epochs=4, threads=1)
    assert record["classes"] == list(CLASSES)
    return out


@pytest.fixture
def box(box_model, tmp_path):
    proc = ThirdPartyBox(box_model, log_dir=tmp_path).start(timeout=90)
    yield proc
    proc.stop()


def upload_bytes(cell, size, fmt) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(cell.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.LANCZOS)
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mistakes(box: ThirdPartyBox, count: int) -> list[tuple[bytes, str, tuple[int, int]]]:
    photos = load_photos("elpv", "validation")
    found = []
    for i in range(len(photos)):
        size, fmt = SIZES[len(found) % len(SIZES)]
        data = upload_bytes(photos.photos[i], size, fmt)
        if box.predict(data) != CLASSES[photos.labels[i]]:
            found.append((data, CLASSES[photos.labels[i]], size))
            if len(found) == count:
                return found
    raise AssertionError("the third-party box should get some elpv photos wrong")


def test_the_explainer_needs_only_predict_and_explains_the_photo_itself(box, tiny_models, service_factory):
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url",
                                              box.url, "--client-id", "integration"]).start(timeout=90)
    health = httpx.get(f"{explainer.url}/healthz", timeout=10).json()
    assert health["status"] == "ready" and health["classes"] == list(CLASSES)
    successes = 0
    for data, label, size in mistakes(box, 4):
        before = box.counted()
        resp = httpx.post(f"{explainer.url}/explain", files={"image": ("photo", data, "application/octet-stream")},
                          data={"label": label, "max_queries": "30"}, timeout=120)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["queries"] == box.counted() - before, "queries must equal the box's own count"
        assert (body["width"], body["height"]) == size and not body["downscaled"]
        assert body["original_prediction"] != label
        images = {k: Image.open(io.BytesIO(base64.b64decode(v))) for k, v in body["images"].items()}
        assert images["adversarial"].size == images["saliency"].size == images["overlay"].size == size
        if body["success"]:
            successes += 1
            assert body["linf"] <= body["max_linf"]
            adversarial = base64.b64decode(body["images"]["adversarial"])
            assert box.predict(adversarial) == label, "the box itself must classify the returned PNG as the label"
            # The default map is the change's alignment with the upload's own detail, at the upload's
            # size: zero wherever the returned change moves the pixel against that detail.
            assert body["saliency"] == "detail"
            photo = decode_photo(data, 10**8).image
            change = decode_photo(adversarial, 10**8).image - photo
            dot = (change * photo_detail(photo)).sum(0).numpy()
            shown = np.asarray(images["saliency"].convert("L"))
            assert shown.any() and not shown[dot < -1e-5].any()
        else:
            assert body["failure_reason"] in ("max_queries", "max_linf")
    assert successes >= 1, "a label-only third-party box must be explainable"

    # `target` against a box we did not train: asked toward the class the box already answers, the
    # photo is already there (one query, counted by the box, no change) and the label stays the true one.
    data, label, _ = mistakes(box, 1)[0]
    said = box.predict(data)
    before = box.counted()
    body = httpx.post(f"{explainer.url}/explain", files={"image": ("photo", data, "application/octet-stream")},
                      data={"label": label, "target": said}, timeout=120).json()
    assert (body["label"], body["target"], body["already_correct"], body["success"]) == (label, said, True, True)
    assert body["queries"] == 1 == box.counted() - before and body["linf"] == 0.0


def test_concurrent_explanations_share_surrogate_passes_against_the_third_party_box(box, tiny_models,
                                                                                  service_factory):
    """Surrogate batching is not tied to our own box: four uploads at once against the ONNX box,
    their surrogate passes shared, every success one the box agrees with, queries = its counter."""
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url",
                                              box.url, "--client-id", "integration", "--max-concurrency", "4",
                                              "--surrogate-batch", "32"]).start(timeout=90)
    assert "surrogate batch 32" in explainer.log()
    uploads = mistakes(box, 4)
    before = box.counted()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda u: httpx.post(
            f"{explainer.url}/explain", files={"image": ("photo", u[0], "application/octet-stream")},
            data={"label": u[1]}, timeout=120), uploads))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert sum(b["queries"] for b in bodies) == box.counted() - before
    assert any(b["success"] for b in bodies)
    for body, (_, label, size) in zip(bodies, uploads, strict=True):
        assert (body["width"], body["height"]) == size
        if body["success"]:
            assert body["linf"] <= body["max_linf"]
            assert box.predict(base64.b64decode(body["images"]["adversarial"])) == label


def test_distillation_and_evaluate_need_only_predict(box, tiny_models, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "ADVEXPLAIN_THREADS": "1"}
    before = box.counted()
    out = tmp_path / "distilled"
    done = subprocess.run(
        distill_surrogate(box.url, out),
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "config.json").read_text())
    assert meta["distillation"]["queries"] == 150 == box.counted() - before
    assert meta["training"]["augment"] is False  # a distilled surrogate learns the box's answers as they are

    before = box.counted()
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "advexplain", "--threads", "1", "evaluate", "--data", "elpv",
                           "--split", "validation", "--surrogate", str(tiny_models["surrogate"]), "--blackbox-url",
                           box.url, "--limit", "2", "--quiet", "--out", str(report)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    lines = [json.loads(line) for line in (report / "explanations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["size"] == [300, 300] for line in lines)
    assert metrics["screening_queries"] == 525  # every validation photo, once, to find the mistakes
    assert box.counted() - before == metrics["screening_queries"] + sum(line["queries"] for line in lines)
