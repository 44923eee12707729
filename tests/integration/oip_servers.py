"""Real Open Inference Protocol servers for tests: `kserve.ModelServer` processes on loopback ports.

Two kinds, both started as a user would run them and stopped with SIGINT:
- `OipBlackbox`: our checkpoint behind `advexplain serve blackbox --protocol oip` (FP32 NCHW in,
  probabilities or class indices out, counted per X-Client-Id in `blackbox_queries_total`).
- `OnnxOipBox`: a network exported to ONNX that takes UINT8 NHWC and answers logits, run by
  onnxruntime inside a `kserve.Model` (tests/integration/onnx_oip_server.py), counted in
  `onnx_box_images_total`.

Fixtures (module scope, one server per test module; import them into a test module or a conftest):
`oip_blackbox` (scores), `oip_blackbox_label` (`--output label`), `nhwc_onnx_model` (the exported
file, session scope) and `onnx_oip_box`. Each server has `.url`, `.model_url` (the URL an
OipClassifier takes), `.counted(client=None)` (the server's own counter) and `.stop()`/`.kill()`.

    from oip_servers import oip_blackbox  # noqa: F401  (pytest puts tests/integration on sys.path)

    def test_something(oip_blackbox, tiny_models):
        box = OipClassifier(oip_blackbox.model_url, classes=("defective", "functional"))
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from advexplain.launch import ServiceProcess

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 120.0  # importing kserve alone takes seconds on a busy two-core machine


class OipBlackbox(ServiceProcess):
    """`advexplain serve blackbox --protocol oip --name <name> ...`, ready when its model is."""

    counter = "blackbox_queries"

    def __init__(self, args: list[str], name: str = "blackbox", **kwargs):
        super().__init__("blackbox", ["--protocol", "oip", "--name", name, "--device", "cpu", *args],
                         health_path=f"/v2/models/{name}/ready", **kwargs)
        self.name = name

    @property
    def model_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}"

    def counted(self, client: str | None = None) -> int:
        """Images the server counted: for one X-Client-Id, or for everyone (client=None)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if client is None and sample.name == f"{self.counter}_all_total":
                    total += sample.value
                elif client is not None and sample.name == f"{self.counter}_total" \
                        and sample.labels.get("client") == client:
                    total += sample.value
        return int(total)


class OnnxOipBox(OipBlackbox):
    """The ONNX model under onnxruntime in a kserve.ModelServer (UINT8 NHWC in, logits out)."""

    counter = "onnx_box_images"

    def __init__(self, onnx_path: Path, args: list[str] = (), name: str = "nhwc", **kwargs):
        super().__init__(list(args), name=name, **kwargs)
        self.service = f"onnx-{name}"
        self.onnx_path = Path(onnx_path)
        self.extra = list(args)

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "onnx_oip_server.py"), "--onnx", str(self.onnx_path),
                "--host", "127.0.0.1", "--port", str(self.port), "--name", self.name, *self.extra]

    def counted(self, client: str | None = None) -> int:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == f"{self.counter}_total"))


class NhwcUint8(torch.nn.Module):
    """A classifier that takes what a camera pipeline has: UINT8 pixels, NHWC; returns logits."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels.permute(0, 3, 1, 2).float() / 255.0)


def export_nhwc_onnx(checkpoint: Path, out: Path) -> Path:
    """Our checkpoint's network wrapped to take UINT8 NHWC, exported to ONNX with a variable batch."""
    from advexplain.shared.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    size = ckpt.model.config.image_size
    wrapped = NhwcUint8(ckpt.model.eval()).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    torch.onnx.export(wrapped, (example,), str(out), input_names=["pixels"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True,
                      external_data=False, verbose=False)
    return out


def start(server: OipBlackbox) -> OipBlackbox:
    try:
        return server.start(timeout=START_TIMEOUT)
    except Exception:
        server.kill()
        raise


@pytest.fixture(scope="module")
def oip_blackbox(tiny_models, tmp_path_factory):
    """Our tiny black box over OIP, answering probabilities (`scores`)."""
    server = start(OipBlackbox(["--model", str(tiny_models["blackbox"])], log_dir=tmp_path_factory.mktemp("oip")))
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def oip_blackbox_label(tiny_models, tmp_path_factory):
    """Our tiny black box over OIP with `--output label` (class indices only), named `blackbox-label`."""
    server = start(OipBlackbox(["--model", str(tiny_models["blackbox"]), "--output", "label"], name="blackbox-label",
                               log_dir=tmp_path_factory.mktemp("oip-label")))
    yield server
    _stop(server)


@pytest.fixture(scope="session")
def nhwc_onnx_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny black box's network exported to ONNX, taking UINT8 NHWC (same weights, so the same answers)."""
    return export_nhwc_onnx(tiny_models["blackbox"], tmp_path_factory.mktemp("onnx") / "nhwc.onnx")


@pytest.fixture(scope="module")
def onnx_oip_box(nhwc_onnx_model, tmp_path_factory):
    """The ONNX model in a kserve.ModelServer, named `nhwc`."""
    server = start(OnnxOipBox(nhwc_onnx_model, log_dir=tmp_path_factory.mktemp("onnx-box")))
    yield server
    _stop(server)


def _stop(server: ServiceProcess) -> None:
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - teardown must reach the process
        server.kill()
