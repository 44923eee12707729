"""A third-party-style OIP model for the tests: an ONNX network under onnxruntime inside a `kserve.Model`.

Run as a script by tests/integration/oip_servers.py (a real `kserve.ModelServer` process on loopback):

    python tests/integration/onnx_oip_server.py --onnx model.onnx --port 8080 [--name nhwc] [--unready-after N]

It is nothing like our own black box on the wire: its one input is UINT8 NHWC [-1, H, W, 3] named
after the ONNX graph's input, and its one output is raw logits FP32 [N, K] (not probabilities), so
the client has to lay out, quantise and normalise for itself. Every image classified counts in the
Prometheus counter `onnx_box_images_total` (on KServe's /metrics). `--unready-after N` turns the
model unready once N images were classified, so infer and readiness answer 503 from then on.
"""

from __future__ import annotations

import argparse
import sys
import threading
import uuid

import numpy as np
import prometheus_client

from advexplain.services.blackbox.oip import ModelServer, argv_hidden, configure_logging

with argv_hidden():
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

IMAGES = prometheus_client.Counter("onnx_box_images", "Images the ONNX box classified")


class OnnxModel(kserve.Model):
    def __init__(self, name: str, onnx_path: str, unready_after: int | None = None):
        super().__init__(name)
        self.onnx_path = onnx_path
        self.unready_after = unready_after
        self.session = None
        self.images = 0
        self._lock = threading.Lock()

    def load(self) -> bool:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.onnx_path, options, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        meta = self.session.get_inputs()[0]
        shape = [d if isinstance(d, int) else -1 for d in meta.shape]
        return [{"name": meta.name, "datatype": "UINT8", "shape": shape}]

    def get_output_types(self) -> list[dict]:
        meta = self.session.get_outputs()[0]
        return [{"name": meta.name, "datatype": "FP32", "shape": [d if isinstance(d, int) else -1 for d in meta.shape]}]

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        expected = self.get_input_types()[0]
        if len(payload.inputs) != 1 or payload.inputs[0].name != expected["name"]:
            raise InvalidInput(f"expected one input named {expected['name']!r}")
        tensor = payload.inputs[0]
        if tensor.datatype != "UINT8":
            raise InvalidInput(f"expected UINT8, got {tensor.datatype}")
        want = expected["shape"]
        if len(tensor.shape) != 4 or any(w != -1 and w != s for w, s in zip(want, tensor.shape)):
            raise InvalidInput(f"expected shape {want}, got {tensor.shape}")
        try:
            pixels = tensor.as_numpy()
        except (ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc
        logits = self.session.run(None, {expected["name"]: pixels})[0].astype(np.float32)
        with self._lock:
            self.images += pixels.shape[0]
            IMAGES.inc(pixels.shape[0])
            if self.unready_after is not None and self.images >= self.unready_after:
                self.ready = False
        output = InferOutput(self.get_output_types()[0]["name"], shape=list(logits.shape), datatype="FP32")
        output.set_data_from_numpy(logits, binary_data=False)
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=[output])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="nhwc")
    parser.add_argument("--unready-after", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    model = OnnxModel(args.name, args.onnx, args.unready_after)
    model.load()
    server = ModelServer(host=args.host, http_port=args.port, enable_grpc=False, workers=1,
                         enable_latency_logging=False)
    configure_logging(args.log_level)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
