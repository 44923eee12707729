"""Load: 32 concurrent clients x 20 explanations each against the real pair on loopback.

Starts the black box and the explainer as real uvicorn processes (`advexplain serve ...`, one torch
thread each, the CPU-default checkpoints in models/), then lets N asyncio clients each POST /explain M
times in a row with the elpv validation images the black box misclassifies. Measures: errors (any
non-200 or transport failure), client-side latency p50/p95/max, throughput, the resident memory
(VmRSS from /proc) of both processes before and after and their peak (VmHWM), and reconciles the
queries: the sum of `queries` the explainer reported must equal the black box's counter delta for the
explainer's client id (the explainer sends one X-Client-Id for all its users; the per-user
X-Client-Id each bench client sends to the explainer is not forwarded), and the explainer's own
`explainer_oracle_queries_total` delta. Prints a table and writes bench/results/load.json.

    flock /tmp/advexplain-cpu.lock python -m bench.load                  # 32 x 20, a few minutes on 2 cores
    python -m bench.load --clients 4 --per-client 2                       # a quick smoke run

Exits 1 when there was any error or the counts do not reconcile.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from advexplain.launch import ServiceProcess  # noqa: E402
from advexplain.shared.classifiers import LocalClassifier  # noqa: E402
from advexplain.shared.data import load_images  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXPLAINER_ID = "bench-load-explainer"


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc (psutil is not a dependency)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def metric(url: str, name: str, label: str | None = None) -> float:
    """One sample of a Prometheus counter from /metrics (0 when absent)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{" if label else name + " ") and (label is None or label in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def misclassified_pngs(blackbox: Path, limit: int) -> tuple[list[tuple[bytes, str]], int]:
    clf = LocalClassifier.from_checkpoint(blackbox)
    images = load_images("elpv", "validation", clf.image_size, progress=False)
    with torch.no_grad():
        predicted = clf.predict_proba(images.as_float()).argmax(1)
    wrong = (predicted != images.labels).nonzero().flatten().tolist()
    out = []
    for i in wrong[:limit]:
        buf = io.BytesIO()
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append((buf.getvalue(), images.classes[int(images.labels[i])]))
    return out, len(wrong)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run_clients(url: str, samples: list[tuple[bytes, str]], clients: int, per_client: int, max_queries: int,
                      timeout: float) -> list[dict]:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client(index: int) -> None:
            for round_ in range(per_client):  # bounded: each client stops by itself
                png, label = samples[(index * per_client + round_) % len(samples)]
                started = time.perf_counter()
                record = {"client": index, "round": round_}
                try:
                    resp = await http.post("/explain", files={"image": ("x.png", png, "image/png")},
                                           data={"label": label, "max_queries": str(max_queries)},
                                           headers={"X-Client-Id": f"bench-user-{index}"})
                    record["status"] = resp.status_code
                    if resp.status_code == 200:
                        body = resp.json()
                        record.update(queries=body["queries"], success=body["success"])
                    else:
                        record["error"] = resp.text[:200]
                except httpx.HTTPError as exc:
                    record.update(status=-1, error=f"{type(exc).__name__}: {exc}")
                record["seconds"] = time.perf_counter() - started
                results.append(record)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-client", type=int, default=20)
    p.add_argument("--max-queries", type=int, default=20, help="max_queries of each explanation (the API default)")
    p.add_argument("--max-concurrency", type=int, default=1, help="the explainer's explanations at once (its default)")
    p.add_argument("--blackbox", type=Path, default=ROOT / "models" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models" / "surrogate")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    samples, misclassified = misclassified_pngs(args.blackbox, limit=64)
    if not samples:
        raise SystemExit("the black box misclassifies no validation image: nothing to explain")
    with tempfile.TemporaryDirectory(prefix="advexplain-load-") as tmp:
        logs = Path(tmp)
        box = ServiceProcess("blackbox", ["--model", str(args.blackbox)], log_dir=logs)
        explainer = None
        try:
            box.start(timeout=120)
            explainer = ServiceProcess("explainer", ["--surrogate", str(args.surrogate), "--blackbox-url", box.url,
                                                     "--client-id", EXPLAINER_ID,
                                                     "--max-concurrency", str(args.max_concurrency),
                                                     "--read-timeout", "60"], log_dir=logs)
            explainer.start(timeout=120)
            # Warm up (first-use allocations, the class list), outside the measurement.
            for png, label in samples[:2]:
                assert httpx.post(f"{explainer.url}/explain", files={"image": ("x.png", png, "image/png")},
                                  data={"label": label}, timeout=60).status_code == 200
            mem_before = {"blackbox": rss_kib(box.proc.pid), "explainer": rss_kib(explainer.proc.pid)}
            box_before = metric(box.url, "blackbox_queries_total", f'client="{EXPLAINER_ID}"')
            oracle_before = metric(explainer.url, "explainer_oracle_queries_total", 'route="blackbox"')
            started = time.perf_counter()
            results = asyncio.run(run_clients(explainer.url, samples, args.clients, args.per_client,
                                              args.max_queries, args.timeout))
            wall = time.perf_counter() - started
            mem_after = {"blackbox": rss_kib(box.proc.pid), "explainer": rss_kib(explainer.proc.pid)}
            box_delta = metric(box.url, "blackbox_queries_total", f'client="{EXPLAINER_ID}"') - box_before
            oracle_delta = metric(explainer.url, "explainer_oracle_queries_total", 'route="blackbox"') - oracle_before
            healthy = httpx.get(f"{explainer.url}/healthz", timeout=10).status_code == 200
        finally:
            if explainer is not None:
                explainer.stop()
            box.stop()
        tracebacks = sum("Traceback" in log.read_text(errors="replace") for log in logs.glob("*.log"))

    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    latencies = [r["seconds"] for r in results]
    reported = sum(r["queries"] for r in ok)
    growth = {name: (mem_after[name]["VmRSS"] - mem_before[name]["VmRSS"]) / 1024 for name in mem_before}
    summary = {
        "benchmark": "load",
        "requests": len(results), "ok": len(ok), "errors": len(errors),
        "error_samples": errors[:5],
        "successes": sum(r["success"] for r in ok),
        "latency_p50_s": percentile(latencies, 0.50), "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies), "latency_mean_s": statistics.fmean(latencies),
        "wall_s": wall, "explanations_per_s": len(results) / wall,
        "queries_reported": reported, "blackbox_counter_delta": int(box_delta),
        "explainer_oracle_queries_delta": int(oracle_delta),
        "reconciled": reported == int(box_delta) == int(oracle_delta),
        "rss_mib_before": {k: v["VmRSS"] / 1024 for k, v in mem_before.items()},
        "rss_mib_after": {k: v["VmRSS"] / 1024 for k, v in mem_after.items()},
        "rss_growth_mib": growth,
        "peak_rss_mib": {k: v["VmHWM"] / 1024 for k, v in mem_after.items()},
        "healthz_after": healthy, "tracebacks_in_logs": tracebacks,
        "meta": {"clients": args.clients, "per_client": args.per_client, "max_queries": args.max_queries,
                 "explainer_max_concurrency": args.max_concurrency, "method": "margin (default)",
                 "images": len(samples), "misclassified_in_split": misclassified, "data": "elpv validation",
                 "blackbox": str(args.blackbox), "surrogate": str(args.surrogate), "torch_threads_per_process": 1,
                 "transport": "uvicorn on 127.0.0.1, httpx.AsyncClient", "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    rows = [
        ("requests (clients x per client)", f"{len(results)} ({args.clients} x {args.per_client})"),
        ("errors", f"{len(errors)}"),
        ("explanations that succeeded", f"{summary['successes']}/{len(ok)}"),
        ("latency p50 / p95 / max", f"{summary['latency_p50_s']:.2f} s / {summary['latency_p95_s']:.2f} s / "
                                    f"{summary['latency_max_s']:.2f} s"),
        ("throughput", f"{summary['explanations_per_s']:.2f} explanations/s over {wall:.0f} s"),
        ("queries reported / black-box delta / explainer metric", f"{reported} / {int(box_delta)} / {int(oracle_delta)}"),
        ("RSS black box before -> after (peak)", f"{summary['rss_mib_before']['blackbox']:.0f} -> "
         f"{summary['rss_mib_after']['blackbox']:.0f} MiB ({summary['peak_rss_mib']['blackbox']:.0f})"),
        ("RSS explainer before -> after (peak)", f"{summary['rss_mib_before']['explainer']:.0f} -> "
         f"{summary['rss_mib_after']['explainer']:.0f} MiB ({summary['peak_rss_mib']['explainer']:.0f})"),
        ("/healthz after, tracebacks in logs", f"{healthy}, {tracebacks}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if not errors and summary["reconciled"] and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
