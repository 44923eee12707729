"""OipClassifier against real `kserve.ModelServer` processes on loopback: our black box behind
`advexplain serve blackbox --protocol oip`, and an ONNX model (UINT8 NHWC, logits) under onnxruntime.

Each answer is checked against the same network run locally on the same 8-bit images, and every
query count against the server's own counter."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest
import torch
import torch.nn.functional as F

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import UpstreamBadResponse, UpstreamUnavailable
from advexplain.shared.oip import OipClassifier, OipInput
from tests.metrics import families

# Through our module: it imports kserve without pytest's command line (kserve parses sys.argv on import).
pytest.importorskip("advexplain.services.blackbox.oip", reason="the kserve extra is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]')")

# pytest puts tests/integration on sys.path (no __init__.py), so the helpers import by their own name.
from oip_servers import (  # noqa: E402,F401  (fixtures)
    OipBlackbox,
    OnnxOipBox,
    nhwc_onnx_model,
    oip_blackbox,
    oip_blackbox_label,
    onnx_oip_box,
    start,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local(tiny_models) -> LocalClassifier:
    return LocalClassifier.from_checkpoint(tiny_models["blackbox"])


def eight_bit(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round().div(255)


def resized(x8: torch.Tensor, size: int, uint8: bool = False) -> torch.Tensor:
    """What the box receives for an 8-bit photo of another size: resized (and for UINT8, rounded again)."""
    y = F.interpolate(x8 * 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 255)
    return (y.round() if uint8 else y) / 255


def images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


# -- our black box over OIP --------------------------------------------------------------------

def test_our_oip_box_is_ready_and_describes_its_input(oip_blackbox, local):
    with OipClassifier(oip_blackbox.model_url, local.classes) as box:
        assert box.ready() == (True, "ready")
        assert box.input == OipInput(name="images", datatype="FP32", layout="NCHW", channels=3,
                                     height=local.image_size, width=local.image_size)
        assert box.queries == 0
    meta = httpx.get(oip_blackbox.model_url, timeout=10).json()
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}]


def test_predictions_equal_the_local_models_and_counts_equal_the_servers(oip_blackbox, local):
    client = "oip-equal"
    x = images(7, local.image_size, local.image_size, seed=1)
    before = x.clone()
    with OipClassifier(oip_blackbox.model_url, local.classes, client_id=client, max_images=4) as box:
        probs = box.predict_proba(x)
        assert torch.equal(x, before)
        assert probs.dtype == torch.float32 and probs.shape == (7, 2)
        assert torch.allclose(probs, local.predict_proba(eight_bit(x)), atol=1e-6)
        assert box.queries == 7 == oip_blackbox.counted(client) == box.last_query_count


def test_non_square_uploads_are_resized_on_the_query_path(oip_blackbox, local):
    client = "oip-photo"
    photo = images(3, 45, 29, seed=2)  # the user's photo at its own size
    with OipClassifier(oip_blackbox.model_url, local.classes, client_id=client) as box:
        probs = box.predict_proba(photo)
        expected = local.predict_proba(resized(eight_bit(photo), local.image_size))
        assert torch.allclose(probs, expected, atol=1e-5)
        assert box.queries == 3 == oip_blackbox.counted(client)


def test_label_only_box_answers_one_hot_rows(oip_blackbox_label, local):
    client = "oip-label"
    x = images(6, 40, 40, seed=3)
    with OipClassifier(oip_blackbox_label.model_url, local.classes, client_id=client) as box:
        out = box.predict_proba(x)
        expected = local.predict_proba(resized(eight_bit(x), local.image_size)).argmax(1)
        assert torch.equal(out, F.one_hot(expected, 2).float())
        assert box.queries == 6 == oip_blackbox_label.counted(client)
    meta = httpx.get(oip_blackbox_label.model_url, timeout=10).json()
    assert meta["outputs"] == [{"name": "labels", "datatype": "INT64", "shape": [-1]}]


@pytest.mark.parametrize("tensor, why", [
    ({"name": "images", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.5] * 192}, "shape"),
    ({"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [1.5] * 3072}, "[0, 1]"),
    ({"name": "images", "datatype": "INT32", "shape": [1, 3, 32, 32], "data": [0] * 3072}, "FP32"),
    ({"name": "other", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * 3072}, "named"),
    ({"name": "images", "datatype": "FP32", "shape": [65, 3, 32, 32], "data": [0.5] * (65 * 3072)}, "N <= 64"),
])
def test_bad_tensors_are_400_and_count_nothing(oip_blackbox, tensor, why):
    before = oip_blackbox.counted()
    resp = httpx.post(f"{oip_blackbox.model_url}/infer", json={"inputs": [tensor]}, timeout=30)
    assert resp.status_code == 400 and why in resp.json()["error"], resp.text
    assert oip_blackbox.counted() == before


def test_metrics_carry_kserve_and_our_counters(oip_blackbox):
    names = families(httpx.get(f"{oip_blackbox.url}/metrics", timeout=10).text)
    assert {"blackbox_queries_all", "request_predict_seconds"} <= names
    assert "blackbox_request_duration_seconds" not in names  # KServe's own latency metrics stand instead


# -- a third-party-style model: ONNX, UINT8 NHWC, logits ---------------------------------------

def test_onnx_nhwc_uint8_model_answers_like_the_local_network(onnx_oip_box, local):
    with OipClassifier(onnx_oip_box.model_url, local.classes, client_id="onnx") as box:
        assert box.ready() == (True, "ready")
        size = local.image_size
        assert box.input == OipInput(
            name="pixels", datatype="UINT8", layout="NHWC", channels=3, height=size, width=size
        )
        before = onnx_oip_box.counted()
        square = images(4, size, size, seed=4)
        photo = images(3, 50, 37, seed=5)
        assert torch.allclose(box.predict_proba(square), local.predict_proba(eight_bit(square)), atol=1e-4)
        expected = local.predict_proba(resized(eight_bit(photo), size, uint8=True))
        assert torch.allclose(box.predict_proba(photo), expected, atol=1e-4)
        assert box.queries == 7 == onnx_oip_box.counted() - before
        assert box.last_query_count is None  # this server sends no X-Query-Count


# -- failures ----------------------------------------------------------------------------------

def test_a_model_that_turns_unready_answers_503_as_unavailable(nhwc_onnx_model, tmp_path, local):
    server = start(OnnxOipBox(nhwc_onnx_model, ["--unready-after", "2"], name="flaky", log_dir=tmp_path))
    try:
        with OipClassifier(server.model_url, local.classes) as box:
            box.predict_proba(images(2, 32, 32, seed=6))
            ok, detail = box.ready()
            assert not ok and "503" in detail
            with pytest.raises(UpstreamUnavailable, match="503"):
                box.predict_proba(images(1, 32, 32, seed=7))
            assert box.queries == 2 == server.counted()
    finally:
        server.kill()


def test_server_down_is_unavailable_and_env_settings_select_oip(tiny_models, tmp_path, local):
    server = start(OipBlackbox(["--model", str(tiny_models["blackbox"])], name="envbox", log_dir=tmp_path,
                               env={"BLACKBOX_PROTOCOL": "predict"}))
    # The flag wins over the environment (here the environment says predict, the flag oip).
    with OipClassifier(server.model_url, local.classes, connect_retries=0) as box:
        box.predict_proba(images(1, 32, 32, seed=8))
        assert server.stop() == 0  # SIGINT: KServe's server shuts down cleanly
        ok, detail = box.ready()
        assert not ok and "cannot reach" in detail
        with pytest.raises(UpstreamUnavailable, match="cannot reach"):
            box.predict_proba(images(1, 32, 32, seed=9))
        assert box.queries == 1


def test_wrong_model_name_and_non_oip_servers_are_bad_responses(oip_blackbox, local):
    with OipClassifier(f"{oip_blackbox.url}/v2/models/nope", local.classes) as box:
        assert box.ready()[0] is False
        with pytest.raises(UpstreamBadResponse, match="404"):
            box.predict_proba(images(1, 32, 32, seed=10))

    class Junk(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>a proxy's error page</html>")

        def log_message(self, *args):
            pass

    junk = http.server.HTTPServer(("127.0.0.1", 0), Junk)
    threading.Thread(target=junk.serve_forever, daemon=True).start()
    try:
        with OipClassifier(f"http://127.0.0.1:{junk.server_port}/v2/models/m", local.classes) as box:
            with pytest.raises(UpstreamBadResponse, match="not JSON"):
                box.predict_proba(images(1, 32, 32, seed=11))
            assert box.queries == 0
    finally:
        junk.shutdown()
        junk.server_close()
