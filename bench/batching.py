"""Concurrent explanations with and without the surrogate's work batched across them, side by side.

In one process, C threads (as the explainer's slots) take misclassified photos from one shared list
and explain them with the default method against a label-only black box, every explanation's
surrogate work going either to the surrogate directly ("separate": each search runs its own small
network passes) or through one BatchedSurrogate ("batched": one pass for whatever all searches
submitted meanwhile). Both modes explain the same photos at each concurrency. Batching changes no
arithmetic, but a network's kernels round differently at another batch size (logits differ by about
1e-5), and a search that sits on an 8-bit rounding edge can then take another path: the bench counts
the explanations whose outcome (success, queries, L-inf) differs, beside explanations per second,
the ratio batched / separate and the mean batch size.

In-process on purpose: it measures the explainer's compute (surrogate + black-box network on one
device), not HTTP. `bench.paper_scale` calls `measure` with its freshly trained paper-size models on
the GPU; this command line runs it on saved checkpoints (the CPU defaults in models/):

    flock /tmp/advexplain-cpu.lock python -m bench.batching --concurrency 1 2 4 \\
        --out bench/results/batching_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.devices import pick_device
from advexplain.shared.evaluation import percentile
from advexplain.shared.explain import explain
from advexplain.shared.explain.batching import BatchedSurrogate
from bench.common import photo_mistakes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _run(images: Sequence[torch.Tensor], labels: Sequence[int], source, oracle: LocalClassifier,
         concurrency: int, total: int) -> tuple[float, list]:
    """Explain photos 0..total-1 (cycling through the list) on `concurrency` threads; (seconds, results)."""
    results: list = [None] * total
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= total:
                return
            k = i % len(images)
            try:
                results[i] = explain(images[k], int(labels[k]), source, oracle)
            except BaseException as exc:  # noqa: BLE001 - reported below, never swallowed
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if oracle.device.type == "cuda":
        torch.cuda.synchronize()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


def measure(images: Sequence[torch.Tensor], labels: Sequence[int], blackbox: LocalClassifier,
            surrogate: LocalClassifier, concurrency: Sequence[int], per_thread: int = 8,
            log: Callable[..., None] | None = None) -> list[dict]:
    """explanations/s separate vs batched at each concurrency; one row each, logged as it comes."""
    surrogate.freeze()  # as the explainer serves it: shared by concurrent searches
    blackbox.freeze(fold=False)  # the oracle: exactly the model as trained
    rows = []
    # Warm-up (allocator, kernels) so that the first measured mode is not charged for it.
    _run(images, labels, surrogate, blackbox, 1, min(2, len(images)))
    for c in concurrency:
        total = max(c * per_thread, 1)
        modes, outcomes = {}, {}
        for mode in ("separate", "batched"):
            oracle = LocalClassifier(blackbox.model, blackbox.classes, label_only=True)
            shared = BatchedSurrogate(surrogate) if mode == "batched" else None
            try:
                seconds, results = _run(images, labels, shared or surrogate, oracle, c, total)
            finally:
                if shared is not None:
                    shared.close()
            assert oracle.queries == sum(r.queries for r in results), "every black-box image is counted"
            outcomes[mode] = [(r.success, r.queries, r.linf) for r in results]
            linf = [r.linf * 255 for r in results if r.success and not r.already_correct]
            modes[mode] = {
                "seconds": round(seconds, 3),
                "explanations_per_second": total / seconds,
                "successes": sum(r.success for r in results),
                "mean_search_queries": sum(r.search_queries for r in results) / total,
                "median_linf_255": percentile(linf, 50) if linf else None,
                "mean_batch_images": (shared.images / shared.passes) if shared is not None and shared.passes else None,
                "passes": shared.passes if shared is not None else None,
            }
        sep, bat = modes["separate"], modes["batched"]
        differing = sum(a != b for a, b in zip(outcomes["separate"], outcomes["batched"], strict=True))
        row = {"concurrency": c, "explanations": total,
               **{f"{m}_{k}": v for m, d in modes.items() for k, v in d.items()},
               "speedup": bat["explanations_per_second"] / sep["explanations_per_second"],
               "differing_outcomes": differing}
        rows.append(row)
        if log is not None:
            log(stage="batching", **row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| concurrency | explanations | separate expl/s | batched expl/s | batched / separate | mean batch "
             "(images) | successes sep / bat | outcomes differing |", "|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['explanations']} | {r['separate_explanations_per_second']:.2f} | "
                     f"{r['batched_explanations_per_second']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['batched_mean_batch_images']:.1f} | {r['separate_successes']} / {r['batched_successes']} | "
                     f"{r['differing_outcomes']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="elpv", help="elpv (built-in) or a folder <root>/<split>/<class>/<image>")
    p.add_argument("--split", default="validation")
    p.add_argument("--blackbox", type=Path, default=ROOT / "models" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models" / "surrogate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the process")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--per-thread", type=int, default=8, help="explanations per thread at each concurrency")
    p.add_argument("--limit", type=int, default=40, help="misclassified photos to cycle through")
    p.add_argument("--out", type=Path, default=RESULTS / "batching_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    blackbox = LocalClassifier.from_checkpoint(args.blackbox, device=str(device))
    surrogate = LocalClassifier.from_checkpoint(args.surrogate, device=str(device))
    images, labels = photo_mistakes(blackbox, args.data, args.split, args.limit)
    rows = measure(images, labels, blackbox, surrogate, args.concurrency, args.per_thread,
                   log=lambda **e: print(json.dumps(e), flush=True))
    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "device": str(device), "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
           "machine": platform.machine(), "misclassified_photos": len(images), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
