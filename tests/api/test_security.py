"""Security properties: the white-box route is unreachable without its token and refuses before reading the
body; the token is never logged or echoed; checkpoints load through safetensors only (nothing is unpickled);
size limits hold before decoding; the black box's per-client memory is bounded without losing a count."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from advexplain.services.blackbox.app import create_app as create_blackbox
from advexplain.services.blackbox.counter import QueryCounter
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.explainer.app import create_app as create_explainer
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import CheckpointError
from tests.metrics import metric

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "sekret-Token-for-tests-0123456789"
ROUTE = "/internal/whitebox/explain"


def png(size=(32, 32), color=(120, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def form(label="defective", **fields) -> dict:
    return {"files": {"image": ("x.png", png(), "image/png")}, "data": {"label": label, **fields}}


@pytest.fixture(scope="module")
def box(tiny_models):
    with TestClient(create_blackbox(BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1))) as c:
        yield c


def explainer_settings(tiny_models, **overrides) -> ExplainerSettings:
    values = dict(surrogate=[tiny_models["surrogate"]], blackbox_url="http://testserver", device="cpu", threads=1,
                  whitebox_model=tiny_models["blackbox"], whitebox_token=TOKEN)
    values.update(overrides)
    return ExplainerSettings(**values)


@pytest.fixture(scope="module")
def explainer(tiny_models, box):
    with TestClient(create_explainer(explainer_settings(tiny_models), blackbox_client=box)) as c:
        yield c


# ---------------------------------------------------------------- the white-box route and its token

@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": ""}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer    "}, 401),
    ({"Authorization": f"Basic {TOKEN}"}, 401),
    ({"Authorization": TOKEN}, 401),
    ({"Authorization": f"Token {TOKEN}"}, 401),
    ({"X-Token": TOKEN}, 401),
    ({"Cookie": f"token={TOKEN}"}, 401),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403),
    ({"Authorization": f"Bearer {TOKEN.upper()}"}, 403),
    ({"Authorization": f"Bearer {TOKEN[:8]}"}, 403),
    ({"Authorization": b"Bearer " + "é".encode() * 20}, 403),
    ({"Authorization": f"Bearer {TOKEN} {TOKEN}"}, 403),
])
def test_whitebox_route_needs_exactly_the_token(explainer, box, headers, status):
    before = box.app.state.blackbox.counter.total
    resp = explainer.post(ROUTE, headers=headers, **form())
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and resp.json()["error"]["code"] == (
        "unauthorized" if status == 401 else "forbidden"
    )
    if status == 401:
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in resp.text and TOKEN not in str(resp.headers)
    assert box.app.state.blackbox.counter.total == before


@pytest.mark.parametrize(
    "path",
    [
        ROUTE,
        ROUTE + "/",
        "/internal/whitebox/",
        "/internal/",
        "/%69nternal/whitebox/explain",
        "//internal/whitebox/explain",
        "/INTERNAL/whitebox/explain",
    ],
)
def test_no_path_spelling_reaches_the_whitebox_without_the_token(explainer, path):
    resp = explainer.post(path, params={"token": TOKEN}, **form())
    assert resp.status_code in (401, 404, 405), (path, resp.status_code, resp.text)
    assert set(resp.json()) == {"error"}


def test_the_right_token_works_and_is_case_insensitive_in_its_scheme(explainer):
    for scheme in ("Bearer", "bearer", "BEARER"):
        resp = explainer.post(ROUTE, headers={"Authorization": f"{scheme} {TOKEN}"}, **form(max_queries="5"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["queries"] >= 1


def _post_endless(app, headers: list[tuple[bytes, bytes]], path: str = ROUTE, limit_chunks: int = 400):
    """POST a never-ending multipart body straight through ASGI; (status, chunks the app pulled, body)."""
    head = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk = b"\x89PNG" * 16384
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled > limit_chunks:  # bounded: an app that reads everything fails instead of hanging
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": head + chunk if pulled == 1 else chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"explainer"), (b"content-type", b"multipart/form-data; boundary=xyz"), *headers],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }

    async def main():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(main())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], pulled, json.loads(body) if body else None


@pytest.mark.parametrize("headers,status", [
    ([], 401),
    ([(b"authorization", b"Bearer not-the-token-at-all-000")], 403),
    ([(b"authorization", b"Basic " + TOKEN.encode())], 401),
])
def test_a_refused_request_is_refused_before_its_body_is_read(tiny_models, box, headers, status):
    app = create_explainer(explainer_settings(tiny_models), blackbox_client=box)
    got, pulled, body = _post_endless(app, headers)
    assert got == status and body["error"]["code"] in ("unauthorized", "forbidden")
    assert pulled == 0, f"the app read {pulled} body chunks of a request it refuses"


def test_with_the_token_the_body_is_read_and_the_byte_limit_still_applies(tiny_models, box):
    app = create_explainer(explainer_settings(tiny_models, max_upload_bytes=300_000), blackbox_client=box)
    got, pulled, body = _post_endless(app, [(b"authorization", f"Bearer {TOKEN}".encode())])
    assert got == 413 and body["error"]["code"] == "payload_too_large"
    assert 1 <= pulled <= 300_000 // 65536 + 2


def test_refusals_are_counted_as_errors_in_metrics(tiny_models, box):
    with TestClient(create_explainer(explainer_settings(tiny_models), blackbox_client=box)) as c:
        c.post(ROUTE, **form())
        c.post(ROUTE, headers={"Authorization": "Bearer wrong-wrong-wrong-wrong"}, **form())
        text = c.get("/metrics").text
    assert metric(text, "explainer_errors_total", code="unauthorized", status="401") == 1
    assert metric(text, "explainer_errors_total", code="forbidden", status="403") == 1


def test_the_token_is_never_logged_or_echoed(tiny_models, box, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    seen = []
    with TestClient(create_explainer(explainer_settings(tiny_models), blackbox_client=box)) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        seen.append(c.post(ROUTE, headers=auth, **form(max_queries="3")))             # success
        seen.append(c.post(ROUTE, headers=auth, **form(tau="nan")))                     # validation error
        seen.append(c.post(ROUTE, headers=auth, **form(label="no-such-class")))         # domain error
        seen.append(c.post(ROUTE, headers={"Authorization": f"Bearer {TOKEN}x"}, **form()))  # near miss
        seen.append(c.post(ROUTE, headers={"Authorization": f"Bearer {TOKEN[:-2]}"}, **form()))
        seen.append(c.post(ROUTE, headers=auth, files={"image": ("x.png", b"junk", "image/png")},
                           data={"label": "0"}))                                        # not an image
        # The token sent as a form field is the caller's own input: echoing it back to them is fine, logging is not.
        own = c.post(ROUTE, headers=auth, **form(label=TOKEN))
        seen.append(c.get("/openapi.json"))
        seen.append(c.get("/metrics"))
        seen.append(c.get("/healthz"))
    assert [r.status_code for r in seen] == [200, 422, 400, 403, 403, 415, 200, 200, 200] and own.status_code == 400
    for resp in seen:
        assert TOKEN not in resp.text and TOKEN not in str(resp.headers)
    assert caplog.records, "logging was captured"
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and TOKEN not in repr(record.args)
    settings = explainer_settings(tiny_models)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings) and TOKEN not in settings.model_dump_json()


# ---------------------------------------------------------------- checkpoints: safetensors only

class Payload:
    """Unpickling this creates a marker file: proof that something unpickled the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_posing_as_weights_is_refused_without_being_unpickled(tiny_models, tmp_path):
    bad = tmp_path / "evil"
    shutil.copytree(tiny_models["blackbox"], bad)
    marker = tmp_path / "pwned"
    weights = bad / "model.safetensors"
    weights.write_bytes(pickle.dumps(Payload(marker)))
    config = json.loads((bad / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a consistent, forged checkpoint
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="safetensors"):
        LocalClassifier.from_checkpoint(bad)
    settings = BlackboxSettings(model=bad, device="cpu", threads=1)
    with pytest.raises(CheckpointError):
        with TestClient(create_blackbox(settings)):
            pass
    assert not marker.exists(), "the checkpoint was unpickled"


def test_a_folder_with_only_pickled_weights_is_not_a_checkpoint(tiny_models, tmp_path):
    folder = tmp_path / "torch-style"
    folder.mkdir()
    shutil.copy(tiny_models["blackbox"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="model.safetensors"):
        BlackboxSettings(model=folder)
    with pytest.raises(ValueError, match="model.safetensors"):
        ExplainerSettings(surrogate=[folder])


def test_no_code_path_unpickles():
    pattern = re.compile(
        r"\btorch\.load\(|\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.|\bcloudpickle\b|weights_only\s*=\s*False"
    )
    offenders = []
    for folder in ("shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# ---------------------------------------------------------------- limits before decoding, on the explainer too

def test_explainer_pixel_limit_is_checked_before_decoding(tiny_models, box, monkeypatch):
    import advexplain.shared.images as images

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(images, "load_pil_rgb", must_not_decode)
    with TestClient(create_explainer(explainer_settings(tiny_models, max_pixels=100), blackbox_client=box)) as c:
        before = box.app.state.blackbox.counter.total
        resp = c.post("/explain", files={"image": ("x.png", png((11, 10)), "image/png")}, data={"label": "0"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
        assert box.app.state.blackbox.counter.total == before


def test_explainer_content_length_over_the_limit_is_refused_unread(tiny_models, box):
    app = create_explainer(explainer_settings(tiny_models, max_upload_bytes=100_000), blackbox_client=box)
    got, pulled, body = _post_endless(app, [(b"content-length", b"50000000")], path="/explain")
    assert got == 413 and body["error"]["code"] == "payload_too_large" and pulled == 0


def test_file_count_limit_stops_the_multipart_parser(tiny_models, box, monkeypatch):
    """A second file is refused as soon as the parser meets it: the files after it are never parsed."""
    from starlette.formparsers import MultiPartParser

    parts = []
    original = MultiPartParser.on_part_begin
    monkeypatch.setattr(MultiPartParser, "on_part_begin", lambda self: parts.append(1) or original(self))
    files = [("image", (f"{i}.png", png(), "image/png")) for i in range(50)]
    with TestClient(create_explainer(explainer_settings(tiny_models), blackbox_client=box)) as c:
        resp = c.post("/explain", files=files, data={"label": "0"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert len(parts) <= 3, f"parsed {len(parts)} parts of a request that has too many files"


# ---------------------------------------------------------------- bounded per-client memory, exact totals

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 9)), max_size=60))
def test_query_counter_is_bounded_and_never_loses_a_count(max_clients, plan):
    counter = QueryCounter(max_clients)
    for client, n in plan:
        own = counter.add(client, n)
        assert own >= n and counter.of(client) == own  # the caller's own total is exact right now
        snapshot = counter.snapshot()
        assert len(snapshot) <= max_clients
        assert sum(snapshot.values()) + counter.retired == counter.total
    assert counter.total == sum(n for _, n in plan)


def test_a_busy_client_keeps_its_exact_total_while_ids_are_minted(tiny_models):
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, max_clients=8)
    blob = png()
    with TestClient(create_blackbox(settings)) as c:
        for i in range(40):
            c.post("/predict", files={"image": ("a.png", blob, "image/png")}, headers={"X-Client-Id": f"minted-{i}"})
            resp = c.post("/predict", files={"image": ("a.png", blob, "image/png")}, headers={"X-Client-Id": "busy"})
            assert resp.headers["X-Query-Count"] == str(i + 1)
        counter = c.app.state.blackbox.counter
        assert len(counter.snapshot()) <= 8 and counter.total == 80
        assert sum(counter.snapshot().values()) + counter.retired == 80
        assert c.get("/healthz").status_code == 200
