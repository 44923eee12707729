"""Latency of POST /explain over real HTTP next to the engine in-process, on the CPU at the default size.

Starts the black box and the explainer as real uvicorn processes on loopback (`advexplain serve ...`,
one torch thread each), takes the elpv validation images the black box misclassifies, and times
`POST /explain` for each (client wall time) and, for the same images, the same work in-process:
decode -> explain (surrogate gradients, the black box as an in-process oracle) -> saliency -> PNGs.
The difference is the service overhead: HTTP, multipart, one PNG + /predict round trip per query,
base64. Prints a table and writes JSON to bench/results/explainer_latency.json.

    flock /tmp/advexplain-cpu.lock python -m bench.explainer_latency --images 20 --repeats 3
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
import torch
from PIL import Image

from advexplain.launch import ServiceProcess
from advexplain.shared import evaluation
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_images
from advexplain.shared.explain import DEFAULT_MAX_QUERIES, DEFAULT_METHOD, explain
from advexplain.shared.images import decode_image
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import saliency_map

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CLIENT_ID = "bench-explainer-latency"


def png(x: torch.Tensor) -> bytes:
    arr = x.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def summary(seconds: list[float]) -> dict:
    p50, p95 = evaluation.percentile(seconds, 50), evaluation.percentile(seconds, 95)
    assert p50 is not None and p95 is not None, "no latencies to summarise"
    return {"n": len(seconds), "p50_ms": 1000 * p50, "p95_ms": 1000 * p95,
            "mean_ms": 1000 * statistics.fmean(seconds), "max_ms": 1000 * max(seconds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--blackbox", type=Path, default=ROOT / "models" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models" / "surrogate")
    p.add_argument("--images", type=int, default=20, help="misclassified validation images to explain")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per image (each way)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests first (each way)")
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES)
    p.add_argument("--out", type=Path, default=RESULTS / "explainer_latency.json")
    args = p.parse_args()
    if not 1 <= args.images <= 200 or not 1 <= args.repeats <= 20:
        raise SystemExit("--images must be in 1..200 and --repeats in 1..20 (bounded loops)")
    torch.set_num_threads(1)

    bb_ckpt, sg_ckpt = load_checkpoint(args.blackbox), load_checkpoint(args.surrogate)
    blackbox = LocalClassifier(bb_ckpt.model, bb_ckpt.classes)
    surrogate = LocalClassifier(sg_ckpt.model, sg_ckpt.classes)
    spec = bb_ckpt.meta.data.get("spec", "elpv")
    data = load_images(spec, "validation", bb_ckpt.meta.image_size, progress=False)
    x = data.as_float()
    with torch.no_grad():
        predicted = torch.cat([blackbox.logits(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    wrong = (predicted != data.labels).nonzero().flatten().tolist()
    chosen = wrong[: args.images]
    if not chosen:
        raise SystemExit("the black box misclassifies no validation image")
    uploads = [(png(x[i]), data.classes[int(data.labels[i])]) for i in chosen]
    size = sg_ckpt.meta.image_size

    logs = Path(tempfile.mkdtemp(prefix="explainer-latency-"))
    env = {"OMP_NUM_THREADS": "1"}
    box = ServiceProcess("blackbox", ["--model", str(args.blackbox), "--device", "cpu", "--log-level", "warning"],
                         env=env, log_dir=logs)
    explainer = ServiceProcess("explainer", ["--surrogate", str(args.surrogate), "--blackbox-url", box.url,
                                             "--client-id", CLIENT_ID, "--device", "cpu", "--log-level", "warning"],
                               env=env, log_dir=logs)
    ex_url = explainer.url
    http_seconds, server_search_seconds, http_queries, http_success = [], [], [], []
    try:
        box.start(timeout=120)
        explainer.start(timeout=120)
        form = {"method": args.method, "max_queries": str(args.max_queries)}
        with httpx.Client(base_url=ex_url, timeout=120.0) as client:
            def post(image: bytes, label: str) -> httpx.Response:
                resp = client.post("/explain", files={"image": ("x.png", image, "image/png")},
                                   data={"label": label, **form})
                if resp.status_code != 200:
                    raise SystemExit(f"/explain answered {resp.status_code}: {resp.text[:300]}")
                return resp

            for i in range(args.warmup):
                post(*uploads[i % len(uploads)])
            for image, label in uploads:
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    resp = post(image, label)
                    http_seconds.append(time.perf_counter() - started)
                    body = resp.json()
                    server_search_seconds.append(body["seconds"])
                    http_queries.append(body["queries"])
                    http_success.append(body["success"])
    finally:
        explainer.stop()
        box.stop()

    # The same work in-process: the same upload bytes, the same engine call, the black box's own network as oracle.
    engine_seconds, engine_queries, engine_success = [], [], []

    def engine(image: bytes, label: str):
        tensor = decode_image(image, size, 40_000_000)
        oracle = LocalClassifier(bb_ckpt.model, bb_ckpt.classes)
        result = explain(
            tensor, data.classes.index(label), surrogate, oracle, args.method, max_queries=args.max_queries
        )
        saliency = None if result.perturbation is None else saliency_map(result.perturbation)
        render_explanation(result, saliency)
        return result

    for i in range(args.warmup):
        engine(*uploads[i % len(uploads)])
    for image, label in uploads:
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = engine(image, label)
            engine_seconds.append(time.perf_counter() - started)
            engine_queries.append(result.queries)
            engine_success.append(result.success)

    http, inproc, search = summary(http_seconds), summary(engine_seconds), summary(server_search_seconds)
    queries_agree = http_queries == engine_queries
    report = {
        "benchmark": "explainer_latency",
        "http": http,
        "in_process": inproc,
        "server_search": search,
        "overhead_ratio_p50": http["p50_ms"] / inproc["p50_ms"],
        "overhead_ratio_p95": http["p95_ms"] / inproc["p95_ms"],
        "mean_queries_http": statistics.fmean(http_queries),
        "mean_queries_in_process": statistics.fmean(engine_queries),
        "queries_identical": queries_agree,
        "success_rate_http": sum(http_success) / len(http_success),
        "success_rate_in_process": sum(engine_success) / len(engine_success),
        "meta": {
            "images": len(uploads),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "method": args.method,
            "max_queries": args.max_queries,
            "image_size": size,
            "data": spec,
            "split": "validation",
            "misclassified_in_split": len(wrong),
            "blackbox": str(args.blackbox),
            "surrogate": str(args.surrogate),
            "device": "cpu",
            "torch_threads_per_process": 1,
            "transport": "uvicorn on 127.0.0.1 (both services)",
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    rows = [
        ("POST /explain over HTTP (client wall)", http),
        ("in-process engine (decode+explain+saliency+PNGs)", inproc),
        ("server-side search alone (response `seconds`)", search),
    ]
    print(f"\nexplainer latency, CPU, {size}x{size}, method={args.method}, {len(uploads)} misclassified elpv images "
          f"x {args.repeats}, mean queries {report['mean_queries_http']:.2f}\n")
    print("| path | n | p50 ms | p95 ms | mean ms |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s['n']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['mean_ms']:.1f} |")
    print(f"\noverhead ratio (HTTP / in-process): p50 {report['overhead_ratio_p50']:.2f}x, "
          f"p95 {report['overhead_ratio_p95']:.2f}x; queries identical per request: {queries_agree}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
