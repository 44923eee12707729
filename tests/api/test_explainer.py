"""In-process API tests of the explainer, against the real black-box app (a TestClient as its HTTP client)
and against fakes for every black-box failure: contract, queries = the box's counter delta, tokens, errors."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from advexplain.services.blackbox.app import create_app as create_blackbox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.explainer.app import create_app
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.explain import EnsembleSurrogate
from advexplain.shared.pixels import encode_png

CLASSES = ["defective", "functional"]
CLIENT = "explainer-under-test"
TOKEN = "test-token-0123456789abcdef"
BOX_URL = "http://testserver"  # what a TestClient of the black-box app answers to


# ---------------------------------------------------------------- helpers

def png_bytes(x: torch.Tensor) -> bytes:
    return encode_png(x)


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def upload(image: bytes, label, **form) -> dict:
    return {"files": {"image": ("x.png", image, "image/png")},
            "data": {"label": str(label), **{k: str(v) for k, v in form.items()}}}


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def counted(box: TestClient) -> int:
    return box.app.state.blackbox.counter.of(CLIENT)


# ---------------------------------------------------------------- fixtures

# Uploads are "user photos": elpv cells resized to 96 x 80 (width x height), a size and an aspect
# ratio neither model has; the black box (32 x 32) and the surrogate resize them their own ways.
PHOTO = (96, 80)


def photo_bytes(cell) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cell.permute(1, 2, 0).numpy()).resize(PHOTO, Image.Resampling.LANCZOS).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def labelled_photos(tiny_models) -> list[tuple[bytes, int, int]]:
    """(PNG, true label, the black box's answer for that PNG) for elpv validation photos."""
    from advexplain.shared.data import load_photos

    photos = load_photos("elpv", "validation")
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1)
    out = []
    with TestClient(create_blackbox(settings)) as box:
        for i in range(120):
            data = photo_bytes(photos.photos[i])
            answer = box.post("/predict", files={"image": ("p.png", data, "image/png")}).json()
            out.append((data, photos.labels[i], CLASSES.index(answer["predictions"][0]["label"])))
    return out


@pytest.fixture(scope="module")
def cases(labelled_photos) -> list[tuple[bytes, int, int]]:
    """(PNG, true label, black-box prediction) of photos the tiny black box gets wrong."""
    wrong = [case for case in labelled_photos if case[1] != case[2]][:6]
    assert len(wrong) >= 3, "the tiny black box should misclassify some validation photos"
    return wrong


@pytest.fixture(scope="module")
def correct_case(labelled_photos) -> tuple[bytes, int]:
    return next((data, label) for data, label, predicted in labelled_photos if label == predicted)


@pytest.fixture
def box(tiny_models):
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1)
    with TestClient(create_blackbox(settings)) as client:
        yield client


@pytest.fixture
def settings_for(tiny_models):
    def make(**overrides) -> ExplainerSettings:
        values = dict(surrogate=[tiny_models["surrogate"]], blackbox_url=BOX_URL, client_id=CLIENT, device="cpu",
                      threads=1)
        values.update(overrides)
        return ExplainerSettings(**values)

    return make


@pytest.fixture
def explainer(box, settings_for):
    with TestClient(create_app(settings_for(), blackbox_client=box)) as client:
        yield client


@pytest.fixture
def whitebox(box, settings_for, tiny_models):
    settings = settings_for(whitebox_model=tiny_models["blackbox"], whitebox_token=TOKEN)
    with TestClient(create_app(settings, blackbox_client=box)) as client:
        yield client


# ---------------------------------------------------------------- the success path

def check_explanation(body: dict, true_label: int, box: TestClient, queries: int) -> None:
    """Properties every answer has, and for a success: the returned PNG IS classified as the true label."""
    assert body["label"] == CLASSES[true_label] and body["classes"] == CLASSES
    assert body["queries"] == queries, "queries must equal the black box's counter delta"
    assert body["search_queries"] == body["queries"] - 1 and len(body["trace"]) == body["queries"]
    assert body["trace"][-1]["prediction"] == CLASSES.index(body["final_prediction"])
    assert body["queries"] <= body["max_queries"]
    pngs = {
        name: base64.b64decode(body["images"][name], validate=True)
        for name in ("saliency", "overlay", "adversarial", "panel")
    }
    images = {name: decode_png(data) for name, data in pngs.items()}
    for name in ("adversarial", "saliency", "overlay"):
        assert images[name].size == PHOTO, f"{name} must come back at the upload's size"
    assert (body["width"], body["height"]) == (body["original_width"], body["original_height"]) == PHOTO
    assert not body["downscaled"]
    if body["success"] and not body["already_correct"]:
        assert body["final_prediction"] == body["label"] != body["original_prediction"]
        assert 0 < body["linf"] <= body["max_linf"] and body["l2"] >= body["linf"] and body["failure_reason"] is None
        before = counted(box)
        resp = box.post("/predict", files={"image": ("adv.png", pngs["adversarial"], "image/png")})
        assert resp.status_code == 200
        assert resp.json()["predictions"][0]["label"] == body["label"]
        assert counted(box) == before  # that check was made as 'anonymous'
    elif not body["success"]:
        assert body["l2"] is None and body["linf"] is None and body["final_prediction"] != body["label"]
        assert body["failure_reason"] in ("max_queries", "max_linf", "alpha", "no_gradient")


def test_explain_finds_what_the_black_box_accepts_and_queries_equal_its_counter_delta(explainer, box, cases):
    successes = 0
    for image, label, predicted in cases:
        before = counted(box)
        resp = explainer.post("/explain", **upload(image, CLASSES[label]))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["original_prediction"] == CLASSES[predicted] and not body["already_correct"]
        assert body["method"] == "margin" and body["max_queries"] == 20 and body["target"] == body["label"]
        check_explanation(body, label, box, counted(box) - before)
        successes += body["success"]
    # The tiny surrogate transfers to the tiny black box for some images only; each success above was
    # checked against the black box itself, and at least one must exist for that check to mean anything.
    assert successes >= 1, f"none of {len(cases)} explanations succeeded"


def test_paper_method_and_label_by_index(explainer, box, cases):
    image, label, _ = cases[0]
    before = counted(box)
    resp = explainer.post("/explain", **upload(image, label, method="paper", alpha=3.0, max_queries=40))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["method"] == "paper" and body["alpha"] == 3.0
    check_explanation(body, label, box, counted(box) - before)
    if body["success"]:
        assert body["epsilon"] in [k / 10 for k in range(1, 30)]


def test_already_correct_costs_one_query(explainer, box, correct_case):
    image, label = correct_case
    before = counted(box)
    body = explainer.post("/explain", **upload(image, CLASSES[label])).json()
    assert body["already_correct"] and body["success"] and body["queries"] == 1 == counted(box) - before
    assert body["l2"] == 0.0 and body["linf"] == 0.0


def test_a_failed_search_is_a_200_that_says_what_was_tried(explainer, box, cases):
    image, label, predicted = cases[0]
    before = counted(box)
    resp = explainer.post("/explain", **upload(image, CLASSES[label], max_queries=1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is False and body["budget_exhausted"] is True and body["failure_reason"] == "max_queries"
    assert body["queries"] == 1 == counted(box) - before and body["trace"][0]["prediction"] == predicted
    check_explanation(body, label, box, 1)


def test_accept_png_gives_the_panel_with_the_numbers_in_headers(explainer, box, cases):
    image, label, _ = cases[0]
    before = counted(box)
    resp = explainer.post("/explain", headers={"Accept": "image/png"}, **upload(image, CLASSES[label]))
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    panel = decode_png(resp.content)
    assert panel.width > 3 * PHOTO[0]
    h = resp.headers
    assert int(h["X-Explanation-Queries"]) == counted(box) - before
    assert int(h["X-Explanation-Search-Queries"]) == int(h["X-Explanation-Queries"]) - 1
    assert h["X-Explanation-Success"] in ("true", "false") and h["X-Explanation-Label"] == CLASSES[label]
    assert h["X-Explanation-Method"] == "margin" and h["X-Explanation-Already-Correct"] == "false"
    if h["X-Explanation-Success"] == "true":
        assert float(h["X-Explanation-Linf"]) > 0 and h["X-Explanation-Final-Prediction"] == CLASSES[label]


def test_the_first_prediction_is_of_the_upload_as_sent(explainer, box, cases, monkeypatch):
    """A JPEG upload reaches the box as the same bytes; later queries are PNGs of the photo plus the change."""
    image, label, _ = cases[0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    sent = []
    original_request = box.request

    def spy(method, url, **kw):
        if method == "POST":
            sent.extend(part[1][1] for part in kw["files"])
        return original_request(method, url, **kw)

    monkeypatch.setattr(box, "request", spy)
    body = explainer.post("/explain", **upload(jpeg, CLASSES[label])).json()
    assert sent[0] == jpeg and len(sent) == body["queries"]
    for data in sent[1:]:
        assert decode_png(data).size == PHOTO


def test_max_side_downscales_a_large_upload_once_and_says_so(box, settings_for, cases):
    image, label, _ = cases[0]
    big = io.BytesIO()
    Image.open(io.BytesIO(image)).resize((384, 320)).save(big, format="PNG")
    with TestClient(create_app(settings_for(max_side=120), blackbox_client=box)) as c:
        body = c.post("/explain", **upload(big.getvalue(), CLASSES[label])).json()
    assert body["downscaled"] is True and (body["original_width"], body["original_height"]) == (384, 320)
    assert (body["width"], body["height"]) == (120, 100)
    assert decode_png(base64.b64decode(body["images"]["adversarial"])).size == (120, 100)


def test_target_other_than_the_label_on_a_correct_prediction(whitebox, box, correct_case):
    image, label = correct_case
    other = CLASSES[1 - label]
    body = whitebox.post("/internal/whitebox/explain", headers={"Authorization": f"Bearer {TOKEN}"},
                         **upload(image, CLASSES[label], target=other)).json()
    assert body["label"] == CLASSES[label] and body["target"] == other and not body["already_correct"]
    assert body["success"] and body["final_prediction"] == other
    adversarial = base64.b64decode(body["images"]["adversarial"])
    assert box.post("/predict", files={"image": ("a.png", adversarial, "image/png")}).json()[
        "predictions"][0]["label"] == other


# ---------------------------------------------------------------- bad requests: same treatment as the black box

def test_bad_uploads_and_parameters_get_the_error_body_and_spend_no_query(explainer, box, cases):
    image, label, _ = cases[0]
    name = CLASSES[label]
    bad = [
        (upload(b"this is not an image", name), 415, "unsupported_media_type"),
        (upload(b"", name), 400, "invalid_input"),
        (upload(image[: len(image) // 2], name), 400, "invalid_input"),
        (upload(image, "cracked"), 400, "invalid_input"),
        (upload(image, "2"), 400, "invalid_input"),
        (upload(image, name, max_queries=10_000), 400, "invalid_input"),
        (upload(image, name, max_queries=0), 422, "validation_error"),
        (upload(image, name, method="fgsm"), 422, "validation_error"),
        (upload(image, name, tau=0), 422, "validation_error"),
        (upload(image, name, tau="inf"), 422, "validation_error"),
        (upload(image, name, beta=1), 422, "validation_error"),
        (upload(image, name, alpha="nan"), 422, "validation_error"),
        (upload(image, name, alpha=2.0), 400, "invalid_input"),  # alpha is the paper's only
        (upload(image, name, max_linf=0), 422, "validation_error"),
        (upload(image, name, max_linf=2), 422, "validation_error"),
        (upload(image, name, refine=-1), 422, "validation_error"),
        (upload(image, name, saliency="gradient"), 422, "validation_error"),
        (upload(image, name, target="cracked"), 400, "invalid_input"),
        ({"data": {"label": name}}, 422, "validation_error"),
        ({"files": {"image": ("x.png", image, "image/png")}}, 422, "validation_error"),
    ]
    for request, status, code in bad:
        assert_error(explainer.post("/explain", **request), status, code)
    assert counted(box) == 0


def test_size_limits_are_413(box, settings_for, cases):
    image, label, _ = cases[0]
    with TestClient(create_app(settings_for(max_upload_bytes=20_000, max_pixels=90 * 90), blackbox_client=box)) as c:
        noise = torch.rand(3, 120, 120, generator=torch.Generator().manual_seed(0))
        assert_error(c.post("/explain", **upload(png_bytes(noise), "0")), 413, "payload_too_large")
        big = io.BytesIO()
        Image.new("RGB", (100, 100)).save(big, format="PNG")
        assert_error(c.post("/explain", **upload(big.getvalue(), "0")), 413, "payload_too_large")
        two = {"files": [("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))],
               "data": {"label": "0"}}
        assert_error(c.post("/explain", **two), 413, "payload_too_large")
    assert counted(box) == 0


# ---------------------------------------------------------------- the white-box route and its token

def test_whitebox_route_is_absent_without_a_token_or_a_model(box, settings_for, tiny_models, cases, monkeypatch):
    image, label, _ = cases[0]
    monkeypatch.setenv("EXPLAINER_WHITEBOX_TOKEN", "")  # what docker compose's .env.example sets
    for settings in (settings_for(), settings_for(whitebox_model=tiny_models["blackbox"]),
                     settings_for(whitebox_token=TOKEN)):
        assert not settings.whitebox_enabled
        with TestClient(create_app(settings, blackbox_client=box)) as c:
            resp = c.post("/internal/whitebox/explain", headers={"Authorization": f"Bearer {TOKEN}"},
                          **upload(image, label))
            assert_error(resp, 404, "not_found")
            assert not any("internal" in path for path in c.get("/openapi.json").json()["paths"])


def test_whitebox_token_rules(whitebox, box, cases):
    image, label, _ = cases[0]
    route = "/internal/whitebox/explain"
    resp = whitebox.post(route, **upload(image, label))
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_error(whitebox.post(route, headers={"Authorization": f"Basic {TOKEN}"}, **upload(image, label)), 401)
    assert_error(whitebox.post(route, headers={"Authorization": "Bearer "}, **upload(image, label)), 401)
    for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "é" * 20):
        header = f"Bearer {wrong}".encode()
        assert_error(whitebox.post(route, headers={"Authorization": header}, **upload(image, label)), 403, "forbidden")
    assert TOKEN not in whitebox.get("/openapi.json").text
    assert counted(box) == 0


def test_whitebox_explains_with_the_real_model_without_querying_the_black_box(whitebox, box, cases):
    route = "/internal/whitebox/explain"
    for image, label, predicted in cases[:3]:
        resp = whitebox.post(route, headers={"Authorization": f"Bearer {TOKEN}"}, **upload(image, CLASSES[label]))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        # White-box: the gradient source is the oracle, so the first margin query succeeds.
        assert body["success"] and body["original_prediction"] == CLASSES[predicted] and body["queries"] == 2
        adversarial = base64.b64decode(body["images"]["adversarial"])
        answer = box.post("/predict", files={"image": ("a.png", adversarial, "image/png")}).json()
        assert answer["predictions"][0]["label"] == CLASSES[label]
    assert counted(box) == 0
    assert "/internal/whitebox/explain" in whitebox.get("/openapi.json").json()["paths"]


def test_tau_reaches_the_returned_saliency_map(whitebox, cases):
    """The same search (white-box: deterministic, always succeeds) under two fences gives two maps.

    beta is not checked here: the PNG scales the map by its own maximum, so boosting every kept
    pixel by the same beta renders identically (tests/unit/test_saliency.py checks beta on the map).
    """
    image, label, _ = cases[0]

    def explained(tau: str) -> tuple[dict, bytes]:
        resp = whitebox.post("/internal/whitebox/explain", headers={"Authorization": f"Bearer {TOKEN}"},
                             **upload(image, CLASSES[label], tau=tau))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["success"] and body["tau"] == float(tau)
        return body, base64.b64decode(body["images"]["saliency"])

    (low, low_map), (high, high_map) = explained("0.5"), explained("3")
    assert low["images"]["adversarial"] == high["images"]["adversarial"], "the search itself does not depend on tau"
    kept = [(np.asarray(decode_png(png).convert("L")) > 0).sum() for png in (low_map, high_map)]
    assert kept[0] > kept[1] > 0, kept  # a higher fence keeps fewer pixels


def test_saliency_says_what_the_map_shows_and_changes_the_map_only(whitebox, explainer, box, cases):
    """`detail` (the margin methods' default) and `change` (the paper's map, its method's default) are
    two maps of one search: same adversarial image, different saliency, and the answer names which."""
    image, label, _ = cases[0]

    def explained(**fields) -> dict:
        resp = whitebox.post("/internal/whitebox/explain", headers={"Authorization": f"Bearer {TOKEN}"},
                             **upload(image, CLASSES[label], **fields))
        assert resp.status_code == 200, resp.text
        return resp.json()

    default, detail, change = explained(), explained(saliency="detail"), explained(saliency="change")
    assert default["success"] and default["saliency"] == "detail" == detail["saliency"]
    assert change["saliency"] == "change"
    assert default["images"]["saliency"] == detail["images"]["saliency"] != change["images"]["saliency"]
    assert default["images"]["adversarial"] == change["images"]["adversarial"]
    assert explained(method="paper", alpha=3.0)["saliency"] in ("change", None)
    # On the black-box route too, and in the PNG answer's headers.
    resp = explainer.post("/explain", headers={"Accept": "image/png"},
                          **upload(image, CLASSES[label], saliency="change"))
    assert resp.status_code == 200
    if resp.headers["X-Explanation-Success"] == "true":
        assert resp.headers["X-Explanation-Saliency"] == "change"


# ---------------------------------------------------------------- the black box failing

def fake_box(predict) -> httpx.Client:
    """An httpx client whose black box has /predict only (answered by `predict(request)`), no /healthz."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/predict":
            return predict(request)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.Client(transport=httpx.MockTransport(route))


@pytest.mark.parametrize("predict,status,code", [
    (lambda r: httpx.Response(500, text="boom"), 502, "blackbox_bad_response"),
    (lambda r: httpx.Response(200, text="<html>not json</html>"), 502, "blackbox_bad_response"),
    (lambda r: httpx.Response(200, json={"predictions": [{"label": "cat", "index": 7}], "queries": 1}), 502,
     "blackbox_bad_response"),
    (lambda r: httpx.Response(503, json={"status": "loading"}), 503, "blackbox_unavailable"),
])
def test_black_box_answering_5xx_or_junk(settings_for, cases, predict, status, code):
    image, label, _ = cases[0]
    with (
        fake_box(predict) as http,
        TestClient(create_app(settings_for(blackbox_url="http://fake"), blackbox_client=http)) as c,
    ):
        assert_error(c.post("/explain", **upload(image, label)), status, code)
        assert c.get("/healthz").json()["surrogate"] is True  # the explainer stays up
        errors = samples(c.get("/metrics").text)["explainer_explanations_total"]
        assert {(s.labels["outcome"], s.value) for s in errors} == {("error", 1.0)}


def test_a_box_with_predict_only_is_explained_with_the_surrogates_class_names(box, settings_for, cases):
    """No /healthz and no class list: the explainer needs nothing but /predict, and the box's own
    labels must be among the surrogate's class names."""
    image, label, _ = cases[0]

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/predict":
            return httpx.Response(404, json={"detail": "Not Found"})
        resp = box.post("/predict", content=request.content, headers={
            "content-type": request.headers["content-type"], "X-Client-Id": CLIENT})
        return httpx.Response(resp.status_code, content=resp.content, headers=dict(resp.headers))

    with httpx.Client(transport=httpx.MockTransport(route)) as http, \
            TestClient(create_app(settings_for(blackbox_url="http://fake"), blackbox_client=http)) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["blackbox"] == "ok"
        before = counted(box)
        body = c.post("/explain", **upload(image, CLASSES[label])).json()
        check_explanation(body, label, box, counted(box) - before)


def test_labels_outside_the_classes_are_a_clear_502(settings_for, cases):
    image, label, _ = cases[0]
    answer = {"predictions": [{"label": "cat", "index": 0}], "queries": 1}
    with fake_box(lambda r: httpx.Response(200, json=answer)) as http, \
            TestClient(create_app(settings_for(blackbox_url="http://fake"), blackbox_client=http)) as c:
        body = assert_error(c.post("/explain", **upload(image, label)), 502, "blackbox_bad_response")
    assert "'cat'" in body["error"]["message"] and "classes" in body["error"]["message"]


def test_the_classes_setting_renames_what_the_box_answers(box, settings_for, cases):
    image, label, _ = cases[0]
    with TestClient(create_app(settings_for(classes="cracked,intact"), blackbox_client=box)) as c:
        body = assert_error(c.post("/explain", **upload(image, "cracked")), 502, "blackbox_bad_response")
        assert "'defective'" in body["error"]["message"]  # the real box still says defective/functional
    with pytest.raises(ValidationError):
        settings_for(classes="only-one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_black_box_refusing_connections_is_503_and_healthz_says_so(settings_for, cases):
    image, label, _ = cases[0]
    settings = settings_for(blackbox_url=f"http://127.0.0.1:{free_port()}", connect_retries=1, connect_timeout=1.0)
    with TestClient(create_app(settings)) as c:  # the real pooled client built from the settings
        started = time.monotonic()
        body = assert_error(c.post("/explain", **upload(image, label)), 503, "blackbox_unavailable")
        assert time.monotonic() - started < 5 and "127.0.0.1" in body["error"]["message"]
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and health.json()["blackbox"] == "unreachable"
        assert health.json()["surrogate"] is True


@pytest.fixture
def hanging_server():
    """A loopback server that accepts connections and never answers; closed after the test."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()


def test_black_box_hanging_is_504_within_the_read_timeout(settings_for, cases, hanging_server):
    image, label, _ = cases[0]
    settings = settings_for(blackbox_url=hanging_server, read_timeout=0.5, health_timeout=0.3)
    with TestClient(create_app(settings)) as c:
        started = time.monotonic()
        body = assert_error(c.post("/explain", **upload(image, label)), 504, "blackbox_timeout")
        assert time.monotonic() - started < 3, "the configured read timeout must reach the transport"
        assert "did not answer in time" in body["error"]["message"]
        started = time.monotonic()
        assert c.get("/healthz").json()["blackbox"] == "unreachable"
        assert time.monotonic() - started < 2


def test_explainer_healthz_ready_when_both_are(explainer):
    resp = explainer.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ready", "surrogate": True, "surrogates": 1, "blackbox": "ok",
                           "classes": CLASSES}


def test_healthz_loading_before_the_lifespan(settings_for, box):
    c = TestClient(create_app(settings_for(), blackbox_client=box))  # no `with`: nothing loaded
    resp = c.get("/healthz")
    assert resp.status_code == 503 and resp.json() == {"status": "loading", "surrogate": False}
    assert_error(c.post("/explain", **upload(b"x", "0")), 503, "not_ready")


# ---------------------------------------------------------------- concurrency: torch off the event loop

def test_a_slow_explanation_does_not_stall_healthz(box, settings_for, cases, monkeypatch):
    import advexplain.services.explainer.service as service

    image, label, _ = cases[0]
    entered, release = threading.Event(), threading.Event()
    real_explain = service.explain
    threads = []

    def slow_explain(*args, **kwargs):
        threads.append(threading.get_ident())
        entered.set()
        assert release.wait(10)
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(service, "explain", slow_explain)
    app = create_app(settings_for(max_concurrency=1), blackbox_client=box)

    async def main():
        loop_thread = threading.get_ident()
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://explainer") as http:
                first = asyncio.create_task(http.post("/explain", **upload(image, label)))
                second = asyncio.create_task(http.post("/explain", **upload(image, label)))
                assert await asyncio.to_thread(entered.wait, 10)
                started = time.monotonic()
                health = await http.get("/healthz")
                health_seconds = time.monotonic() - started
                await asyncio.sleep(0.2)
                in_flight = len(threads)  # bounded: the second waits for the first's slot
                release.set()
                results = await asyncio.gather(first, second)
        return loop_thread, health, health_seconds, in_flight, results

    loop_thread, health, health_seconds, in_flight, results = asyncio.run(main())
    assert health.status_code == 200 and health_seconds < 2
    assert in_flight == 1 and len(threads) == 2 and loop_thread not in threads
    assert [r.status_code for r in results] == [200, 200]


# ---------------------------------------------------------------- metrics, OpenAPI, ensemble, settings

def test_metrics_count_explanations_by_outcome_queries_and_latency(explainer, box, cases, correct_case):
    image, label, _ = cases[0]
    explainer.post("/explain", **upload(image, label, max_queries=1))  # failed
    explainer.post("/explain", **upload(*correct_case))  # already correct
    explainer.post("/explain", **upload(b"nope", label))  # 415
    s = samples(explainer.get("/metrics").text)
    outcomes = {(x.labels["route"], x.labels["outcome"]): x.value for x in s["explainer_explanations_total"]}
    assert outcomes[("blackbox", "failed")] == 1 and outcomes[("blackbox", "already_correct")] == 1
    assert [x.value for x in s["explainer_oracle_queries_total"]] == [float(counted(box))] == [2.0]
    assert sum(x.value for x in s["explainer_explanation_duration_seconds_count"]) == 3
    routes = {(x.labels["route"], x.labels["status"]): x.value for x in s["explainer_request_duration_seconds_count"]}
    assert routes[("/explain", "200")] == 2 and routes[("/explain", "415")] == 1
    assert {x.labels["code"] for x in s["explainer_errors_total"]} == {"unsupported_media_type"}


def test_openapi_documents_explain(explainer):
    schema = explainer.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/explain", "/healthz", "/metrics"}
    post = schema["paths"]["/explain"]["post"]
    ref = post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"image", "label", "target", "method", "max_queries", "max_linf", "refine", "saliency", "tau", "beta",
            "alpha"} <= set(
        schema["components"]["schemas"][ref]["properties"])
    assert {"application/json", "image/png"} <= set(post["responses"]["200"]["content"])
    for status in ("400", "413", "415", "422", "502", "503", "504"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def test_several_surrogates_are_served_as_an_ensemble(box, settings_for, tiny_models, cases, monkeypatch):
    monkeypatch.setenv("EXPLAINER_SURROGATE", f"{tiny_models['surrogate']},{tiny_models['blackbox']}")
    settings = ExplainerSettings(blackbox_url=BOX_URL, client_id=CLIENT, device="cpu", threads=1)
    assert settings.surrogate == [tiny_models["surrogate"], tiny_models["blackbox"]]
    image, label, _ = cases[0]
    with TestClient(create_app(settings, blackbox_client=box)) as c:
        assert isinstance(c.app.state.explainer.surrogate, EnsembleSurrogate)
        assert c.get("/healthz").json()["surrogates"] == 2
        before = counted(box)
        body = c.post("/explain", **upload(image, label)).json()
        check_explanation(body, label, box, counted(box) - before)


def test_settings_from_env_and_fail_fast(tiny_models, monkeypatch):
    s, b = str(tiny_models["surrogate"]), str(tiny_models["blackbox"])
    monkeypatch.setenv("EXPLAINER_SURROGATE", f'["{s}", "{b}"]')
    monkeypatch.setenv("EXPLAINER_BLACKBOX_URL", "http://blackbox:8000/")
    monkeypatch.setenv("EXPLAINER_WHITEBOX_MODEL", b)
    monkeypatch.setenv("EXPLAINER_WHITEBOX_TOKEN", TOKEN)
    monkeypatch.setenv("EXPLAINER_PORT", "9101")
    settings = ExplainerSettings()
    assert settings.surrogate == [tiny_models["surrogate"], tiny_models["blackbox"]]
    assert (settings.blackbox_url, settings.port, settings.whitebox_enabled) == ("http://blackbox:8000", 9101, True)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    monkeypatch.setenv("EXPLAINER_SURROGATE", s)
    assert ExplainerSettings().surrogate == [tiny_models["surrogate"]]
    monkeypatch.setenv("EXPLAINER_WHITEBOX_TOKEN", "")
    assert ExplainerSettings().whitebox_token is None and not ExplainerSettings().whitebox_enabled
    for bad in ({"surrogate": [tiny_models["surrogate"].parent]}, {"surrogate": []}, {"blackbox_url": "ftp://x"},
                {"blackbox_url": "not a url"}, {"whitebox_model": tiny_models["surrogate"].parent},
                {"whitebox_token": "short"}, {"client_id": "has space"}, {"read_timeout": 0},
                {"max_concurrency": 0}, {"max_queries": 100_000}, {"device": "tpu"}):
        with pytest.raises(ValidationError) as info:
            ExplainerSettings(**bad)
        assert "short'" not in str(info.value)  # inputs are never echoed (the token!)


def test_cli_builds_the_settings_from_flags_and_env(tiny_models, monkeypatch):
    import uvicorn

    from advexplain.cli import build_parser

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("EXPLAINER_WHITEBOX_TOKEN", TOKEN)
    argv = [
        "serve",
        "explainer",
        "--surrogate",
        str(tiny_models["surrogate"]),
        "--surrogate",
        str(tiny_models["blackbox"]),
        "--blackbox-url",
        "http://127.0.0.1:8123",
        "--whitebox-model",
        str(tiny_models["blackbox"]),
        "--host",
        "127.0.0.1",
        "--port",
        "8124",
    ]
    args = build_parser().parse_args(argv)
    assert args.handler(args) == 0
    settings = seen["app"].state.settings
    assert settings.surrogate == [tiny_models["surrogate"], tiny_models["blackbox"]]
    assert (seen["host"], seen["port"], settings.blackbox_url) == ("127.0.0.1", 8124, "http://127.0.0.1:8123")
    assert settings.whitebox_enabled
