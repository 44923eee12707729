"""Time per query: Open Inference Protocol JSON tensors against PNG uploads to /predict, side by side.

One checkpoint served twice on loopback, each by a real `advexplain serve blackbox` process (one
torch thread): `--protocol predict` (multipart PNG uploads) and `--protocol oip` (KServe's model
server, FP32 JSON tensors). For each case the same images go to both, request after request in
alternating order, so both see the same machine. A query's time is the client's whole call: for
/predict, encoding the 8-bit PNGs, the POST and reading the JSON answer; for OIP,
`OipClassifier.predict_proba` (8-bit rounding, resizing to the model's input on the client, the JSON
tensor, the POST, reading the output). Cases: images at the model's size one and 32 per request,
and the user's photo at its own size (elpv's 300x300 originals), which /predict receives as a
full-size PNG and OIP as a tensor resized on the query path. Prints a table and writes
bench/results/oip_vs_predict.json. Needs the kserve extra.

    python -m bench.oip_vs_predict --model models/blackbox --rounds 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from advexplain.launch import ServiceProcess
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.data import load_images
from advexplain.shared.oip import OipClassifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "oip_vs_predict.json"
CLIENT = "bench-oip-vs-predict"


def png(image: torch.Tensor) -> bytes:
    """(3, H, W) float in [0, 1] -> 8-bit PNG bytes, as the explainer's /predict client encodes them."""
    arr = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class PredictClient:
    """PNG uploads to /predict, read back into (N, K) probabilities."""

    def __init__(self, url: str, classes: tuple[str, ...]):
        self.url = url
        self.classes = classes
        self.client = httpx.Client(timeout=60.0)
        self.last_bytes = 0

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        files = [("image", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(x)]
        request = self.client.build_request("POST", f"{self.url}/predict", files=files, headers={"X-Client-Id": CLIENT})
        self.last_bytes = len(request.read())
        resp = self.client.send(request)
        if resp.status_code != 200:
            raise SystemExit(f"/predict answered {resp.status_code}: {resp.text[:300]}")
        rows = [[p["probabilities"][c] for c in self.classes] for p in resp.json()["predictions"]]
        return torch.tensor(rows)


class CountingTransport(httpx.HTTPTransport):
    """Records the body size of the latest request (the JSON tensor)."""

    last_bytes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        CountingTransport.last_bytes = len(request.read())
        return super().handle_request(request)


def summarise(latencies: list[float], batch: int, payload: list[int]) -> dict:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    return {
        "requests": len(ordered),
        "ms_per_request_p50": round(p50 * 1000, 3),
        "ms_per_request_p95": round(float(np.percentile(ordered, 95)) * 1000, 3),
        "ms_per_request_mean": round(statistics.fmean(ordered) * 1000, 3),
        "ms_per_query_p50": round(p50 * 1000 / batch, 3),
        "bytes_per_request": int(statistics.median(payload)),
    }


def side_by_side(predict: PredictClient, oip: OipClassifier, x: torch.Tensor, rounds: int, warmup: int = 5):
    """Alternate the two clients on the same batch; per-request wall times and body sizes for each."""
    times = {"predict": [], "oip": []}
    sizes = {"predict": [], "oip": []}
    answers = {}
    for i in range(warmup + rounds):
        order = ("predict", "oip") if i % 2 == 0 else ("oip", "predict")
        for name in order:
            client = predict if name == "predict" else oip
            t0 = time.perf_counter()
            answers[name] = client.predict_proba(x)
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(elapsed)
                sizes[name].append(predict.last_bytes if name == "predict" else CountingTransport.last_bytes)
    return times, sizes, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "blackbox")
    parser.add_argument("--rounds", type=int, default=200, help="measured requests per protocol and case")
    parser.add_argument("--batch", type=int, default=32, help="images per request in the batched case")
    parser.add_argument("--photo-size", type=int, default=300, help="the user's photo side (elpv originals: 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, servers and client alike")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint: train one with `advexplain train blackbox`")
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    size, classes = ckpt.meta.image_size, tuple(ckpt.classes)
    at_size = load_images("elpv", "validation", size, progress=False)
    photos = load_images("elpv", "validation", args.photo_size, progress=False)
    cases = [
        ("model size", size, 1, at_size.as_float(slice(0, 1))),
        ("model size", size, args.batch, at_size.as_float(slice(0, args.batch))),
        ("photo", args.photo_size, 1, photos.as_float(slice(0, 1))),
    ]

    env = {"ADVEXPLAIN_THREADS": str(args.threads)}
    common = ["--model", str(args.model), "--device", "cpu", "--log-level", "warning", "--max-images", "64"]
    with tempfile.TemporaryDirectory() as logs:
        box = ServiceProcess("blackbox", common, env=env, log_dir=Path(logs))
        oip_box = ServiceProcess("blackbox", [*common, "--protocol", "oip"], env=env, log_dir=Path(logs),
                                 health_path="/v2/models/blackbox/ready")
        try:
            box.start(timeout=120)
            oip_box.start(timeout=120)
            predict = PredictClient(box.url, classes)
            oip = OipClassifier(f"{oip_box.url}/v2/models/blackbox", classes, client_id=CLIENT, max_images=64,
                                client=httpx.Client(transport=CountingTransport(), timeout=60.0))
            rows, sent = [], 0
            for label, side, batch, x in cases:
                times, sizes, answers = side_by_side(predict, oip, x, args.rounds if batch == 1 else
                                                     max(20, args.rounds // 5))
                sent += (len(times["oip"]) + 5) * batch
                agree = bool(torch.equal(answers["predict"].argmax(1), answers["oip"].argmax(1)))
                rows.append({
                    "case": label, "image_side": side, "batch": batch,
                    "predict": summarise(times["predict"], batch, sizes["predict"]),
                    "oip": summarise(times["oip"], batch, sizes["oip"]),
                    "same_labels": agree,
                    "max_probability_difference": round(float((answers["predict"] - answers["oip"]).abs().max()), 6),
                })
                rows[-1]["oip_over_predict"] = round(rows[-1]["oip"]["ms_per_request_p50"]
                                                     / rows[-1]["predict"]["ms_per_request_p50"], 3)
            counted = {name: _counted(url) for name, url in (("predict", box.url), ("oip", oip_box.url))}
        finally:
            box.stop()
            oip_box.stop()

    result = {
        "benchmark": "oip_vs_predict",
        "model": str(args.model), "image_size": size, "classes": list(classes),
        "images": "elpv validation (first images), 8-bit",
        "client": "one sequential httpx.Client per protocol (keep-alive), same host, loopback; requests alternate",
        "servers": "advexplain serve blackbox --protocol predict (uvicorn) and --protocol oip (kserve.ModelServer)",
        "torch_threads": args.threads, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "images_sent_per_protocol": sent, "server_counted": counted,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    header = ("| case | side | batch | /predict ms/query | OIP ms/query | /predict ms p95 | OIP ms p95 | "
              "/predict bytes | OIP bytes | OIP / predict |")
    print(f"black box {args.model} ({size}x{size}), torch threads {args.threads}, CPU, loopback")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, o = r["predict"], r["oip"]
        print(f"| {r['case']} | {r['image_side']} | {r['batch']} | {p['ms_per_query_p50']:.2f} | "
              f"{o['ms_per_query_p50']:.2f} | {p['ms_per_request_p95']:.2f} | {o['ms_per_request_p95']:.2f} | "
              f"{p['bytes_per_request']:,} | {o['bytes_per_request']:,} | {r['oip_over_predict']:.2f} |")
    print(f"servers counted {counted} images (each sent {sent}); wrote {args.out}")
    return 0


def _counted(url: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "blackbox_queries_all_total"))


if __name__ == "__main__":
    sys.exit(main())
