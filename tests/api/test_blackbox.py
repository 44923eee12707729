"""In-process API tests of the black-box service: contract, every error, label-only mode, counting, metrics."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections import Counter as Tally

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from advexplain.services.blackbox.app import create_app
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.images import decode_image

CLASSES = ["defective", "functional"]


# ---------------------------------------------------------------- helpers

def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; no pixel data (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def files(*blobs: bytes, field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"f{i}", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def metric_samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def queries_by_client(client: TestClient) -> dict[str, float]:
    samples = metric_samples(client.get("/metrics").text)
    return {s.labels["client"]: s.value for s in samples.get("blackbox_queries_total", [])}


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def make_settings(tiny_models):
    def make(**overrides) -> BlackboxSettings:
        return BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, **overrides)

    return make


@pytest.fixture
def client(make_settings):
    with TestClient(create_app(make_settings())) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_models) -> LocalClassifier:
    return LocalClassifier.from_checkpoint(tiny_models["blackbox"])


# ---------------------------------------------------------------- contract

def test_healthz_ready_only_after_lifespan_loaded_the_model(make_settings):
    app = create_app(make_settings())
    not_started = TestClient(app)  # no `with`: the lifespan has not run
    resp = not_started.get("/healthz")
    assert resp.status_code == 503 and resp.json()["status"] == "loading"
    assert_error(not_started.post("/predict", files=files(encode(noise_image(0)))), 503, "not_ready")
    with TestClient(app) as c:
        body = c.get("/healthz").json()
        assert body == {"status": "ready", "classes": CLASSES, "output": "proba", "image_size": 32, "max_images": 64}


def test_predict_matches_the_model_and_counts_one_query(client, reference):
    blob = encode(noise_image(1))
    resp = client.post("/predict", files=files(blob))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["queries"] == 1 and resp.headers["X-Query-Count"] == "1"
    (pred,) = body["predictions"]
    expected = reference.predict_proba(decode_image(blob, 32, 10**8).unsqueeze(0))[0]
    got = torch.tensor([pred["probabilities"][c] for c in CLASSES])
    assert torch.allclose(got, expected, atol=1e-6)
    assert abs(float(got.sum()) - 1) < 1e-5
    assert pred["index"] == int(expected.argmax()) and pred["label"] == CLASSES[pred["index"]]


def test_batch_keeps_request_order_in_one_forward_pass(client, reference, monkeypatch):
    blobs = [encode(noise_image(s, size=(20 + s, 30))) for s in range(6)]
    # Some all-black/white images so that both classes are likely present.
    blobs += [encode(Image.new("RGB", (32, 32), c)) for c in ("black", "white", "gray")]
    calls = []
    original = LocalClassifier.predict_proba
    monkeypatch.setattr(LocalClassifier, "predict_proba", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    resp = client.post("/predict", files=files(*blobs))
    assert resp.status_code == 200 and calls == [len(blobs)]
    expected = original(reference, torch.stack([decode_image(b, 32, 10**8) for b in blobs]))
    got = torch.tensor([[p["probabilities"][c] for c in CLASSES] for p in resp.json()["predictions"]])
    assert torch.allclose(got, expected, atol=1e-6)
    reversed_resp = client.post("/predict", files=files(*reversed(blobs)))
    assert reversed_resp.json()["predictions"] == list(reversed(resp.json()["predictions"]))
    assert reversed_resp.headers["X-Query-Count"] == str(2 * len(blobs))


@pytest.mark.parametrize("fmt,mode,kw", [
    ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("WEBP", "RGB", {"lossless": True}), ("BMP", "RGB", {}),
    ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "I;16", {}), ("PNG", "1", {}), ("PNG", "LA", {}),
])
def test_every_accepted_format_and_mode_is_classified(client, fmt, mode, kw):
    img = noise_image(3, mode=mode) if mode != "I;16" else Image.new("I;16", (24, 24), 40000)
    resp = client.post("/predict", files=files(encode(img, fmt, **kw)))
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["label"] in CLASSES


def test_gif_uses_its_first_frame(client):
    first = Image.new("RGB", (32, 32), "white").convert("P")
    second = Image.new("RGB", (32, 32), "black").convert("P")
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    got = client.post("/predict", files=files(gif)).json()["predictions"][0]
    want = client.post("/predict", files=files(encode(first.convert("RGB")))).json()["predictions"][0]
    assert got == want


def test_label_only_mode_reveals_no_probabilities(make_settings):
    blobs = [encode(noise_image(s)) for s in range(4)] + [encode(Image.new("RGB", (32, 32), "white"))]
    with (
        TestClient(create_app(make_settings())) as proba,
        TestClient(create_app(make_settings(output="label"))) as label,
    ):
        full = proba.post("/predict", files=files(*blobs)).json()["predictions"]
        resp = label.post("/predict", files=files(*blobs))
        assert label.get("/healthz").json()["output"] == "label"
    assert resp.status_code == 200
    hard = resp.json()["predictions"]
    assert all(set(p) == {"label", "index"} for p in hard)
    assert [(p["label"], p["index"]) for p in hard] == [(p["label"], p["index"]) for p in full]
    assert resp.json()["queries"] == len(blobs) and resp.headers["X-Query-Count"] == str(len(blobs))


def test_client_ids_are_counted_separately_and_validated(client):
    blob = encode(noise_image(4))
    assert (
        client.post("/predict", files=files(blob, blob), headers={"X-Client-Id": "alice"}).headers["X-Query-Count"]
        == "2"
    )
    assert client.post("/predict", files=files(blob)).headers["X-Query-Count"] == "1"
    assert client.post("/predict", files=files(blob), headers={"X-Client-Id": "alice"}).headers["X-Query-Count"] == "3"
    assert_error(client.post("/predict", files=files(blob), headers={"X-Client-Id": "has space"}), 400, "invalid_input")
    assert_error(client.post("/predict", files=files(blob), headers={"X-Client-Id": "x" * 65}), 400, "invalid_input")
    assert queries_by_client(client) == {"alice": 3.0, "anonymous": 1.0}


def test_client_label_cardinality_is_capped(make_settings):
    blob = encode(noise_image(5))
    with TestClient(create_app(make_settings(max_client_labels=2))) as c:
        for name in ("a", "b", "c", "d", "a"):
            resp = c.post("/predict", files=files(blob), headers={"X-Client-Id": name})
        assert resp.headers["X-Query-Count"] == "2"  # exact per client even past the label cap
        assert queries_by_client(c) == {"a": 2.0, "b": 1.0, "other": 2.0}


# ---------------------------------------------------------------- errors: each one, and none counts a query

def _error_cases(max_images: int):
    good = encode(noise_image(6))
    png = encode(noise_image(7, size=(64, 64)))
    tiff = encode(noise_image(8), "TIFF")
    return {
        "not_an_image": (files(b"hello, this is text and not an image"), 415, "unsupported_media_type"),
        "empty_file": (files(b""), 400, "invalid_input"),
        "truncated": (files(png[: len(png) // 2]), 400, "invalid_input"),
        "unsupported_format": (files(tiff), 415, "unsupported_media_type"),
        "one_bad_in_a_batch": (files(good, b"junk", good), 415, "unsupported_media_type"),
        "no_image_field": (files(good, field="picture"), 422, "validation_error"),
        "too_many_files": (files(*[good] * (max_images + 1)), 413, "payload_too_large"),
        "pixel_limit": (files(encode(Image.new("RGB", (80, 80)))), 413, "payload_too_large"),
        "pillow_bomb": (files(png_header_only(100_000, 100_000)), 413, "payload_too_large"),
    }


@pytest.mark.parametrize("case", list(_error_cases(3)))
def test_each_error_has_the_one_shape_and_counts_no_query(make_settings, case):
    request_files, status, code = _error_cases(3)[case]
    with TestClient(create_app(make_settings(max_images=3, max_pixels=70 * 70))) as c:
        assert_error(c.post("/predict", files=request_files), status, code)
        ok = c.post("/predict", files=files(encode(noise_image(9))))
        assert ok.headers["X-Query-Count"] == "1"
        samples = metric_samples(c.get("/metrics").text)
        errors = {(s.labels["code"], s.labels["status"]): s.value for s in samples["blackbox_errors_total"]}
        assert errors == {(code, str(status)): 1.0}
        assert [s.value for s in samples["blackbox_queries_all_total"]] == [1.0]


def test_pixel_limit_is_checked_before_decoding(make_settings, monkeypatch):
    import advexplain.shared.images as images

    def must_not_decode(*a, **k):
        raise AssertionError("decoded an image that is over the pixel limit")

    monkeypatch.setattr(images, "load_pil_rgb", must_not_decode)
    with TestClient(create_app(make_settings(max_pixels=100))) as c:
        assert_error(c.post("/predict", files=files(encode(Image.new("RGB", (11, 10))))), 413, "payload_too_large")


def test_no_body_and_wrong_content_type_are_422(client):
    assert_error(client.post("/predict"), 422, "validation_error")
    assert_error(client.post("/predict", json={"image": "x"}), 422, "validation_error")


def test_body_over_the_byte_limit_is_413(make_settings):
    with TestClient(create_app(make_settings(max_upload_bytes=50_000))) as c:
        big = encode(noise_image(10, size=(200, 200)))  # ~120 kB of incompressible PNG
        assert len(big) > 50_000
        assert_error(c.post("/predict", files=files(big)), 413, "payload_too_large")
        assert c.post("/predict", files=files(encode(noise_image(11)))).headers["X-Query-Count"] == "1"


def test_unknown_paths_use_the_error_shape(client):
    assert_error(client.get("/weights"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


def _asgi_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), *headers],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }


def _send_endless_body(app, headers) -> tuple[int, int, dict]:
    """POST an endless body straight through ASGI; returns (status, chunks the app pulled, error body)."""
    chunk = b"x" * 65536
    # A well-formed start of a file part, then endless file content.
    head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n' \
           b"Content-Type: image/png\r\n\r\n"
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled > 1000:  # bounded: a server that reads everything fails the test instead of hanging
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": head + chunk if pulled == 1 else chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    async def main():
        async with app.router.lifespan_context(app):
            await app(_asgi_scope(headers), receive, send)

    asyncio.run(main())
    import json

    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return sent[0]["status"], pulled, body


def test_content_length_over_the_limit_is_refused_without_reading_the_body(make_settings):
    app = create_app(make_settings(max_upload_bytes=100_000))
    status, pulled, body = _send_endless_body(app, [(b"content-length", b"50000000")])
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert pulled == 0


def test_chunked_body_stops_being_read_past_the_limit(make_settings):
    app = create_app(make_settings(max_upload_bytes=200_000))
    status, pulled, body = _send_endless_body(app, [])
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert pulled <= 200_000 // 65536 + 1


# ---------------------------------------------------------------- concurrency and threads

def test_counter_is_exact_under_200_concurrent_requests(make_settings):
    # All 200 arrive at once: a queue that holds them all (the default, 64, would refuse some with 503).
    app = create_app(make_settings(workers=2, max_queue=200))
    blob = encode(noise_image(12))
    clients = ["alice", "bob", "carol", "anonymous"]
    plan = [(clients[i % 4], 1 + i % 3) for i in range(200)]  # (client, images in the request)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://blackbox") as http:
                async def one(client_id, n):
                    headers = {} if client_id == "anonymous" else {"X-Client-Id": client_id}
                    return client_id, n, await http.post("/predict", files=files(*[blob] * n), headers=headers)

                results = await asyncio.gather(*(one(c, n) for c, n in plan))
                metrics = (await http.get("/metrics")).text
        return results, metrics, app

    results, metrics, _ = asyncio.run(main())
    assert all(r.status_code == 200 for _, _, r in results)
    want = Tally()
    for c, n in plan:
        want[c] += n
    for name in clients:
        seen = sorted(int(r.headers["X-Query-Count"]) for c, _, r in results if c == name)
        # Each request saw a distinct running total; the last one equals the client's sum.
        assert len(set(seen)) == len(seen) and seen[-1] == want[name]
        assert sum(r.json()["queries"] for c, _, r in results if c == name) == want[name]
    samples = metric_samples(metrics)
    assert {s.labels["client"]: s.value for s in samples["blackbox_queries_total"]} == {
        k: float(v) for k, v in want.items()
    }
    assert samples["blackbox_queries_all_total"][0].value == sum(want.values())


def test_torch_runs_off_the_event_loop(make_settings, monkeypatch):
    threads = []
    original = LocalClassifier.predict_proba
    monkeypatch.setattr(LocalClassifier, "predict_proba",
                        lambda self, x: threads.append(threading.get_ident()) or original(self, x))
    app = create_app(make_settings())

    async def main():
        loop_thread = threading.get_ident()
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bb") as http:
                resp = await http.post("/predict", files=files(encode(noise_image(13))))
        return loop_thread, resp

    loop_thread, resp = asyncio.run(main())
    assert resp.status_code == 200 and threads and all(t != loop_thread for t in threads)


# ---------------------------------------------------------------- metrics, OpenAPI, settings

def test_metrics_parse_and_cover_queries_latency_and_errors(client):
    client.post("/predict", files=files(encode(noise_image(14))), headers={"X-Client-Id": "m"})
    client.post("/predict", files=files(b"nope"))
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["blackbox_queries"].type == "counter"
    assert families["blackbox_request_duration_seconds"].type == "histogram"
    samples = metric_samples(resp.text)
    counts = {
        (s.labels["route"], s.labels["status"]): s.value for s in samples["blackbox_request_duration_seconds_count"]
    }
    assert counts[("/predict", "200")] == 1 and counts[("/predict", "415")] == 1
    assert {s.labels["client"]: s.value for s in samples["blackbox_queries_total"]} == {"m": 1.0}
    assert [(s.labels["code"], s.value) for s in samples["blackbox_errors_total"]] == [("unsupported_media_type", 1.0)]


def test_apps_do_not_share_metrics(make_settings):
    blob = encode(noise_image(15))
    with TestClient(create_app(make_settings())) as a, TestClient(create_app(make_settings())) as b:
        a.post("/predict", files=files(blob))
        assert queries_by_client(a) == {"anonymous": 1.0} and queries_by_client(b) == {}


def test_openapi_documents_predict_and_its_errors_and_nothing_else(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/predict", "/healthz", "/metrics"}
    post = schema["paths"]["/predict"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    body_ref = post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert "image" in schema["components"]["schemas"][body_ref]["properties"]
    for status in ("400", "413", "415", "422"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), (status, ref)
    assert "X-Query-Count" in post["responses"]["200"]["headers"]


def test_settings_come_from_blackbox_env_and_fail_fast(tiny_models, monkeypatch):
    monkeypatch.setenv("BLACKBOX_MODEL", str(tiny_models["blackbox"]))
    monkeypatch.setenv("BLACKBOX_MAX_IMAGES", "7")
    monkeypatch.setenv("BLACKBOX_OUTPUT", "label")
    monkeypatch.setenv("BLACKBOX_PORT", "9001")
    s = BlackboxSettings()
    assert (s.max_images, s.output, s.port, s.model) == (7, "label", 9001, tiny_models["blackbox"])
    assert BlackboxSettings(max_images=3).max_images == 3  # explicit beats the environment
    for bad in ({"output": "logits"}, {"max_images": 0}, {"port": 70000}, {"model": tiny_models["blackbox"].parent},
                {"device": "tpu"}, {"threads": 0}, {"max_upload_bytes": 10}):
        with pytest.raises(ValidationError):
            BlackboxSettings(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="CUDA"):
            BlackboxSettings(device="cuda")
