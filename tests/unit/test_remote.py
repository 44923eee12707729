"""RemoteClassifier against the real black-box app in-process, and against fakes for every failure."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from advexplain.services.blackbox.app import create_app
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import InvalidInput, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from advexplain.shared.pixels import encode_png
from advexplain.shared.protocols import Classifier
from advexplain.shared.remote import NO_HEALTH_ENDPOINT, NOT_READY, READY, UNREACHABLE, RemoteClassifier

CLASSES = ("defective", "functional")


@pytest.fixture
def box(tiny_models):
    def start(**overrides) -> TestClient:
        settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, **overrides)
        return TestClient(create_app(settings))

    return start


@pytest.fixture(scope="module")
def reference(tiny_models) -> LocalClassifier:
    return LocalClassifier.from_checkpoint(tiny_models["blackbox"])


def batch(n: int, seed: int = 0, channels: int = 3, size: int = 32) -> torch.Tensor:
    x = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.0  # extremes too, so that more than one class is likely to appear
    if n > 1:
        x[1] = 1.0
    return x


def quantised(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round().div(255)


# ------------------------------------------------------------ against the real app

def test_matches_the_model_on_what_it_sent_and_counts_like_the_box(box, reference):
    x = batch(6)
    before = x.clone()
    with box() as http:
        remote = RemoteClassifier("http://testserver", CLASSES, client=http, client_id="explainer-test")
        assert remote.classes == CLASSES and remote.health() == (READY, "ready")
        assert remote.queries == 0 and http.app.state.blackbox.counter.total == 0  # /healthz counts nothing
        probs = remote.predict_proba(x)
        counted = http.app.state.blackbox.counter.of("explainer-test")
        assert remote.predict_proba(x[:2]).shape == (2, 2)
        counted_after = http.app.state.blackbox.counter.of("explainer-test")
    assert torch.equal(x, before)  # input not mutated
    assert probs.shape == (6, 2) and probs.dtype == torch.float32
    assert torch.allclose(probs, reference.predict_proba(quantised(x)), atol=1e-6)
    assert counted == 6 and counted_after == 8
    assert remote.queries == counted_after == remote.last_query_count
    assert isinstance(remote, Classifier)


def test_batches_are_chunked_at_max_images_and_keep_order(box, reference):
    x = batch(7, seed=1)
    posts = []
    with box(max_images=3) as http:
        original = http.request

        def spy(method, url, **kw):
            if method == "POST":
                posts.append(len(kw["files"]))
            return original(method, url, **kw)

        http.request = spy
        remote = RemoteClassifier("http://testserver", CLASSES, client=http)
        probs = remote.predict_proba(x)
    assert posts == [3, 3, 1]
    assert torch.allclose(probs, reference.predict_proba(quantised(x)), atol=1e-6)
    assert remote.queries == 7 == remote.last_query_count


def test_label_only_box_gives_one_hot_rows(box, reference):
    x = batch(5, seed=2)
    with box(output="label") as http:
        remote = RemoteClassifier("http://testserver", CLASSES, client=http)
        probs = remote.predict_proba(x)
        assert remote.classes == CLASSES
    assert set(probs.flatten().tolist()) <= {0.0, 1.0} and torch.equal(probs.sum(1), torch.ones(5))
    assert torch.equal(probs.argmax(1), reference.predict_proba(quantised(x)).argmax(1))


def test_grey_images_and_bad_shapes(box, reference):
    with box() as http:
        remote = RemoteClassifier("http://testserver", CLASSES, client=http)
        grey = batch(3, seed=3, channels=1)
        probs = remote.predict_proba(grey)
        assert torch.allclose(probs, reference.predict_proba(quantised(grey).expand(-1, 3, -1, -1)), atol=1e-6)
        for bad in (torch.rand(3, 32, 32), torch.rand(0, 3, 32, 32), torch.rand(1, 4, 32, 32)):
            with pytest.raises(InvalidInput):
                remote.predict_proba(bad)


def test_png_encoding_is_lossless_at_8_bits():
    import io

    import numpy as np
    from PIL import Image

    x = batch(1, seed=4)[0]
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(encode_png(x))))).permute(2, 0, 1).float() / 255
    assert torch.equal(decoded, quantised(x))


# ------------------------------------------------------------ fakes

def fake(handler, health: bool = True) -> RemoteClassifier:
    """A RemoteClassifier whose /predict is `handler`; with `health`, a /healthz that allows 64 images
    a request, else none at all (404), like a box that offers /predict only."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            if health:
                return httpx.Response(200, json={"status": "ready", "max_images": 64})
            return httpx.Response(404, json={"detail": "Not Found"})
        return handler(request)

    return RemoteClassifier("http://fake", CLASSES, client=httpx.Client(transport=httpx.MockTransport(route)))


def ok_body(n: int, **override) -> dict:
    pred = {"label": "functional", "index": 1, "probabilities": {"defective": 0.25, "functional": 0.75}}
    return {"predictions": [dict(pred, **override) for _ in range(n)], "queries": n}


@pytest.mark.parametrize("response,error", [
    (httpx.Response(500, text="boom"), UpstreamBadResponse),
    (httpx.Response(502, json={"error": {"code": "x", "message": "y"}}), UpstreamBadResponse),
    (httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}}), UpstreamUnavailable),
    (httpx.Response(415, json={"error": {"code": "unsupported_media_type", "message": "?"}}), UpstreamBadResponse),
    (httpx.Response(200, text="<html>not json</html>"), UpstreamBadResponse),
    (httpx.Response(200, json=[1, 2]), UpstreamBadResponse),
    (httpx.Response(200, json=ok_body(1)), UpstreamBadResponse),  # 1 prediction for 2 images
    (httpx.Response(200, json=ok_body(2, label="cat")), UpstreamBadResponse),
    (httpx.Response(200, json=ok_body(2, label="defective")), UpstreamBadResponse),  # not its most probable class
    (httpx.Response(200, json={"predictions": [{"label": "functional"}] * 2}), UpstreamBadResponse),  # no index
    (httpx.Response(200, json=ok_body(2, probabilities={"defective": 0.9, "functional": 0.9})), UpstreamBadResponse),
    (httpx.Response(200, json=ok_body(2, probabilities={"a": 0.5, "b": 0.5})), UpstreamBadResponse),
])
def test_bad_answers_map_to_typed_errors_and_count_nothing(response, error):
    remote = fake(lambda request: response)
    with pytest.raises(error):
        remote.predict_proba(batch(2))
    assert remote.queries == 0


def test_a_good_fake_answer_is_parsed():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("X-Client-Id"))
        return httpx.Response(200, json=ok_body(2), headers={"X-Query-Count": "41"})

    remote = fake(handler)
    probs = remote.predict_proba(batch(2))
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75]] * 2))
    assert remote.queries == 2 and remote.last_query_count == 41 and seen == ["advexplain-explainer"]


def test_a_box_with_predict_only_works_one_image_a_request_and_maps_labels_by_name():
    """No /healthz, no class list, another class order, no `queries` field: only its labels count."""
    posts = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request.content.count(b'name="image"'))
        # Its own index order is the reverse of ours; label names are what a client trusts.
        return httpx.Response(200, json={"predictions": [{"label": "defective", "index": 1}]})

    remote = fake(handler, health=False)
    assert remote.health()[0] == NO_HEALTH_ENDPOINT
    probs = remote.predict_proba(batch(3))
    assert posts == [1, 1, 1] and remote.max_images == 1
    assert torch.equal(probs, torch.tensor([[1.0, 0.0]] * 3)) and remote.queries == 3


def test_a_label_outside_the_classes_is_a_clear_bad_response():
    remote = fake(lambda r: httpx.Response(200, json={"predictions": [{"label": "cat", "index": 0}]}), health=False)
    with pytest.raises(UpstreamBadResponse, match="not one of the classes"):
        remote.predict_proba(batch(1))
    assert remote.queries == 0


def test_files_are_sent_as_they_are(box, reference):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 30), (200, 10, 10)).save(buf, format="JPEG")
    with box() as http:
        remote = RemoteClassifier("http://testserver", CLASSES, client=http)
        probs = remote.predict_files([buf.getvalue()])
    assert probs.shape == (1, 2) and remote.queries == 1


@pytest.mark.parametrize("status,state", [(200, READY), (404, NO_HEALTH_ENDPOINT), (405, NO_HEALTH_ENDPOINT),
                                          (503, NOT_READY), (500, NOT_READY)])
def test_health_states(status, state):
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(status, json={})))
    assert RemoteClassifier("http://fake", CLASSES, client=client).health()[0] == state


def test_class_names_are_required_and_distinct():
    for bad in ((), ("a",), ("a", "a"), ("a", "")):
        with pytest.raises(InvalidInput):
            RemoteClassifier("http://fake", bad)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("retries", [0, 2])
def test_refused_connection_is_unavailable_after_the_transports_retries(monkeypatch, retries):
    import httpcore._backends.sync as sync_backend

    attempts = []
    real = sync_backend.socket.create_connection

    def counting(*args, **kwargs):
        attempts.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sync_backend.socket, "create_connection", counting)
    port = unused_port()
    with RemoteClassifier(f"http://127.0.0.1:{port}", CLASSES, connect_retries=retries, timeout=2,
                          max_images=1) as remote:
        assert remote.health()[0] == UNREACHABLE
        with pytest.raises(UpstreamUnavailable):
            remote.predict_proba(batch(1))
    # The retries configured on the constructor reached the transport that made the connections.
    assert len(attempts) == 2 * (retries + 1) and all(a == ("127.0.0.1", port) for a in attempts)


def test_a_hanging_server_times_out_and_is_not_retried():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(5)
    accepted = []
    stop = threading.Event()

    def accept_and_hang():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)  # read nothing, answer nothing

    thread = threading.Thread(target=accept_and_hang, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        with RemoteClassifier(f"http://127.0.0.1:{server.getsockname()[1]}", CLASSES, timeout=0.5, connect_retries=2,
                              max_images=1) as remote:
            with pytest.raises(UpstreamTimeout):
                remote.predict_proba(batch(1))
        assert time.perf_counter() - started < 5
        assert len(accepted) == 1
    finally:
        stop.set()
        server.close()
        for conn in accepted:
            conn.close()
        thread.join(timeout=5)


def test_injected_client_is_not_closed_but_an_owned_one_is():
    injected = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})))
    RemoteClassifier("http://fake", CLASSES, client=injected).close()
    assert not injected.is_closed
    owned = RemoteClassifier("http://127.0.0.1:9", CLASSES)
    owned.close()
    assert owned._client.is_closed
    with pytest.raises(ValueError):
        RemoteClassifier("http://fake", CLASSES, connect_retries=-1)
