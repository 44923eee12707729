"""OIP everywhere a black-box URL is taken, against real `kserve.ModelServer` processes: the explainer
(`serve explainer --blackbox-url .../v2/models/<name>`), distillation (`train surrogate --distill-from`)
and `evaluate --blackbox-url`. Two servers: our tiny black box label-only behind `serve blackbox
--protocol oip --output label` (FP32 NCHW), and the same network exported to ONNX taking UINT8 NHWC.

Every query count is checked against the server's own counter, and every returned adversarial
image against the server itself."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
from PIL import Image

from advexplain.shared.data import load_photos
from advexplain.shared.images import decode_photo
from advexplain.shared.oip import OipClassifier

pytest.importorskip("advexplain.services.blackbox.oip", reason="the kserve extra is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]')")

from oip_servers import nhwc_onnx_model, oip_blackbox_label, onnx_oip_box  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.integration

CLASSES = ("defective", "functional")
CLIENT = "integration-oip"
# Uploads at sizes and aspect ratios neither model has, one of them a JPEG.
SIZES = [((150, 120), "PNG"), ((120, 150), "PNG"), ((200, 170), "JPEG")]


def upload_bytes(cell: torch.Tensor, size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(cell.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.LANCZOS)
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def classify(server, data: bytes, client: str) -> str:
    """What the server says about an encoded image, sent as the explainer sends it: the decoded photo."""
    with OipClassifier(server.model_url, CLASSES, client_id=client) as box:
        x = decode_photo(data, 10**8).image.unsqueeze(0)
        return CLASSES[int(box.predict_proba(x).argmax())]


def mistakes(server, count: int) -> list[tuple[bytes, str, tuple[int, int]]]:
    photos = load_photos("elpv", "validation")
    found = []
    for i in range(len(photos)):
        size, fmt = SIZES[len(found) % len(SIZES)]
        data = upload_bytes(photos.photos[i], size, fmt)
        if classify(server, data, "screening") != CLASSES[photos.labels[i]]:
            found.append((data, CLASSES[photos.labels[i]], size))
            if len(found) == count:
                return found
    raise AssertionError("the tiny black box should get some elpv photos wrong")


def explain_through(explainer, server, count: int = 4, per_client: bool = True) -> None:
    health = httpx.get(f"{explainer.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["blackbox"] == "ok", health.text
    cases = mistakes(server, count)
    counted = (lambda: server.counted(CLIENT)) if per_client else server.counted
    successes = 0
    for data, label, size in cases:
        before = counted()
        resp = httpx.post(f"{explainer.url}/explain", files={"image": ("photo", data, "application/octet-stream")},
                          data={"label": label, "max_queries": "30"}, timeout=120)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["queries"] == counted() - before, "queries must equal the server's own count"
        assert body["search_queries"] == body["queries"] - 1
        assert (body["width"], body["height"]) == size and not body["downscaled"]
        assert body["original_prediction"] != label
        images = {k: Image.open(io.BytesIO(base64.b64decode(v))) for k, v in body["images"].items()}
        assert images["adversarial"].size == images["saliency"].size == images["overlay"].size == size
        if body["success"]:
            successes += 1
            assert body["final_prediction"] == label and body["linf"] <= body["max_linf"]
            adversarial = base64.b64decode(body["images"]["adversarial"])
            assert classify(server, adversarial, "checker") == label, \
                "the server itself must classify the returned PNG as the label"
        else:
            assert body["failure_reason"] in ("max_queries", "max_linf")
    assert successes >= 1, f"none of {len(cases)} explanations over OIP succeeded"


def test_explainer_against_our_label_only_oip_box(oip_blackbox_label, tiny_models, service_factory):
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url",
                                              oip_blackbox_label.model_url, "--client-id", CLIENT]).start(timeout=90)
    explain_through(explainer, oip_blackbox_label)


def test_explainer_against_an_nhwc_uint8_onnx_box_set_from_the_environment(onnx_oip_box, tiny_models, service_factory):
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--client-id", CLIENT],
                                env={"EXPLAINER_BLACKBOX_URL": onnx_oip_box.model_url}).start(timeout=90)
    explain_through(explainer, onnx_oip_box, per_client=False)  # this server counts every image, not per client


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADVEXPLAIN_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "advexplain", "--threads", "1", *argv], capture_output=True,
                          text=True, env=env, timeout=600)


def test_distillation_spends_exactly_its_budget_on_the_server(onnx_oip_box, tmp_path):
    before = onnx_oip_box.counted()
    out = tmp_path / "distilled"
    done = run_cli("train", "surrogate", "--data", "elpv", "--epochs", "4", "--batch-size", "16", "--image-size", "32",
                   "--width", "0.0625", "--distill-from", onnx_oip_box.model_url, "--distill-budget", "150",
                   "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    distillation = json.loads((out / "config.json").read_text())["distillation"]
    assert distillation["queries"] == 150 == onnx_oip_box.counted() - before
    assert distillation["source"] == onnx_oip_box.model_url
    assert distillation["targets"] == "soft"  # the ONNX model answers logits, read as probabilities


def test_evaluate_through_the_server_counts_screening_and_explanations(oip_blackbox_label, tiny_models, tmp_path):
    client = "advexplain-evaluate"
    before = oip_blackbox_label.counted(client)
    report = tmp_path / "report"
    done = run_cli("evaluate", "--data", "elpv", "--split", "validation", "--surrogate", str(tiny_models["surrogate"]),
                   "--blackbox-url", oip_blackbox_label.model_url, "--limit", "2", "--quiet", "--out", str(report))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    lines = [json.loads(line) for line in (report / "explanations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["size"] == [300, 300] for line in lines)  # photos at their own size
    assert metrics["screening_queries"] == 525  # every validation photo, once, to find the mistakes
    assert metrics["oracle"] == oip_blackbox_label.model_url
    assert oip_blackbox_label.counted(client) - before == metrics["screening_queries"] + sum(
        line["queries"] for line in lines
    )


def test_oip_flags_with_a_predict_url_are_refused_before_any_query(tiny_models, tmp_path):
    done = run_cli("evaluate", "--data", "elpv", "--split", "validation", "--surrogate", str(tiny_models["surrogate"]),
                   "--blackbox-url", "http://127.0.0.1:9", "--oip-pixel-scale", "255", "--quiet",
                   "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "Open Inference Protocol" in done.stderr
