"""`target` through the pair as it runs: four-class (elpv4) tiny models, both services as real processes.

Both explainer routes (black-box `/explain` and the token-guarded white-box route) are asked to
move correctly classified photos to every other class: the answer keeps the true `label`, says
the `target`, its `queries` equal the black box's own counter delta, and every adversarial PNG it
returns is classified as the target when posted back to the black box.
"""

from __future__ import annotations

import base64
import io
import secrets

import httpx
import numpy as np
import pytest
from PIL import Image

from advexplain.shared.data import ELPV4, load_images
from tests.metrics import metric
from tests.tiny_elpv4 import tiny4_models

pytestmark = pytest.mark.integration

CLIENT = "advexplain-explainer"
PHOTO = 64  # uploads: elpv4 cells at 64x64, twice the tiny models' input


@pytest.fixture(scope="module")
def tiny4(module_tmp):
    return tiny4_models(module_tmp)


@pytest.fixture
def pair4(service_factory, tiny4):
    token = secrets.token_urlsafe(24)
    blackbox = service_factory("blackbox", ["--model", str(tiny4["blackbox"])]).start()
    explainer = service_factory(
        "explainer",
        # The black box's own weights as the surrogate: what is tested is `target` through both routes
        # (queries, counts, the answer, the returned PNG), not how well a tiny surrogate transfers.
        ["--surrogate", str(tiny4["blackbox"]), "--blackbox-url", blackbox.url,
         "--whitebox-model", str(tiny4["blackbox"])],
        env={"EXPLAINER_WHITEBOX_TOKEN": token, "EXPLAINER_READ_TIMEOUT": "10"},
    ).start()
    return blackbox, explainer, token


def validation_pngs(count: int) -> tuple[list[bytes], list[str], tuple[str, ...]]:
    images = load_images(ELPV4, "validation", PHOTO, progress=False)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, [images.classes[int(y)] for y in images.labels[:count]], images.classes


def blackbox_total(blackbox_url: str, client: str) -> int:
    """The black box's own counter for one client, read from /metrics."""
    return int(metric(httpx.get(f"{blackbox_url}/metrics", timeout=5).text, "blackbox_queries_total", client=client))


def box_says(blackbox_url: str, pngs: list[bytes]) -> list[str]:
    """The black box's labels for the PNGs, asked under a client id of its own (not the explainer's)."""
    files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    response = httpx.post(f"{blackbox_url}/predict", files=files, headers={"X-Client-Id": "checker"}, timeout=30)
    assert response.status_code == 200, response.text
    return [p["label"] for p in response.json()["predictions"]]


def ask(explainer_url: str, path: str, png: bytes, label: str, headers=None, **fields) -> dict:
    response = httpx.post(f"{explainer_url}{path}", files={"image": ("x.png", png, "image/png")},
                          data={"label": label, **{k: str(v) for k, v in fields.items()}}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_correct_photos_toward_every_other_class_through_both_routes(pair4):
    blackbox, explainer, token = pair4
    pngs, labels, classes = validation_pngs(48)
    predicted = box_says(blackbox.url, pngs)
    correct = [k for k, (p, y) in enumerate(zip(predicted, labels)) if p == y][:2]
    assert len(correct) == 2, "the tiny elpv4 box classifies some validation photos correctly"
    routes = {"/explain": None, "/internal/whitebox/explain": {"Authorization": f"Bearer {token}"}}
    for path, headers in routes.items():
        successes = 0
        for k in correct:
            for target in (c for c in classes if c != labels[k]):
                before = blackbox_total(blackbox.url, CLIENT)
                body = ask(explainer.url, path, pngs[k], labels[k], headers, target=target)
                spent = blackbox_total(blackbox.url, CLIENT) - before
                assert body["label"] == labels[k] and body["target"] == target, "label stays the true label"
                assert body["original_prediction"] == labels[k] and not body["already_correct"]
                # Black-box route: every image sent is one the box counted. White-box: the real model
                # answers in-process and the black box counts nothing.
                assert spent == (body["queries"] if path == "/explain" else 0)
                # A failure may ask nothing after the first prediction (rounds the gradient source itself
                # cannot move to the target are skipped without a query); a success asked at least once.
                assert body["search_queries"] == body["queries"] - 1 >= (1 if body["success"] else 0)
                if not body["success"]:
                    assert body["failure_reason"] and body["final_prediction"] != target
                    continue
                successes += 1
                assert body["final_prediction"] == target and body["linf"] <= body["max_linf"] + 1e-9
                adversarial = base64.b64decode(body["images"]["adversarial"])
                assert Image.open(io.BytesIO(adversarial)).size == (PHOTO, PHOTO)
                assert box_says(blackbox.url, [adversarial]) == [target], "the returned PNG is classified as target"
                saliency = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"]["saliency"]))))
                assert saliency.any(), "the map shows where the photo had to change to become the target"
        assert successes, f"{path}: no correctly classified photo could be moved to another class"


def test_target_by_index_already_reached_and_the_png_answer(pair4):
    blackbox, explainer, token = pair4
    pngs, labels, classes = validation_pngs(48)
    predicted = box_says(blackbox.url, pngs)
    k = next(k for k, (p, y) in enumerate(zip(predicted, labels)) if p != y)
    label, prediction = labels[k], predicted[k]

    for path, headers in (("/explain", None), ("/internal/whitebox/explain", {"Authorization": f"Bearer {token}"})):
        # A mistake asked toward the class the box already answers: already_correct means "already
        # there" (one query, no change), not "the prediction is right"; label is still the true one.
        before = blackbox_total(blackbox.url, CLIENT)
        body = ask(explainer.url, path, pngs[k], label, headers, target=classes.index(prediction))
        assert body["target"] == prediction and body["label"] == label != prediction
        assert body["already_correct"] and body["success"] and body["queries"] == 1
        assert body["final_prediction"] == prediction and body["linf"] == 0.0
        assert blackbox_total(blackbox.url, CLIENT) - before == (1 if path == "/explain" else 0)

    # Without a target the same photo is the paper's case: explained toward its label.
    body = ask(explainer.url, "/explain", pngs[k], label)
    assert body["target"] == label and not body["already_correct"]

    other = next(c for c in classes if c not in (label, prediction))
    panel = httpx.post(f"{explainer.url}/explain", files={"image": ("x.png", pngs[k], "image/png")},
                       data={"label": label, "target": other}, headers={"Accept": "image/png"}, timeout=120)
    assert panel.status_code == 200 and panel.headers["content-type"] == "image/png"
    assert panel.headers["x-explanation-target"] == other and panel.headers["x-explanation-label"] == label
    Image.open(io.BytesIO(panel.content)).verify()
