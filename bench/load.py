"""Load: N closed-loop clients x M explanations each against the real pair on loopback, with admission control.

Starts the black box and the explainer as real processes (`advexplain serve ...`, the CPU-default
checkpoints in models/, the explainer with its own defaults unless flags say otherwise), then lets N
asyncio clients each get M explanations in a row. The uploads are user photos: elpv validation cells
at their own size (300x300, 8-bit greyscale PNG, as the data set ships them) that the black box gets
wrong, screened through the box's /predict under another client id. A client that gets 503
`overloaded` waits the Retry-After it was given (plus up to 10% seeded jitter) and asks again, as a
well-behaved client does; anything else that is not a 200 is an error.

Measures: admitted latency (200s) p50/p95/max, how fast refusals come back, the time to an explanation
including retries, throughput (explanations answered per second), refusals, errors, the server's cost
per explanation by outcome (its own histogram), resident memory of every process (workers included),
and reconciles the queries: the `queries` of the 200s must equal the black box's counter delta for the
explainer's client id and the explainer's `explainer_oracle_queries_total` delta (summed over workers).
It also records what else used the CPUs while it ran (from /proc), so a polluted run can be told.

    flock /tmp/advexplain-cpu.lock python -m bench.load                                   # 32 x 20, defaults
    flock /tmp/advexplain-cpu.lock python -m bench.load --clients 96 --per-client 7 \\
        --out bench/results/load_overload.json
    flock /tmp/advexplain-cpu.lock python -m bench.load --max-concurrency 1 --threads 1 --max-queue 1000000 \\
        --max-queue-wait 86400 --per-client 5 --out bench/results/load_before_300px.json   # the old settings

Exits 1 when there was any error or the counts do not reconcile. (Locust was considered: its users
are the same closed loop, but it brings gevent and its monkey-patching into the bench, and its
percentiles are rounded buckets; this loop is short and reads every answer's `queries` to reconcile.)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from advexplain.launch import ServiceProcess, process_tree
from advexplain.shared import evaluation
from advexplain.shared.data import load_photos
from advexplain.shared.pixels import encode_png

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
EXPLAINER_ID = "bench-load-explainer"
SCREEN_ID = "bench-load-screening"
TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pids: list[int]) -> dict[str, int]:
    """VmRSS and VmHWM (peak), in KiB, summed over processes, from /proc (psutil is not a dependency)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's (command, user+system CPU ticks so far)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (
            cmd[:120] or stat[stat.index("(") + 1 : stat.rindex(")")],
            int(fields[11]) + int(fields[12]),
        )
    return out


def busy_ticks() -> int:
    """All CPUs' busy time so far (user, nice, system, irq, softirq, steal), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[:8])
    return user + nice + system + irq + softirq + steal


def others(before: dict, after: dict, ours: set[int], top: int = 5) -> list[dict]:
    """The processes outside this benchmark that used the most CPU between two snapshots."""
    used = []
    for pid, (cmd, ticks) in after.items():
        if pid in ours:
            continue
        delta = ticks - before.get(pid, (cmd, 0))[1]
        if delta > 0:
            used.append({"pid": pid, "cpu_s": delta / TICKS, "command": cmd})
    return sorted(used, key=lambda u: -u["cpu_s"])[:top]


def metric(url: str, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples with these labels, from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def user_photos(box_url: str, limit: int, data: str = "elpv",
                screen: int | None = None) -> tuple[list[tuple[bytes, str]], int, int]:
    """PNGs of validation photos at their own size that the black box gets wrong, how many of the
    screened photos it got wrong, and how many were screened (all, or the first `screen`).
    elpv cells go as the greyscale PNGs the data set ships; a folder's photos as 8-bit RGB PNGs."""
    photos = load_photos(data, "validation")
    out, wrong = [], 0
    count = len(photos) if screen is None else min(screen, len(photos))
    with httpx.Client(base_url=box_url, timeout=30, headers={"X-Client-Id": SCREEN_ID}) as http:
        for i in range(count):
            if data == "elpv":
                buf = io.BytesIO()
                Image.fromarray(photos.photos[i][0].numpy(), "L").save(buf, format="PNG")  # greyscale, as shipped
                data_bytes = buf.getvalue()
            else:
                data_bytes = encode_png(photos.image(i))
            answer = http.post("/predict", files={"image": ("cell.png", data_bytes, "image/png")}).json()
            label = photos.classes[photos.labels[i]]
            if answer["predictions"][0]["label"] != label:
                wrong += 1
                if len(out) < limit:
                    out.append((data_bytes, label))
    return out, wrong, count


def checkout_state() -> dict:
    """The commit and the files with uncommitted changes: the engine a run measured may not be a commit's."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
        except OSError:  # no git (a bare GPU machine): the JSON says nothing of the checkout
            return ""

    # Porcelain lines are "XY path": the status takes two columns and a space (never strip the first).
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "shared", "services").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_in_shared_and_services": dirty}


async def run_clients(url: str, samples: list[tuple[bytes, str]], clients: int, per_client: int, max_queries: int,
                      timeout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(every attempt, every explanation): each client gets `per_client` explanations, retrying refusals."""
    attempts: list[dict] = []
    explanations: list[dict] = []
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client(index: int) -> None:
            for round_ in range(per_client):  # bounded: each client stops by itself
                png, label = samples[(index * per_client + round_) % len(samples)]
                first = time.perf_counter()
                tries = 0
                while True:
                    tries += 1
                    started = time.perf_counter()
                    record = {"client": index, "round": round_, "try": tries}
                    try:
                        resp = await http.post("/explain", files={"image": ("cell.png", png, "image/png")},
                                               data={"label": label, "max_queries": str(max_queries)},
                                               headers={"X-Client-Id": f"bench-user-{index}"})
                        record["status"] = resp.status_code
                        if resp.status_code == 200:
                            body = resp.json()
                            record.update(queries=body["queries"], success=body["success"])
                        else:
                            code = resp.json().get("error", {}).get("code") if resp.headers.get(
                                "content-type", "").startswith("application/json") else None
                            record.update(code=code, error=resp.text[:200], retry_after=resp.headers.get("Retry-After"))
                    except httpx.HTTPError as exc:
                        record.update(status=-1, error=f"{type(exc).__name__}: {exc}")
                    record["seconds"] = time.perf_counter() - started
                    attempts.append(record)
                    if record["status"] == 503 and record.get("code") == "overloaded" and record["retry_after"]:
                        wait = float(record["retry_after"])
                        await asyncio.sleep(wait * (1 + 0.1 * rng.random()))
                        continue
                    break
                explanations.append({"client": index, "round": round_, "tries": tries, "status": record["status"],
                                     "seconds": time.perf_counter() - first})

        await asyncio.gather(*(client(i) for i in range(clients)))
    return attempts, explanations


def service_flags(args) -> list[str]:
    flags = []
    for name in ("workers", "max_concurrency", "max_queue", "max_queue_wait", "surrogate_batch", "device"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-client", type=int, default=20, help="explanations each client gets (refusals retried)")
    p.add_argument("--max-queries", type=int, default=20, help="max_queries of each explanation (the API default)")
    p.add_argument("--workers", type=int, default=None, help="explainer processes (default: the service's, 1)")
    p.add_argument("--max-concurrency", type=int, default=None, help="default: the service's (cores / workers)")
    p.add_argument("--max-queue", type=int, default=None, help="default: the service's (4 per slot)")
    p.add_argument("--max-queue-wait", type=float, default=None, help="default: the service's (10 s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per explanation (default: the service's)")
    p.add_argument("--surrogate-batch", type=int, default=None,
                   help="images per shared surrogate pass (default: the service's: 512 on CUDA, off on the CPU)")
    p.add_argument("--device", default=None, help="both services' torch device (default: theirs, auto)")
    p.add_argument("--data", default="elpv", help="elpv (built-in) or a folder <root>/<split>/<class>/<image> whose "
                                                 "validation photos are the uploads (match the checkpoints)")
    p.add_argument("--screen", type=int, default=None, help="screen only the first N validation photos (default all)")
    p.add_argument("--blackbox", type=Path, default=ROOT / "models" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models" / "surrogate")
    p.add_argument("--images", type=int, default=64, help="distinct photos the clients cycle through")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what this run compares)")
    p.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="advexplain-load-") as tmp:
        logs = Path(tmp)
        device = ["--device", args.device] if args.device else []
        box = ServiceProcess("blackbox", ["--model", str(args.blackbox), *device], log_dir=logs)
        explainer = None
        try:
            box.start(timeout=120)
            samples, misclassified, screened = user_photos(box.url, args.images, args.data, args.screen)
            if not samples:
                raise SystemExit("the black box misclassifies no validation photo: nothing to explain")
            explainer = ServiceProcess("explainer", ["--surrogate", str(args.surrogate), "--blackbox-url", box.url,
                                                     "--client-id", EXPLAINER_ID, "--read-timeout", "60",
                                                     *service_flags(args)],
                                       log_dir=logs, threads=args.threads)
            explainer.start(timeout=180)
            settings_line = next((line for line in explainer.log().splitlines() if "explainer ready" in line), "")
            # Warm up every worker (first-use allocations), outside the measurement.
            for png, label in samples[:2 * (args.workers or 1)]:
                assert httpx.post(f"{explainer.url}/explain", files={"image": ("x.png", png, "image/png")},
                                  data={"label": label}, timeout=120).status_code == 200
            pids = {"blackbox": box.pids(), "explainer": explainer.pids()}
            mem_before = {name: rss_kib(tree) for name, tree in pids.items()}
            box_before = metric(box.url, "blackbox_queries_total", client=EXPLAINER_ID)
            oracle_before = metric(explainer.url, "explainer_oracle_queries_total", route="blackbox")
            cost_before = {
                outcome: (
                    metric(explainer.url, "explainer_explanation_duration_seconds_sum", outcome=outcome),
                    metric(explainer.url, "explainer_explanation_duration_seconds_count", outcome=outcome),
                )
                for outcome in ("success", "failed", "already_correct", "error")
            }
            ticks_before, busy_before, load_before = cpu_ticks(), busy_ticks(), os.getloadavg()
            started = time.perf_counter()
            attempts, explanations = asyncio.run(run_clients(explainer.url, samples, args.clients, args.per_client,
                                                             args.max_queries, args.timeout, args.seed))
            wall = time.perf_counter() - started
            ticks_after, busy_after, load_after = cpu_ticks(), busy_ticks(), os.getloadavg()
            ours = {os.getpid(), *process_tree(os.getpid())}
            pids = {"blackbox": box.pids(), "explainer": explainer.pids()}
            mem_after = {name: rss_kib(tree) for name, tree in pids.items()}
            box_delta = metric(box.url, "blackbox_queries_total", client=EXPLAINER_ID) - box_before
            oracle_delta = metric(explainer.url, "explainer_oracle_queries_total", route="blackbox") - oracle_before
            cost = {}
            for outcome, (s0, n0) in cost_before.items():
                s1 = metric(explainer.url, "explainer_explanation_duration_seconds_sum", outcome=outcome)
                n1 = metric(explainer.url, "explainer_explanation_duration_seconds_count", outcome=outcome)
                if n1 > n0:
                    cost[outcome] = {"count": int(n1 - n0), "mean_s": (s1 - s0) / (n1 - n0)}
            refused_by_reason = {reason: metric(explainer.url, "explainer_admission_refused_total", reason=reason)
                                 for reason in ("queue_full", "wait_timeout")}
            healthy = httpx.get(f"{explainer.url}/healthz", timeout=10).status_code == 200
        finally:
            if explainer is not None:
                explainer.stop()
            box.stop()
        tracebacks = sum("Traceback" in log.read_text(errors="replace") for log in logs.glob("*.log"))

    ok = [a for a in attempts if a["status"] == 200]
    refused = [a for a in attempts if a["status"] == 503 and a.get("code") == "overloaded"]
    errors = [a for a in attempts if a["status"] != 200 and a not in refused]
    admitted = [a["seconds"] for a in ok]
    refusals = [a["seconds"] for a in refused]
    to_explanation = [e["seconds"] for e in explanations if e["status"] == 200]
    reported = sum(a["queries"] for a in ok)
    our_busy = sum(t for pid, (_, t) in ticks_after.items() if pid in ours) - \
        sum(t for pid, (_, t) in ticks_before.items() if pid in ours)
    busy = busy_after - busy_before

    def role_cpu_s(tree: list[int]) -> float:
        return sum(ticks_after.get(pid, ("", 0))[1] - ticks_before.get(pid, ("", 0))[1] for pid in tree) / TICKS

    services_cpu = {name: role_cpu_s(tree) for name, tree in pids.items()}
    per_role = {**services_cpu, "clients (this process)": our_busy / TICKS - sum(services_cpu.values())}
    summary = {
        "benchmark": "load",
        "explanations": len(ok), "attempts": len(attempts), "refused_503": len(refused), "errors": len(errors),
        "error_samples": errors[:5],
        "refused_by_reason_server": refused_by_reason,
        "successes": sum(a["success"] for a in ok),
        "admitted_latency_p50_s": evaluation.percentile(admitted, 50),
        "admitted_latency_p95_s": evaluation.percentile(admitted, 95),
        "admitted_latency_max_s": max(admitted, default=None),
        "admitted_latency_mean_s": statistics.fmean(admitted) if admitted else None,
        "refusal_latency_p50_s": evaluation.percentile(refusals, 50),
        "refusal_latency_p95_s": evaluation.percentile(refusals, 95),
        "refusal_latency_max_s": max(refusals, default=None),
        "retry_after_seen_s": sorted({int(a["retry_after"]) for a in refused}),
        "time_to_explanation_incl_retries_p50_s": evaluation.percentile(to_explanation, 50),
        "time_to_explanation_incl_retries_p95_s": evaluation.percentile(to_explanation, 95),
        "wall_s": wall, "explanations_per_s": len(ok) / wall,
        "server_seconds_per_explanation": cost,
        "queries_reported": reported, "blackbox_counter_delta": int(box_delta),
        "explainer_oracle_queries_delta": int(oracle_delta),
        "reconciled": reported == int(box_delta) == int(oracle_delta),
        "rss_mib_before": {k: v["VmRSS"] / 1024 for k, v in mem_before.items()},
        "rss_mib_after": {k: v["VmRSS"] / 1024 for k, v in mem_after.items()},
        "peak_rss_mib_sum_over_processes": {k: v["VmHWM"] / 1024 for k, v in mem_after.items()},
        "processes": {k: len(v) for k, v in pids.items()},
        "healthz_after": healthy, "tracebacks_in_logs": tracebacks,
        "machine_during_run": {
            "cpu_busy_s_all": busy / TICKS, "cpu_busy_s_this_benchmark": our_busy / TICKS,
            "cpu_busy_s_others": (busy - our_busy) / TICKS, "cpu_capacity_s": wall * (os.cpu_count() or 1),
            "cpu_s_per_explanation_by_role": {k: v / max(len(ok), 1) for k, v in per_role.items()},
            "top_other_processes": others(ticks_before, ticks_after, ours),
            "loadavg_before": load_before, "loadavg_after": load_after,
        },
        "meta": {"clients": args.clients, "per_client": args.per_client, "max_queries": args.max_queries,
                 "explainer_flags": service_flags(args) or "service defaults",
                 "explainer_threads_flag": args.threads, "explainer_settings_logged": settings_line,
                 "method": "margin (default)", "images": len(samples), "misclassified_in_split": misclassified,
                 "screened": screened, "data": args.data, "device": args.device or "service default (auto)",
                 "uploads": "elpv validation photos at their own size (300x300), 8-bit greyscale PNG"
                 if args.data == "elpv" else f"{args.data} validation photos at their own size, 8-bit RGB PNG",
                 "blackbox": str(args.blackbox), "surrogate": str(args.surrogate), "blackbox_threads": 1,
                 "client": "closed loop, httpx.AsyncClient; 503 overloaded -> wait Retry-After (+<=10% jitter), retry",
                 "transport": "uvicorn on 127.0.0.1", "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch.__version__, "note": args.note,
                 "checkout": checkout_state(),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    machine = summary["machine_during_run"]
    rows = [
        ("explanations (clients x per client)", f"{len(ok)} ({args.clients} x {args.per_client})"),
        ("attempts / 503 overloaded / other errors", f"{len(attempts)} / {len(refused)} / {len(errors)}"),
        ("explanations that succeeded", f"{summary['successes']}/{len(ok)}"),
        ("throughput", f"{summary['explanations_per_s']:.2f} explanations/s over {wall:.0f} s"),
        (
            "admitted latency p50 / p95 / max",
            f"{fmt(summary['admitted_latency_p50_s'])} / "
            f"{fmt(summary['admitted_latency_p95_s'])} / {fmt(summary['admitted_latency_max_s'])}",
        ),
        (
            "503 answered in p50 / p95",
            f"{fmt(summary['refusal_latency_p50_s'])} / {fmt(summary['refusal_latency_p95_s'])}",
        ),
        (
            "time to an explanation incl. retries p50 / p95",
            f"{fmt(summary['time_to_explanation_incl_retries_p50_s'])} / "
            f"{fmt(summary['time_to_explanation_incl_retries_p95_s'])}",
        ),
        (
            "server seconds per explanation",
            ", ".join(f"{k} {v['mean_s']:.2f} s (n={v['count']})" for k, v in cost.items()),
        ),
        (
            "queries reported / black-box delta / explainer metric",
            f"{reported} / {int(box_delta)} / {int(oracle_delta)}",
        ),
        (
            "RSS before -> after (box, explainer)",
            f"{summary['rss_mib_before']['blackbox']:.0f} -> "
            f"{summary['rss_mib_after']['blackbox']:.0f} MiB, {summary['rss_mib_before']['explainer']:.0f} -> "
            f"{summary['rss_mib_after']['explainer']:.0f} MiB",
        ),
        (
            "CPU seconds: this benchmark / others / capacity",
            f"{machine['cpu_busy_s_this_benchmark']:.0f} / "
            f"{machine['cpu_busy_s_others']:.0f} / {machine['cpu_capacity_s']:.0f}",
        ),
        (
            "CPU seconds per explanation: " + " / ".join(machine["cpu_s_per_explanation_by_role"]),
            " / ".join(f"{v:.3f}" for v in machine["cpu_s_per_explanation_by_role"].values()),
        ),
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
