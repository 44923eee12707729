"""OipClassifier against a fake OIP server (httpx.MockTransport): URLs, metadata, the tensors it sends,
how it reads answers, and how each failure maps to a typed error. Real servers: tests/integration/test_oip.py."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advexplain.shared.errors import InvalidInput, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from advexplain.shared.oip import OipClassifier, OipEndpoint, OipInput, TensorMetadata, is_oip_url
from advexplain.shared.protocols import Classifier

CLASSES = ("defective", "functional")
URL = "http://box:8080/v2/models/m"


class FakeServer:
    """An OIP model server in a function: metadata, readiness and infer, with knobs for misbehaving."""

    def __init__(self, shape=(-1, 3, 8, 8), datatype="FP32", answer=None):
        self.metadata = {"name": "m", "inputs": [{"name": "x", "datatype": datatype, "shape": list(shape)}],
                         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}
        self.answer = answer or self.logits
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict] = []
        self.ready = {"/v2/health/ready": 200, "/v2/models/m/ready": 200}

    @staticmethod
    def logits(body: dict) -> httpx.Response:
        n = body["inputs"][0]["shape"][0]
        data = [v for i in range(n) for v in (float(i), -float(i))]
        return httpx.Response(200, json={"model_name": "m", "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [n, 2], "data": data}]})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path in self.ready:
            code = self.ready[path]
            return httpx.Response(code, json={"ready": code == 200} if code == 200 else {"error": "not ready"})
        if request.method == "GET" and path == "/v2/models/m":
            return httpx.Response(200, json=self.metadata)
        if request.method == "POST" and path == "/v2/models/m/infer":
            body = json.loads(request.content)
            self.bodies.append(body)
            return self.answer(body)
        return httpx.Response(404, json={"error": f"no route {path}"})


def box_for(server, url: str = URL, **kwargs) -> OipClassifier:
    return OipClassifier(url, CLASSES, client=httpx.Client(transport=httpx.MockTransport(server)), **kwargs)


def outputs(shape, data, datatype="FP32"):
    return lambda body: httpx.Response(200, json={"outputs": [{"name": "y", "datatype": datatype, "shape": shape,
                                                               "data": data}]})


# -- URLs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v2/models/blackbox",
    "https://box.example:443/v2/models/blackbox/",
    "http://blackbox-predictor.ns.svc.cluster.local/v2/models/blackbox/versions/3",
    "http://gateway:80/prefix/path/v2/models/resnet-50_v1.2",
])
def test_oip_urls_are_recognised(url):
    assert is_oip_url(url)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000", "http://127.0.0.1:8000/predict", "http://h/v2/models/", "http://h/v2/models",
    "ftp://h/v2/models/m", "http://h/v2/models/m/infer", "http://h/v2/models/m/versions/", "/v2/models/m", "",
    "http://h/v1/models/m",
])
def test_other_urls_are_not_oip(url):
    assert not is_oip_url(url)


def test_endpoint_parts():
    e = OipEndpoint.parse("http://gw:80/pre/v2/models/m/versions/2/")
    assert (e.base, e.model, e.version) == ("http://gw:80/pre", "m", "2")
    assert e.model_url == "http://gw:80/pre/v2/models/m/versions/2"
    assert e.server_ready_url == "http://gw:80/pre/v2/health/ready"
    with pytest.raises(ValueError, match="Open Inference Protocol"):
        OipClassifier("http://127.0.0.1:8000", CLASSES)


# -- metadata ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ([-1, 3, 224, 224], ("NCHW", 3, 224, 224, None, True)),
    ([-1, 224, 160, 3], ("NHWC", 3, 224, 160, None, True)),
    ([1, 1, 28, 28], ("NCHW", 1, 28, 28, 1, True)),
    ([3, 32, 32], ("NCHW", 3, 32, 32, 1, False)),
    ([-1, -1, -1, 3], ("NHWC", 3, None, None, None, True)),
    ([-1, 3, -1, -1], ("NCHW", 3, None, None, None, True)),
])
def test_input_layout_comes_from_the_shape(shape, expected):
    spec = OipInput.from_metadata(TensorMetadata(name="x", datatype="FP32", shape=shape))
    assert (spec.layout, spec.channels, spec.height, spec.width, spec.batch, spec.batched) == expected


@pytest.mark.parametrize("datatype, shape", [
    ("INT32", [-1, 3, 8, 8]), ("BYTES", [-1]), ("FP32", [-1, 8, 8]), ("FP32", [-1, 5, 8, 8, 2]),
    ("FP32", [-1, 4, 8, 8]), ("FP32", [-1, 3, 0, 8]),
])
def test_inputs_it_cannot_feed_are_bad_responses(datatype, shape):
    box = box_for(FakeServer(shape=shape, datatype=datatype))
    with pytest.raises(UpstreamBadResponse):
        box.predict_proba(torch.rand(1, 3, 8, 8))
    assert box.queries == 0


def test_metadata_is_fetched_once_and_counts_nothing():
    server = FakeServer()
    box = box_for(server)
    for _ in range(3):
        box.predict_proba(torch.rand(2, 3, 8, 8))
    gets = [r for r in server.requests if r.method == "GET"]
    assert len(gets) == 1 and box.queries == 6


def test_a_model_with_two_inputs_is_refused():
    server = FakeServer()
    server.metadata["inputs"].append({"name": "z", "datatype": "FP32", "shape": [-1, 2]})
    with pytest.raises(UpstreamBadResponse, match="2 input tensors"):
        box_for(server).predict_proba(torch.rand(1, 3, 8, 8))


# -- what it sends -----------------------------------------------------------------------------

def test_fp32_nchw_at_the_model_size_is_the_8_bit_image_in_0_1():
    server = FakeServer()
    box = box_for(server, client_id="tester")
    x = torch.rand(3, 3, 8, 8)
    before = x.clone()
    box.predict_proba(x)
    assert torch.equal(x, before)
    tensor = server.bodies[0]["inputs"][0]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("x", "FP32", [3, 3, 8, 8])
    sent = np.asarray(tensor["data"], dtype=np.float32).reshape(3, 3, 8, 8)
    assert np.array_equal(sent, x.mul(255).round().div(255).numpy())
    assert server.requests[-1].headers["X-Client-Id"] == "tester"
    assert server.requests[-1].headers["content-type"] == "application/json"


def test_the_encoding_is_what_kserve_decodes():
    oip = pytest.importorskip("advexplain.services.blackbox.oip", reason="the kserve extra is not installed")
    with oip.argv_hidden():
        from kserve.protocol.infer_type import InferRequest
        from kserve.protocol.rest.v2_datamodels import InferenceRequest
    server = FakeServer(shape=(-1, 6, 5, 3), datatype="UINT8")
    box = box_for(server)
    x = torch.rand(2, 3, 6, 5)
    box.predict_proba(x)
    request = InferRequest.from_inference_request(InferenceRequest.model_validate(server.bodies[0]), "m")
    decoded = request.inputs[0].as_numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 6, 5, 3)
    assert np.array_equal(decoded, box.pixels(x))


def test_uint8_nhwc_resized_on_the_query_path():
    server = FakeServer(shape=(-1, 8, 6, 3), datatype="UINT8")
    box = box_for(server)
    photo = torch.rand(2, 3, 21, 13)  # the user's photo, not square, not the model's size
    box.predict_proba(photo)
    tensor = server.bodies[0]["inputs"][0]
    assert (tensor["datatype"], tensor["shape"]) == ("UINT8", [2, 8, 6, 3])
    sent = np.asarray(tensor["data"]).reshape(2, 8, 6, 3)
    assert sent.dtype.kind == "i" and sent.min() >= 0 and sent.max() <= 255
    x8 = photo.mul(255).round()
    expected = F.interpolate(x8, size=(8, 6), mode="bilinear", antialias=True, align_corners=False).clamp(0, 255)
    assert np.array_equal(sent, expected.round().permute(0, 2, 3, 1).numpy().astype(np.int64))


def test_a_model_of_any_size_gets_the_photo_at_its_own():
    server = FakeServer(shape=(-1, 3, -1, -1))
    box_for(server).predict_proba(torch.rand(1, 3, 21, 13))
    assert server.bodies[0]["inputs"][0]["shape"] == [1, 3, 21, 13]


def test_grey_models_get_luma_and_grey_photos_become_rgb():
    grey = FakeServer(shape=(-1, 1, 4, 4))
    box_for(grey).predict_proba(torch.ones(1, 3, 4, 4) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1))
    assert np.allclose(grey.bodies[0]["inputs"][0]["data"], round(0.299 * 255) / 255)
    rgb = FakeServer(shape=(-1, 3, 4, 4))
    box_for(rgb).predict_proba(torch.full((1, 1, 4, 4), 0.5))
    assert rgb.bodies[0]["inputs"][0]["shape"] == [1, 3, 4, 4]


def test_fp32_range_and_mean_std():
    server = FakeServer(shape=(-1, 4, 4, 3))
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    box = box_for(server, pixel_scale=255, mean=mean, std=std)
    x = torch.rand(1, 3, 4, 4)
    box.predict_proba(x)
    sent = np.asarray(server.bodies[0]["inputs"][0]["data"], dtype=np.float32).reshape(1, 4, 4, 3)
    expected = (x.mul(255).round().permute(0, 2, 3, 1).numpy() - np.array(mean)) / np.array(std)
    assert np.allclose(sent, expected, atol=1e-5)


def test_mean_std_on_a_uint8_model_is_refused():
    with pytest.raises(UpstreamBadResponse, match="UINT8"):
        box_for(FakeServer(shape=(-1, 4, 4, 3), datatype="UINT8"), mean=(0.5,), std=(0.2,)).predict_proba(
            torch.rand(1, 3, 4, 4))


def test_batches_are_split_by_max_images_or_a_fixed_batch():
    server = FakeServer()
    box_for(server, max_images=4).predict_proba(torch.rand(10, 3, 8, 8))
    assert [b["inputs"][0]["shape"][0] for b in server.bodies] == [4, 4, 2]
    fixed = FakeServer(shape=(1, 3, 8, 8))
    box_for(fixed).predict_proba(torch.rand(3, 3, 8, 8))
    assert [b["inputs"][0]["shape"][0] for b in fixed.bodies] == [1, 1, 1]
    unbatched = FakeServer(shape=(3, 8, 8), answer=outputs([2], [0.3, 0.7]))
    out = box_for(unbatched).predict_proba(torch.rand(2, 3, 8, 8))
    assert [b["inputs"][0]["shape"] for b in unbatched.bodies] == [[3, 8, 8], [3, 8, 8]] and out.shape == (2, 2)


# -- how it reads answers ----------------------------------------------------------------------

def test_logits_are_softmaxed_and_probabilities_kept():
    box = box_for(FakeServer())
    out = box.predict_proba(torch.rand(2, 3, 8, 8))
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    assert torch.allclose(out, torch.softmax(torch.tensor([[0.0, 0.0], [1.0, -1.0]]), 1))
    probs = box_for(FakeServer(answer=outputs([2, 2], [0.2, 0.8, 0.9, 0.1])))
    assert torch.allclose(probs.predict_proba(torch.rand(2, 3, 8, 8)), torch.tensor([[0.2, 0.8], [0.9, 0.1]]))
    assert isinstance(probs, Classifier)
    zeros = box_for(FakeServer(answer=outputs([1, 2], [0.0, 0.0])))
    assert torch.equal(zeros.predict_proba(torch.rand(1, 3, 8, 8)), torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("shape, data, datatype", [
    ([3], [1, 0, 1], "INT64"), ([3, 1], [1, 0, 1], "INT32"), ([3], [1.0, 0.0, 1.0], "FP32"),
])
def test_class_indices_become_one_hot_rows(shape, data, datatype):
    box = box_for(FakeServer(answer=outputs(shape, data, datatype)))
    out = box.predict_proba(torch.rand(3, 3, 8, 8))
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert box.queries == 3


@pytest.mark.parametrize("answer, why", [
    (outputs([2, 3], [0.1] * 6), "shape"),                       # three classes, the caller has two
    (outputs([3, 2], [0.5] * 6), "shape"),                       # three rows for two images
    (outputs([2, 2], [0.5, 0.5, 0.5]), "values"),                # shape and data disagree
    (outputs([2], [0, 2], "INT64"), "indices"),                  # an index past the classes
    (outputs([2], [0, 0.5], "FP32"), "indices"),                 # not an index
    (lambda body: httpx.Response(200, content=b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2], '
                                              b'"data": [NaN, 0, 0, 1]}]}'), "finite"),
    (outputs([2, 2], ["a", "b", "c", "d"], "BYTES"), "BYTES"),
    (lambda body: httpx.Response(200, json={"outputs": []}), "output tensor"),
    (lambda body: httpx.Response(200, json=["not", "an", "object"]), "output tensor"),
    (lambda body: httpx.Response(200, content=b"<html>proxy error</html>"), "not JSON"),
])
def test_junk_answers_are_bad_responses_and_count_nothing(answer, why):
    box = box_for(FakeServer(answer=answer))
    with pytest.raises(UpstreamBadResponse, match=why):
        box.predict_proba(torch.rand(2, 3, 8, 8))
    assert box.queries == 0


# -- failures ----------------------------------------------------------------------------------

def failing(exc: Exception):
    def handler(request):
        raise exc
    return handler


@pytest.mark.parametrize("handler, error", [
    (failing(httpx.ConnectError("refused")), UpstreamUnavailable),
    (failing(httpx.ReadTimeout("slow")), UpstreamTimeout),
    (failing(httpx.RemoteProtocolError("broken")), UpstreamBadResponse),
    (lambda r: httpx.Response(503, json={"error": "Model with name m is not ready."}), UpstreamUnavailable),
    (lambda r: httpx.Response(500, json={"error": "boom"}), UpstreamBadResponse),
    (lambda r: httpx.Response(404, json={"error": "Model with name m does not exist."}), UpstreamBadResponse),
])
def test_failures_map_to_typed_errors_without_http_details(handler, error):
    box = box_for(handler)
    with pytest.raises(error) as caught:
        box.predict_proba(torch.rand(1, 3, 8, 8))
    assert caught.value.details == {}  # the message says what happened; no status, headers or response objects
    assert box.queries == 0


def test_a_503_on_infer_is_unavailable_after_metadata():
    server = FakeServer(answer=lambda body: httpx.Response(503, json={"error": "not ready"}))
    with pytest.raises(UpstreamUnavailable, match="not ready"):
        box_for(server).predict_proba(torch.rand(1, 3, 8, 8))


def test_the_infer_post_is_sent_once_even_when_it_fails():
    server = FakeServer(answer=lambda body: (_ for _ in ()).throw(httpx.ReadTimeout("slow")))
    with pytest.raises(UpstreamTimeout):
        box_for(server).predict_proba(torch.rand(1, 3, 8, 8))
    assert [r.method for r in server.requests] == ["GET", "POST"]


def test_its_own_client_has_the_timeouts_and_connect_retries_on_the_transport():
    box = OipClassifier(URL, CLASSES, timeout=7.0, connect_timeout=2.0, connect_retries=3)
    try:
        assert box._client.timeout == httpx.Timeout(7.0, connect=2.0)
        assert box._client._transport._pool._retries == 3
    finally:
        box.close()


# -- readiness ---------------------------------------------------------------------------------

def test_ready_checks_server_and_model():
    server = FakeServer()
    box = box_for(server)
    assert box.ready() == (True, "ready")
    server.ready["/v2/models/m/ready"] = 503
    ok, detail = box.ready()
    assert not ok and "/v2/models/m/ready answered 503" in detail
    server.ready["/v2/health/ready"] = 503
    assert "/v2/health/ready" in box.ready()[1]
    assert box_for(failing(httpx.ConnectError("refused"))).ready() == (
        False, "cannot reach http://box:8080/v2/health/ready: ConnectError")
    assert box.queries == 0


def test_a_version_in_the_url_is_used_for_every_model_path():
    seen = []

    def handler(request):
        seen.append(request.url.path)
        return FakeServer()(httpx.Request(request.method, str(request.url).replace("/versions/7", ""),
                                          content=request.content))

    box_for(handler, url="http://box:8080/v2/models/m/versions/7").predict_proba(torch.rand(1, 3, 8, 8))
    assert seen == ["/v2/models/m/versions/7", "/v2/models/m/versions/7/infer"]


# -- construction ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"connect_retries": -1}, {"timeout": 0}, {"max_images": 0}, {"pixel_scale": 2.0},
    {"mean": (0.5,)}, {"mean": (0.5, 0.5), "std": (0.2, 0.2)}, {"mean": (0.5,), "std": (0.0,)},
])
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        OipClassifier(URL, CLASSES, **kwargs)


def test_classes_are_the_callers_and_need_two():
    with pytest.raises(InvalidInput):
        OipClassifier(URL, ("only",))
    assert OipClassifier(URL, ["a", "b", "c"]).classes == ("a", "b", "c")


def test_bad_batches_are_invalid_input():
    box = box_for(FakeServer())
    for x in (torch.rand(3, 8, 8), torch.rand(0, 3, 8, 8), torch.rand(1, 4, 8, 8)):
        with pytest.raises(InvalidInput):
            box.predict_proba(x)
