"""`/explain` over the Open Inference Protocol against `/predict`: the same checkpoint, the same photos.

One black-box checkpoint served twice, label-only, each by a real `advexplain serve blackbox`
process: `--output label` (POST /predict, multipart uploads) and `--protocol oip --output label`
(`kserve.ModelServer`, FP32 JSON tensors). One explainer process per box, both with the same
surrogate and settings; they differ only in `--blackbox-url` (`http://host:port` against
`http://host:port/v2/models/blackbox`). The photos are the elpv validation cells at their own size
(300x300), uploaded as lossless PNGs; those that BOTH boxes get wrong (screened first, under a
client id of their own) are explained through both explainers, alternating which goes first.

What differs on the way: `/predict` receives the upload's own bytes for the first prediction and
8-bit PNGs of the photo's size after it, and resizes on the server; OIP receives tensors resized to
the model's input on the client (bilinear, antialiased). So a photo near the decision boundary can
be judged differently, and the searches can part after that.

Reports, per protocol: success rate, mean search queries (over all explained photos), median and
p90 L-inf of the successes (in 8-bit levels), seconds per explanation (the client's whole POST),
and whether the queries the explainers reported equal each server's own counter. Records the git
commit, any uncommitted change under shared/explain, and the method options the answers carried
(the engine's defaults are being tuned). Prints a table and writes bench/results/oip_explain.json.
Needs the kserve extra.

    flock /tmp/advexplain-cpu.lock python -m bench.oip_explain --blackbox models/blackbox --surrogate models/surrogate
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from advexplain.launch import ServiceProcess
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.data import load_photos
from advexplain.shared.images import decode_photo
from advexplain.shared.remote import connect_black_box

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "oip_explain.json"
EXPLAINER_CLIENT = "bench-oip-explain"
SCREENING_CLIENT = "bench-oip-explain-screening"
PROTOCOLS = ("predict", "oip")
OPTION_FIELDS = ("method", "max_queries", "max_linf", "refine", "alpha", "tau", "beta")


def png(photo: torch.Tensor) -> bytes:
    """(3, H, W) uint8 -> lossless PNG bytes: the upload."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(photo.permute(1, 2, 0).numpy()), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def counted(url: str, client: str) -> int:
    """The box's own count of images for one X-Client-Id (both protocols expose blackbox_queries_total)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "blackbox_queries_total" and s.labels.get("client") == client))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def summarise(rows: list[dict]) -> dict:
    successes = [r for r in rows if r["success"]]
    linf = sorted(r["linf"] * 255 for r in successes)
    seconds = [r["client_seconds"] for r in rows]
    return {
        "explained": len(rows),
        "successes": len(successes),
        "success_rate": round(len(successes) / len(rows), 4) if rows else None,
        "mean_search_queries": round(statistics.fmean(r["search_queries"] for r in rows), 3) if rows else None,
        "mean_search_queries_successes": round(statistics.fmean(r["search_queries"] for r in successes), 3)
        if successes else None,
        "median_linf_255": round(statistics.median(linf), 2) if linf else None,
        "p90_linf_255": round(float(np.percentile(linf, 90)), 2) if linf else None,
        "median_l2": round(statistics.median(r["l2"] for r in successes), 4) if successes else None,
        "seconds_per_explanation": round(statistics.fmean(seconds), 4) if rows else None,
        "median_seconds_per_explanation": round(statistics.median(seconds), 4) if rows else None,
        "failure_reasons": {k: sum(r["failure_reason"] == k for r in rows)
                            for k in sorted({r["failure_reason"] for r in rows if r["failure_reason"]})},
        "queries_reported": sum(r["queries"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blackbox", type=Path, default=ROOT / "models" / "blackbox")
    parser.add_argument("--surrogate", type=Path, default=ROOT / "models" / "surrogate")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="explain only the first N photos both boxes get wrong")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    for path in (args.blackbox, args.surrogate):
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is not a checkpoint: train it with `advexplain train`")
    torch.set_num_threads(args.threads)
    classes = tuple(load_checkpoint(args.blackbox).classes)
    photos = load_photos("elpv", args.split)
    uploads = [png(p) for p in photos.photos]

    env = {"ADVEXPLAIN_THREADS": str(args.threads)}
    box_args = ["--model", str(args.blackbox), "--output", "label", "--device", "cpu", "--log-level", "warning"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        log_dir = Path(logs)
        boxes = {
            "predict": ServiceProcess("blackbox", box_args, env=env, log_dir=log_dir, threads=args.threads),
            "oip": ServiceProcess("blackbox", [*box_args, "--protocol", "oip"], env=env, log_dir=log_dir,
                                  health_path="/v2/models/blackbox/ready", threads=args.threads),
        }
        urls = {"predict": boxes["predict"].url, "oip": f"{boxes['oip'].url}/v2/models/blackbox"}
        explainers = {
            name: ServiceProcess("explainer", ["--surrogate", str(args.surrogate), "--blackbox-url", urls[name],
                                               "--client-id", EXPLAINER_CLIENT, "--device", "cpu",
                                               "--max-concurrency", "1", "--log-level", "warning"],
                                 env=env, log_dir=log_dir, threads=args.threads)
            for name in PROTOCOLS
        }
        running = []
        try:
            for proc in (*boxes.values(), *explainers.values()):
                running.append(proc.start(timeout=180))

            # Screening: what each box says about every photo, as its explainer would send it first
            # (/predict: the upload's bytes; OIP: the decoded photo as a tensor).
            wrong = {}
            for name in PROTOCOLS:
                with connect_black_box(urls[name], classes, client_id=SCREENING_CLIENT) as box:
                    if name == "predict":
                        predicted = [int(box.predict_files([data]).argmax()) for data in uploads]
                    else:
                        predicted = [int(box.predict_proba(decode_photo(data, 10**8).image.unsqueeze(0)).argmax())
                                     for data in uploads]
                wrong[name] = {i for i, p in enumerate(predicted) if p != photos.labels[i]}
            chosen = sorted(wrong["predict"] & wrong["oip"])
            if args.limit is not None:
                chosen = chosen[: args.limit]

            before = {name: counted(boxes[name].url, EXPLAINER_CLIENT) for name in PROTOCOLS}
            rows = {name: [] for name in PROTOCOLS}
            options = {}
            with httpx.Client(timeout=300) as http:
                for n, i in enumerate(chosen):
                    label = classes[photos.labels[i]]
                    for name in (PROTOCOLS if n % 2 == 0 else PROTOCOLS[::-1]):
                        t0 = time.perf_counter()
                        resp = http.post(f"{explainers[name].url}/explain",
                                         files={"image": (f"{i}.png", uploads[i], "image/png")}, data={"label": label})
                        elapsed = time.perf_counter() - t0
                        if resp.status_code != 200:
                            raise SystemExit(f"{name} /explain answered {resp.status_code}: {resp.text[:300]}")
                        body = resp.json()
                        seen = {k: body[k] for k in OPTION_FIELDS}
                        if options.setdefault(name, seen) != seen:
                            raise SystemExit(f"{name}: the method options changed during the run: {seen}")
                        rows[name].append({
                            "index": i, "path": photos.paths[i], "label": label, "client_seconds": round(elapsed, 4),
                            **{k: body[k] for k in ("success", "already_correct", "queries", "search_queries",
                                                    "original_prediction", "final_prediction", "failure_reason",
                                                    "l2", "linf", "seconds")},
                        })
            after = {name: counted(boxes[name].url, EXPLAINER_CLIENT) for name in PROTOCOLS}
        finally:
            for proc in reversed(running):
                proc.stop()

    summary = {name: {**summarise(rows[name]), "server_counted": after[name] - before[name]} for name in PROTOCOLS}
    both = list(zip(rows["predict"], rows["oip"]))
    agreement = {
        "both_succeeded": sum(p["success"] and o["success"] for p, o in both),
        "only_predict": sum(p["success"] and not o["success"] for p, o in both),
        "only_oip": sum(o["success"] and not p["success"] for p, o in both),
        "neither": sum(not p["success"] and not o["success"] for p, o in both),
        "same_search_queries": sum(p["search_queries"] == o["search_queries"] for p, o in both),
        "already_correct": {name: sum(r["already_correct"] for r in rows[name]) for name in PROTOCOLS},
    }
    engine_changes = [line for line in git("status", "--porcelain", "--", "shared/explain").splitlines() if line]
    result = {
        "benchmark": "oip_explain",
        "git_commit": git("rev-parse", "HEAD"),
        "engine_uncommitted_changes": engine_changes,
        "method_options": options,
        "blackbox": str(args.blackbox), "surrogate": str(args.surrogate), "classes": list(classes),
        "blackbox_val_accuracy": load_checkpoint(args.blackbox).meta.metrics.get("val_accuracy"),
        "surrogate_val_accuracy": load_checkpoint(args.surrogate).meta.metrics.get("val_accuracy"),
        "photos": f"elpv {args.split}, {len(photos)} cells at their own size (300x300), lossless PNG uploads",
        "misclassified": {"predict": len(wrong["predict"]), "oip": len(wrong["oip"]),
                          "both": len(wrong["predict"] & wrong["oip"])},
        "explained": len(chosen),
        "servers": {"predict": "advexplain serve blackbox --output label (uvicorn, POST /predict)",
                    "oip": "advexplain serve blackbox --protocol oip --output label (kserve.ModelServer, FP32 JSON)"},
        "explainers": "advexplain serve explainer --blackbox-url <url>, one per box, same surrogate and settings; "
                      "one sequential client, the two alternating photo by photo",
        "torch_threads": args.threads, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "summary": summary, "agreement": agreement, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{args.blackbox} (label-only) + {args.surrogate}; {len(chosen)} photos both boxes get wrong "
          f"(/predict {len(wrong['predict'])}, OIP {len(wrong['oip'])}); options {options.get('oip')}")
    print("| black box | explained | success | mean search queries | median L-inf | p90 L-inf | s / explanation | "
          "queries reported = counted |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, label in (("predict", "`/predict`"), ("oip", "OIP v2 (KServe)")):
        s = summary[name]
        print(
            f"| {label} | {s['explained']} | {fmt(s['success_rate'], '.1%')} | "
            f"{fmt(s['mean_search_queries'], '.2f')} | "
            f"{fmt(s['median_linf_255'], '.1f')}/255 | {fmt(s['p90_linf_255'], '.1f')}/255 | "
            f"{fmt(s['seconds_per_explanation'], '.3f')} | {s['queries_reported']} = {s['server_counted']} |"
        )
    print(f"agreement: {agreement}; wrote {args.out}")
    return 0 if all(summary[n]["queries_reported"] == summary[n]["server_counted"] for n in PROTOCOLS) else 1


if __name__ == "__main__":
    sys.exit(main())
