"""The pair as it runs: both services as real uvicorn processes on loopback, tiny real checkpoints."""

from __future__ import annotations

import base64
import io
import secrets
import time

import httpx
import pytest
import torch
from PIL import Image

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_images
from tests.metrics import metric

pytestmark = pytest.mark.integration


def misclassified_pngs(blackbox_path, count: int) -> list[tuple[bytes, str]]:
    """PNG bytes of validation images the tiny black box gets wrong, with their true class names."""
    clf = LocalClassifier.from_checkpoint(blackbox_path)
    images = load_images("elpv", "validation", clf.image_size, progress=False)
    with torch.no_grad():
        predicted = clf.logits(images.as_float()).argmax(1)
    out = []
    for i in (predicted != images.labels).nonzero().flatten()[:count].tolist():
        array = images.images[i].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out.append((buf.getvalue(), images.classes[int(images.labels[i])]))
    assert out, "the tiny black box must get some validation images wrong"
    return out


@pytest.fixture
def pair(service_factory, tiny_models):
    token = secrets.token_urlsafe(24)
    blackbox = service_factory("blackbox", ["--model", str(tiny_models["blackbox"])]).start()
    explainer = service_factory(
        "explainer",
        ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url", blackbox.url,
         "--whitebox-model", str(tiny_models["blackbox"])],
        env={"EXPLAINER_WHITEBOX_TOKEN": token, "EXPLAINER_READ_TIMEOUT": "5", "EXPLAINER_CONNECT_TIMEOUT": "2"},
    ).start()
    return blackbox, explainer, token


def explain(explainer_url: str, png: bytes, label: str, path: str = "/explain", headers=None, **fields):
    return httpx.post(f"{explainer_url}{path}", files={"image": ("x.png", png, "image/png")},
                      data={"label": label, **{k: str(v) for k, v in fields.items()}}, headers=headers, timeout=60)


def blackbox_total(blackbox_url: str, client: str) -> int:
    """The black box's own counter for one client, read from /metrics."""
    return int(metric(httpx.get(f"{blackbox_url}/metrics", timeout=5).text, "blackbox_queries_total", client=client))


def test_explanation_over_http_round_trips(pair, tiny_models):
    blackbox, explainer, token = pair
    samples = misclassified_pngs(tiny_models["blackbox"], 3)
    explained = []
    for png, label in samples:
        before = blackbox_total(blackbox.url, "advexplain-explainer")
        response = explain(explainer.url, png, label)
        assert response.status_code == 200, response.text
        body = response.json()
        after = blackbox_total(blackbox.url, "advexplain-explainer")
        assert body["queries"] == after - before, "reported queries equal the black box's counter delta"
        assert body["search_queries"] == body["queries"] - 1
        if body["success"]:
            explained.append((body, label))
    # A run where every search fails would check nothing below: the round trip must explain something.
    assert explained, f"none of the {len(samples)} misclassified images was explained over HTTP"
    for body, label in explained:
        assert body["final_prediction"] == label
        adversarial = base64.b64decode(body["images"]["adversarial"])
        check = httpx.post(f"{blackbox.url}/predict", files={"image": ("adv.png", adversarial, "image/png")},
                           headers={"X-Client-Id": "checker"}, timeout=10)
        assert check.json()["predictions"][0]["label"] == label, "the adversarial PNG is classified as the true label"
        for name in ("saliency", "overlay", "panel"):
            Image.open(io.BytesIO(base64.b64decode(body["images"][name]))).verify()

    png, label = samples[0]
    white = explain(explainer.url, png, label, path="/internal/whitebox/explain",
                    headers={"Authorization": f"Bearer {token}"})
    assert white.status_code == 200 and white.json()["success"]
    assert explain(explainer.url, png, label, path="/internal/whitebox/explain").status_code == 401
    assert explain(explainer.url, png, label, path="/internal/whitebox/explain",
                   headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 403
    panel = httpx.post(f"{explainer.url}/explain", files={"image": ("x.png", png, "image/png")}, data={"label": label},
                       headers={"Accept": "image/png"}, timeout=60)
    assert panel.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(panel.content)).verify()


def test_black_box_down_gives_503_then_recovers(pair, tiny_models):
    blackbox, explainer, _ = pair
    png, label = misclassified_pngs(tiny_models["blackbox"], 1)[0]
    blackbox.kill()
    started = time.monotonic()
    down = explain(explainer.url, png, label)
    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "blackbox_unavailable"
    assert time.monotonic() - started < 10
    health = httpx.get(f"{explainer.url}/healthz", timeout=10)
    assert health.status_code == 503
    assert health.json()["status"] == "degraded" and health.json()["blackbox"] == "unreachable"

    blackbox.start()  # same port: the explainer recovers without a restart of its own
    again = explain(explainer.url, png, label)
    assert again.status_code == 200, again.text
    assert httpx.get(f"{explainer.url}/healthz", timeout=10).status_code == 200


def test_both_shut_down_cleanly(pair):
    blackbox, explainer, _ = pair
    assert explainer.stop() == 0
    assert blackbox.stop() == 0
    assert "Application shutdown complete" in explainer.log()
    assert "Application shutdown complete" in blackbox.log()
