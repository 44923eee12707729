"""`advexplain evaluate`: explain every misclassified image of a split and write a report.

Writes metrics.json (the numbers), explanations.jsonl (one line per image), report.md (the
paper's table beside ours) and gallery/ (the first 16 Figure-2 panels) under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import BUILTIN, load_images
from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain import DEFAULT_ALPHA, DEFAULT_MAX_QUERIES, DEFAULT_METHOD, METHODS, EnsembleSurrogate, explain
from advexplain.shared.remote import RemoteClassifier
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import DEFAULT_BETA, DEFAULT_TAU, saliency_maps

# Haffar et al., Section 4: 301 misclassified test images of the gender-faces data set.
PAPER = {
    "whitebox": {"success_rate": 0.9967, "mean_search_queries": 1.96, "misclassified": 301},
    "blackbox": {"success_rate": 0.7308, "mean_search_queries": 8.73, "misclassified": 301},
}
GALLERY = 16


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="explain every misclassified image of a split and write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=BUILTIN, help="'elpv' (built-in) or a folder <root>/<split>/<class>/<image>")
    p.add_argument("--split", default="Validation")
    p.add_argument("--blackbox", type=Path, default=Path("models/blackbox"), help="black-box checkpoint (finds the misclassified images; the oracle unless --blackbox-url)")
    p.add_argument("--surrogate", type=Path, action="append", default=None,
                   help="gradient source in black-box mode (default models/surrogate); repeat it to combine several "
                        "surrogates' gradients (an ensemble)")
    p.add_argument("--blackbox-url", default=None, help="use a running black-box service as the oracle")
    p.add_argument("--mode", choices=("whitebox", "blackbox"), default="blackbox")
    p.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    p.add_argument("--label-only", action="store_true", help="the local oracle answers one-hot labels only")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--tau", type=float, default=DEFAULT_TAU)
    p.add_argument("--beta", type=float, default=DEFAULT_BETA)
    p.add_argument("--limit", type=int, default=None, help="explain only the first N misclassified images")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/<mode>-<method>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def make_oracle(args, classes):
    if args.blackbox_url:
        return RemoteClassifier(args.blackbox_url, client_id="advexplain-evaluate")
    return LocalClassifier.from_checkpoint(args.blackbox, label_only=args.label_only)


def summarise(results, misclassified: int) -> dict:
    ok = [r for r in results if r.success and not r.already_correct]
    def med(values):
        return float(statistics.median(values)) if values else None
    def mean(values):
        return float(statistics.fmean(values)) if values else None
    return {
        "misclassified": misclassified,
        "explained": len(results),
        "successes": sum(r.success for r in results),
        "already_correct": sum(r.already_correct for r in results),
        "success_rate": (sum(r.success for r in results) / len(results)) if results else None,
        "mean_queries": mean([r.queries for r in results]),
        "median_queries": med([r.queries for r in results]),
        "mean_search_queries": mean([r.search_queries for r in results]),
        "median_search_queries": med([r.search_queries for r in results]),
        "max_queries_used": max((r.queries for r in results), default=None),
        "median_l2": med([r.l2 for r in ok]),
        "median_linf": med([r.linf for r in ok]),
        "median_linf_255": None if not ok else med([r.linf for r in ok]) * 255,
        "mean_l2": mean([r.l2 for r in ok]),
        "mean_linf": mean([r.linf for r in ok]),
        "seconds_per_explanation": mean([r.seconds for r in results]),
    }


def distillation_costs(surrogates, results) -> dict:
    """Queries spent distilling the surrogates, in total and amortised over the explained images."""
    spent = sum(int((c.meta.distillation or {}).get("queries", 0)) for c in surrogates)
    n = len(results)
    per_image = spent / n if n else None
    return {
        "distillation_queries": spent,
        "distillation_queries_per_image": per_image,
        "mean_queries_with_distillation": None if not n else statistics.fmean(r.queries for r in results) + per_image,
    }


def report_markdown(m: dict, args, meta: dict) -> str:
    paper = PAPER[args.mode]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"# {args.mode} explanations with `{args.method}` on {args.data} / {args.split}",
        "",
        f"Oracle: {meta['oracle']} ({'label-only' if args.label_only else 'scores'}); gradient source: {meta['gradient_source']}.",
        f"Black-box validation accuracy {fmt(meta.get('blackbox_val_accuracy'), '.4f')}; "
        f"surrogate {fmt(meta.get('surrogate_val_accuracy'), '.4f')}. max_queries {args.max_queries}, alpha {args.alpha}.",
        "",
        "| | misclassified | success rate | mean search queries | median L2 | median L-inf | s / explanation |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| paper ({'Alg. 1' if args.mode == 'whitebox' else 'Alg. 3'}) | {paper['misclassified']} | {paper['success_rate']:.2%} | "
        f"{paper['mean_search_queries']:.2f} | n/a | n/a | n/a |",
        f"| ours (`{args.method}`) | {m['misclassified']} | {fmt(m['success_rate'], '.2%')} | {fmt(m['mean_search_queries'], '.2f')} | "
        f"{fmt(m['median_l2'], '.4f')} | {fmt(m['median_linf_255'], '.2f')}/255 | {fmt(m['seconds_per_explanation'], '.3f')} |",
        "",
        "Search queries are oracle images after the first prediction (what the paper counts); mean queries including it: "
        f"{fmt(m['mean_queries'], '.2f')}. Norms are of the perturbation in [0,1] pixel units, over successful explanations.",
        "",
        f"Distillation: {m['distillation_queries']} black-box queries spent training the surrogate(s), "
        f"{fmt(m['distillation_queries_per_image'], '.2f')} per explained image; mean queries per explanation with them "
        f"amortised: {fmt(m['mean_queries_with_distillation'], '.2f')}.",
        "",
        "## Gallery (original | adversarial | saliency)",
        "",
    ]
    lines += [f"![{name}](gallery/{name})" for name in meta["gallery"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.mode == "whitebox" and args.blackbox_url:
        raise InvalidInput("white-box mode needs the real model's gradients: drop --blackbox-url")
    started = time.perf_counter()
    blackbox_ckpt = load_checkpoint(args.blackbox)
    local_blackbox = LocalClassifier(blackbox_ckpt.model, blackbox_ckpt.classes, name=str(args.blackbox))
    surrogate_paths = args.surrogate or [Path("models/surrogate")]
    surrogate_ckpts = [load_checkpoint(p) for p in surrogate_paths] if args.mode == "blackbox" else []
    image_size = blackbox_ckpt.meta.image_size
    data = load_images(args.data, args.split, image_size, progress=not args.quiet)
    if tuple(data.classes) != tuple(blackbox_ckpt.classes):
        raise InvalidInput(f"data classes {data.classes} differ from the black box's {blackbox_ckpt.classes}")

    # Which images the black box gets wrong: the evaluation's own bookkeeping, not oracle queries.
    with torch.no_grad():
        predicted = torch.cat([local_blackbox.logits(data.as_float(slice(i, i + 256))).argmax(1).cpu()
                               for i in range(0, len(data), 256)])
    wrong = (predicted != data.labels).nonzero().flatten().tolist()
    if args.limit is not None:
        wrong = wrong[: args.limit]

    oracle = make_oracle(args, data.classes)
    if args.mode == "whitebox":
        source = oracle if isinstance(oracle, LocalClassifier) else local_blackbox
        source_name = f"{args.blackbox} (the real model)"
    else:
        members = [LocalClassifier(c.model, c.classes, name=str(p)) for c, p in zip(surrogate_ckpts, surrogate_paths)]
        source = members[0] if len(members) == 1 else EnsembleSurrogate(members)
        source_name = " + ".join(str(p) for p in surrogate_paths) + (" (surrogate)" if len(members) == 1 else " (ensemble)")

    results = []
    for i in tqdm(wrong, desc=f"{args.mode} {args.method}", disable=args.quiet, unit="image"):
        results.append(explain(data.as_float(slice(i, i + 1))[0], int(data.labels[i]), source, oracle, args.method,
                               max_queries=args.max_queries, alpha=args.alpha))
    # Algorithm 2 in batch mode: quartiles over every non-NIL perturbation of the run (images the
    # oracle already got right carry no perturbation worth drawing and are left out).
    maps = saliency_maps([r.perturbation if r.success and not r.already_correct else None for r in results],
                         tau=args.tau, beta=args.beta)

    out = args.out or Path("reports") / f"{args.mode}-{args.method}"
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    gallery = []
    for n, (i, r, sal) in enumerate(zip(wrong, results, maps)):
        if n >= GALLERY:
            break
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data.paths[i]).stem if data.paths else str(i))
        name = f"{n:02d}_{stem}.png"
        (out / "gallery" / name).write_bytes(render_explanation(r, sal)["panel"])
        gallery.append(name)

    metrics = summarise(results, len(wrong))
    metrics.update(distillation_costs(surrogate_ckpts, results))
    meta = {
        "oracle": args.blackbox_url or str(args.blackbox),
        "gradient_source": source_name,
        "blackbox_val_accuracy": blackbox_ckpt.meta.metrics.get("val_accuracy"),
        "surrogate_val_accuracy": surrogate_ckpts[0].meta.metrics.get("val_accuracy") if len(surrogate_ckpts) == 1 else None,
        "gallery": gallery,
    }
    metrics.update({
        "mode": args.mode, "method": args.method, "label_only": args.label_only, "data": str(args.data),
        "split": args.split, "image_size": image_size, "validation_images": len(data),
        "max_queries": args.max_queries, "alpha": args.alpha, "tau": args.tau, "beta": args.beta,
        "oracle_queries_total": getattr(oracle, "queries", None), "paper": PAPER[args.mode],
        "wall_seconds": time.perf_counter() - started,
        **{k: v for k, v in meta.items() if k != "gallery"},
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    with (out / "explanations.jsonl").open("w") as fh:
        for i, r in zip(wrong, results):
            fh.write(json.dumps({"index": i, "path": data.paths[i] if data.paths else None, **r.to_dict()}) + "\n")
    (out / "report.md").write_text(report_markdown(metrics, args, meta))
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{args.mode} {args.method}: {metrics['misclassified']} misclassified, success {fmt(metrics['success_rate'], '.2%')}, "
          f"mean search queries {fmt(metrics['mean_search_queries'], '.2f')}, median L2 {fmt(metrics['median_l2'], '.4f')}, "
          f"median L-inf {fmt(metrics['median_linf_255'], '.2f')}/255, {fmt(metrics['seconds_per_explanation'], '.3f')} s each; "
          f"report in {out}")
    return 0
