"""connect_black_box: one way to reach a black box by URL (OIP model URL -> OipClassifier, else /predict ->
RemoteClassifier), one readiness interface (`health()`), and the settings and flags that carry OIP pixel options."""

from __future__ import annotations

import argparse

import httpx
import pytest
import torch
from pydantic import ValidationError

from advexplain.commands.blackbox_flags import add_oip_flags, oip_options
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.errors import InvalidInput, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from advexplain.shared.oip import OipClassifier
from advexplain.shared.protocols import Classifier
from advexplain.shared.remote import (
    NO_HEALTH_ENDPOINT,
    NOT_READY,
    READY,
    UNREACHABLE,
    RemoteBlackBox,
    RemoteClassifier,
    connect_black_box,
)

CLASSES = ("defective", "functional")
OIP = "http://box:8080/v2/models/m"


def mock(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def oip_server(ready: dict[str, int] | None = None, infer_status: int = 200):
    """An OIP server with a label-only model (FP32 NCHW 8x8 in, class indices out) that counts images."""
    ready = {"/v2/health/ready": 200, "/v2/models/m/ready": 200, **(ready or {})}
    seen = {"images": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in ready:
            return httpx.Response(ready[path], json={"ready": ready[path] == 200})
        if request.method == "GET" and path == "/v2/models/m":
            return httpx.Response(200, json={"name": "m", "inputs": [{"name": "x", "datatype": "FP32",
                                                                      "shape": [-1, 3, 8, 8]}]})
        if request.method == "POST" and path == "/v2/models/m/infer":
            if infer_status != 200:
                return httpx.Response(infer_status, json={"error": "nope"})
            n = httpx.Response(200, content=request.content).json()["inputs"][0]["shape"][0]
            seen["images"] += n
            return httpx.Response(200, json={"outputs": [{"name": "y", "datatype": "INT64", "shape": [n],
                                                          "data": [1] * n}]})
        return httpx.Response(404, json={"error": f"no route {path}"})

    return handler, seen


def predict_server(status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(404)
        if status != 200:
            return httpx.Response(status, json={"error": {"code": "x", "message": "nope"}})
        return httpx.Response(200, json={"predictions": [{"label": "functional", "index": 1}], "queries": 1})

    return handler


# -- the factory -------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [OIP, f"{OIP}/", f"{OIP}/versions/3", "https://gw/prefix/v2/models/m"])
def test_oip_model_urls_give_an_oip_classifier(url):
    box = connect_black_box(url, CLASSES, client_id="me", timeout=3.0, connect_retries=0)
    try:
        assert isinstance(box, OipClassifier) and box.classes == CLASSES and box.client_id == "me"
        assert isinstance(box, RemoteBlackBox) and isinstance(box, Classifier)
        assert box._client.timeout == httpx.Timeout(3.0, connect=3.0)
        assert box._client._transport._pool._retries == 0
    finally:
        box.close()


@pytest.mark.parametrize("url", ["http://box:8000", "http://box:8000/", "https://box/api", "http://box:8080/v2/models"])
def test_other_urls_give_a_predict_client(url):
    box = connect_black_box(url, CLASSES, client_id="me", timeout=3.0, connect_retries=1, max_images=4)
    try:
        assert isinstance(box, RemoteClassifier) and box.classes == CLASSES and box.client_id == "me"
        assert isinstance(box, RemoteBlackBox) and box.max_images == 4
        assert box._client._transport._pool._retries == 1
    finally:
        box.close()


def test_pixel_options_reach_the_oip_client_and_are_refused_for_predict():
    box = connect_black_box(OIP, CLASSES, pixel_scale=255.0, mean=(1, 2, 3), std=(4, 5, 6), max_images=5)
    assert (box.pixel_scale, box.mean, box.std, box.max_images) == (255.0, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 5)
    for bad in ({"pixel_scale": 255.0}, {"mean": (0.5,), "std": (0.2,)}):
        with pytest.raises(InvalidInput, match="Open Inference Protocol"):
            connect_black_box("http://box:8000", CLASSES, **bad)


def test_an_injected_client_is_used_and_queries_are_counted():
    handler, seen = oip_server()
    box = connect_black_box(OIP, CLASSES, client=mock(handler))
    probs = box.predict_proba(torch.rand(3, 3, 20, 13))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0]] * 3))
    assert box.queries == 3 == seen["images"]
    remote = connect_black_box("http://box:8000", CLASSES, client=mock(predict_server()))
    assert remote.predict_proba(torch.rand(1, 3, 8, 8)).argmax() == 1 and remote.queries == 1


@pytest.mark.parametrize("status, error", [(503, UpstreamUnavailable), (500, UpstreamBadResponse)])
def test_both_protocols_map_failures_to_the_same_errors(status, error):
    handler, _ = oip_server(infer_status=status)
    for box in (connect_black_box(OIP, CLASSES, client=mock(handler)),
                connect_black_box("http://box:8000", CLASSES, client=mock(predict_server(status)))):
        with pytest.raises(error):
            box.predict_proba(torch.rand(1, 3, 8, 8))
        assert box.queries == 0


def test_timeouts_are_upstream_timeouts_for_both():
    def slow(request):
        if request.url.path == "/v2/models/m":
            return oip_server()[0](request)
        raise httpx.ReadTimeout("slow", request=request)

    for url in (OIP, "http://box:8000"):
        with pytest.raises(UpstreamTimeout):
            connect_black_box(url, CLASSES, client=mock(slow)).predict_proba(torch.rand(1, 3, 8, 8))


# -- one readiness interface -------------------------------------------------------------------

def test_oip_health_states():
    handler, seen = oip_server()
    assert connect_black_box(OIP, CLASSES, client=mock(handler)).health() == (READY, "ready")
    for ready, needle in (({"/v2/models/m/ready": 503}, "/v2/models/m/ready answered 503"),
                          ({"/v2/health/ready": 503}, "/v2/health/ready answered 503"),
                          ({"/v2/models/m/ready": 404}, "404")):
        state, detail = connect_black_box(OIP, CLASSES, client=mock(oip_server(ready)[0])).health()
        assert state == NOT_READY and needle in detail

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    def silent(request):
        raise httpx.ReadTimeout("slow", request=request)

    assert connect_black_box(OIP, CLASSES, client=mock(refused)).health() == (
        UNREACHABLE, "cannot reach http://box:8080/v2/health/ready: ConnectError")
    assert connect_black_box(OIP, CLASSES, client=mock(silent)).health(timeout=0.5)[0] == UNREACHABLE
    assert seen["images"] == 0  # readiness counts nothing


def test_ready_is_health_as_a_yes_or_no():
    box = connect_black_box(OIP, CLASSES, client=mock(oip_server({"/v2/models/m/ready": 503})[0]))
    ok, detail = box.ready()
    assert ok is False and detail == box.health()[1]


def test_predict_health_states_are_the_same_constants():
    assert (
        connect_black_box("http://box:8000", CLASSES, client=mock(predict_server())).health()[0] == NO_HEALTH_ENDPOINT
    )


# -- explainer settings ------------------------------------------------------------------------

def settings(tiny_surrogate, **values) -> ExplainerSettings:
    return ExplainerSettings(surrogate=[tiny_surrogate], device="cpu", threads=1, **values)


@pytest.fixture(scope="module")
def tiny_surrogate(tmp_path_factory):
    """A checkpoint folder good enough for the settings' existence check (nothing is loaded)."""
    folder = tmp_path_factory.mktemp("surrogate")
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_explainer_oip_settings_from_the_environment(tiny_surrogate, monkeypatch):
    monkeypatch.setenv("EXPLAINER_BLACKBOX_URL", f"{OIP}/")
    monkeypatch.setenv("EXPLAINER_OIP_PIXEL_SCALE", "255")
    monkeypatch.setenv("EXPLAINER_OIP_MEAN", "123.675,116.28,103.53")
    monkeypatch.setenv("EXPLAINER_OIP_STD", "[58.395, 57.12, 57.375]")
    s = settings(tiny_surrogate)
    assert s.blackbox_url == OIP and s.oip_pixel_scale == 255.0
    assert s.oip_mean == [123.675, 116.28, 103.53] and s.oip_std == [58.395, 57.12, 57.375]
    defaults = ExplainerSettings.model_fields
    assert defaults["oip_pixel_scale"].default == 1.0 and defaults["oip_mean"].default is None


@pytest.mark.parametrize("values, field", [
    ({"oip_pixel_scale": 2}, "oip_pixel_scale"),
    ({"oip_mean": "0.5"}, "oip_std"),
    ({"oip_std": "0.5"}, "oip_std"),
    ({"oip_mean": "1,2", "oip_std": "1,2"}, "oip_mean"),
    ({"oip_mean": "1,2,3", "oip_std": "1,0,1"}, "oip_std"),
    ({"oip_mean": "1,2,3", "oip_std": "1"}, "oip_std"),
    ({"oip_mean": "nan", "oip_std": "1"}, "oip_mean"),
    ({"blackbox_url": "http://box:8000", "oip_pixel_scale": 255}, "oip_pixel_scale"),
    ({"blackbox_url": "http://box:8000", "oip_mean": "0.5", "oip_std": "0.2"}, "oip_mean"),
])
def test_bad_oip_settings_stop_the_explainer_at_start_up(tiny_surrogate, values, field):
    with pytest.raises(ValidationError) as caught:
        settings(tiny_surrogate, **{"blackbox_url": OIP, **values})
    assert field in {e["loc"][0] for e in caught.value.errors()}


# -- train / evaluate flags --------------------------------------------------------------------

def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_oip_flags(parser)
    return parser.parse_args(list(argv))


def test_oip_flags_become_the_factorys_options():
    args = flags("--oip-pixel-scale", "255", "--oip-mean", "1,2,3", "--oip-std", "[4, 5, 6]")
    assert oip_options(args, OIP, "--blackbox-url") == {"pixel_scale": 255.0, "mean": (1.0, 2.0, 3.0),
                                                        "std": (4.0, 5.0, 6.0)}
    assert oip_options(flags(), "http://box:8000", "--blackbox-url") == {"pixel_scale": 1.0, "mean": None, "std": None}
    assert oip_options(flags(), None, "--blackbox-url")["mean"] is None


@pytest.mark.parametrize("argv, url, match", [
    (("--oip-pixel-scale", "255"), "http://box:8000", "Open Inference Protocol"),
    (("--oip-mean", "0.5", "--oip-std", "0.2"), "models/blackbox", "Open Inference Protocol"),
    (("--oip-mean", "0.5", "--oip-std", "0.2"), None, "Open Inference Protocol"),
    (("--oip-mean", "0.5"), OIP, "together"),
])
def test_oip_flags_without_an_oip_url_are_refused(argv, url, match):
    with pytest.raises(InvalidInput, match=match):
        oip_options(flags(*argv), url, "--blackbox-url")


@pytest.mark.parametrize("argv", [("--oip-pixel-scale", "2"), ("--oip-mean", "1,2"), ("--oip-std", "a,b,c")])
def test_bad_oip_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        flags(*argv)
