"""Black-box throughput on the CPU: HTTP (uvicorn on loopback) against the in-process forward pass.

For each batch size: requests/s and images/s through a real `advexplain serve blackbox` process,
beside the same model's in-process throughput (forward only, and decode + forward as the service
does it), and the HTTP overhead as a ratio. Prints a table and writes bench/results/blackbox_throughput.json.

    python -m bench.blackbox_throughput --model models/blackbox --seconds 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from advexplain.launch import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "blackbox_throughput.json"


def png_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def timed_loop(step, seconds: float, max_iterations: int, warmup: int = 3) -> list[float]:
    """Run `step` for about `seconds` (at most `max_iterations`) after a warm-up; per-call latencies."""
    for _ in range(warmup):
        step()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(latencies) < max_iterations:
        t0 = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - t0)
    return latencies


def summarise(latencies: list[float], batch: int) -> dict:
    total = sum(latencies)
    ordered = sorted(latencies)
    return {
        "iterations": len(latencies),
        "seconds": round(total, 3),
        "requests_per_s": round(len(latencies) / total, 2),
        "images_per_s": round(len(latencies) * batch / total, 1),
        "latency_ms_p50": round(float(np.percentile(ordered, 50)) * 1000, 3),
        "latency_ms_p95": round(float(np.percentile(ordered, 95)) * 1000, 3),  # numpy's, as every bench
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "blackbox")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per configuration")
    parser.add_argument("--max-iterations", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process alike")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.images import decode_image

    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint: train one with `advexplain train blackbox`")
    torch.set_num_threads(args.threads)
    local = LocalClassifier.from_checkpoint(args.model)
    size = local.image_size
    images = png_images(max(args.batch_sizes), size)

    rows = []
    server = ServiceProcess("blackbox", ["--model", str(args.model), "--device", "cpu", "--log-level", "warning"],
                            threads=args.threads)
    url = server.url
    try:
        try:
            server.start(timeout=60)
        except RuntimeError as exc:  # it exited or never got ready; the message carries its log
            raise SystemExit(str(exc)) from None
        with httpx.Client(timeout=60.0) as client:
            health = client.get(f"{url}/healthz").json()
            for batch in args.batch_sizes:
                files = [("image", (f"{i}.png", images[i], "image/png")) for i in range(batch)]

                def http_step(files=files):
                    resp = client.post(f"{url}/predict", files=files)
                    if resp.status_code != 200:
                        raise SystemExit(f"/predict answered {resp.status_code}: {resp.text[:300]}")

                http = summarise(timed_loop(http_step, args.seconds, args.max_iterations), batch)
                x = torch.stack([decode_image(b, size, 10**9) for b in images[:batch]])
                forward = summarise(
                    timed_loop(lambda x=x: local.predict_proba(x), args.seconds, args.max_iterations), batch
                )

                def decode_forward_step(batch=batch):
                    local.predict_proba(torch.stack([decode_image(b, size, 10**9) for b in images[:batch]]))

                decode_forward = summarise(timed_loop(decode_forward_step, args.seconds, args.max_iterations), batch)
                rows.append({
                    "batch": batch,
                    "http": http,
                    "in_process_forward": forward,
                    "in_process_decode_forward": decode_forward,
                    "http_share_of_forward": round(http["images_per_s"] / forward["images_per_s"], 4),
                    "forward_over_http": round(forward["images_per_s"] / http["images_per_s"], 2),
                })
            metrics = client.get(f"{url}/metrics").text
    finally:
        server.stop()

    counted = next((int(sample.value) for family in text_string_to_metric_families(metrics)
                    for sample in family.samples if sample.name == "blackbox_queries_all_total"), "?")
    result = {
        "benchmark": "blackbox_throughput",
        "model": str(args.model), "image_size": size, "classes": health["classes"],
        "architecture": json.loads((args.model / "config.json").read_text())["architecture"],
        "image_format": f"PNG {size}x{size} RGB noise",
        "client": "one sequential httpx.Client (keep-alive), same host, loopback",
        "torch_threads": args.threads, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "seconds_per_measurement": args.seconds,
        "server_counted_images": counted,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    header = (f"{'batch':>5} | {'HTTP req/s':>10} | {'HTTP img/s':>10} | {'p50 ms':>8} | {'fwd img/s':>10} | "
              f"{'dec+fwd img/s':>13} | {'HTTP/fwd':>8}")
    print(f"black box {args.model} ({size}x{size}), torch threads {args.threads}, CPU, uvicorn on loopback")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['batch']:>5} | {r['http']['requests_per_s']:>10.1f} | {r['http']['images_per_s']:>10.1f} | "
              f"{r['http']['latency_ms_p50']:>8.2f} | {r['in_process_forward']['images_per_s']:>10.1f} | "
              f"{r['in_process_decode_forward']['images_per_s']:>13.1f} | {r['http_share_of_forward']:>8.3f}")
    print(f"server counted {counted} images; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
