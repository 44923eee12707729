"""`advexplain evaluate`: explain every misclassified photo of a split and write a report.

Photos are explained at their own size, as the services explain uploads. Writes metrics.json (the
numbers), explanations.jsonl (one line per photo), report.md (the paper's table beside ours) and
gallery/ (the first 16 Figure-2 panels) under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import BUILTIN
from advexplain.shared.errors import InvalidInput
from advexplain.shared.evaluation import PAPER, find_mistakes, summarise
from advexplain.shared.explain import (DEFAULT_MAX_LINF, DEFAULT_MAX_QUERIES, DEFAULT_METHOD, METHODS,
                                       EnsembleSurrogate, explain, method_options)
from advexplain.shared.data import load_photos
from advexplain.shared.remote import RemoteClassifier
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import DEFAULT_BETA, DEFAULT_TAU, saliency_maps

GALLERY = 16


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="explain every misclassified image of a split and write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=BUILTIN, help="'elpv' (built-in) or a folder <root>/<split>/<class>/<image>")
    p.add_argument("--split", default="Validation")
    p.add_argument("--blackbox", type=Path, default=Path("models/blackbox"),
                   help="black-box checkpoint: the oracle (and the gradient source in white-box mode), unless "
                        "--blackbox-url is given")
    p.add_argument("--surrogate", type=Path, action="append", default=None,
                   help="gradient source in black-box mode (default models/surrogate); repeat it to combine several "
                        "surrogates' gradients (an ensemble)")
    p.add_argument("--blackbox-url", default=None,
                   help="a running black box as the oracle: anything that answers POST /predict; the photos it gets "
                        "wrong are found by asking it (those queries are reported apart)")
    p.add_argument("--mode", choices=("whitebox", "blackbox"), default="blackbox")
    p.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    p.add_argument("--label-only", action="store_true", help="the local oracle answers one-hot labels only")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES)
    p.add_argument("--max-linf", type=float, default=DEFAULT_MAX_LINF, help="largest per-pixel change of a success")
    p.add_argument("--refine", type=int, default=None, help="extra queries spent shrinking a found change")
    p.add_argument("--alpha", type=float, default=None, help="method paper: the bound on eps (default 2.0)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU)
    p.add_argument("--beta", type=float, default=DEFAULT_BETA)
    p.add_argument("--limit", type=int, default=None, help="explain only the first N misclassified photos")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/<mode>-<method>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def report_markdown(m: dict, args, meta: dict) -> str:
    paper = PAPER[args.mode]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"# {args.mode} explanations with `{args.method}` on {args.data} / {args.split}",
        "",
        f"Oracle: {meta['oracle']}; gradient source: {meta['gradient_source']}. Photos at their own size "
        f"(median {meta['median_size']}).",
        f"Black-box validation accuracy {fmt(meta.get('blackbox_val_accuracy'), '.4f')}; "
        f"surrogate {fmt(meta.get('surrogate_val_accuracy'), '.4f')}. max_queries {args.max_queries}, "
        f"max_linf {args.max_linf * 255:.0f}/255.",
        "",
        "| | misclassified | success rate | mean search queries | median L-inf | p90 L-inf | median RMS | s / explanation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| paper ({'Alg. 1' if args.mode == 'whitebox' else 'Alg. 3'}) | {paper['misclassified']} | "
        f"{paper['success_rate']:.2%} | {paper['mean_search_queries']:.2f} | n/a | n/a | n/a | n/a |",
        f"| ours (`{args.method}`) | {m['misclassified']} | {fmt(m['success_rate'], '.2%')} | "
        f"{fmt(m['mean_search_queries'], '.2f')} | {fmt(m['median_linf_255'], '.1f')}/255 | "
        f"{fmt(m['p90_linf_255'], '.1f')}/255 | {fmt(m['median_rms_255'], '.2f')}/255 | "
        f"{fmt(m['seconds_per_explanation'], '.3f')} |",
        "",
        "Search queries are oracle images after the first prediction (what the paper counts); mean queries including it: "
        f"{fmt(m['mean_queries'], '.2f')}. A success is a change the oracle accepts of at most max_linf; norms are of "
        "the change, over successes, in 8-bit levels. Failures: "
        + (", ".join(f"{k} {v}" for k, v in m["failure_reasons"].items()) or "none") + ".",
        "",
        f"Distillation: {m['distillation_queries']} black-box queries spent training the surrogate(s), "
        f"{fmt(m['distillation_queries_per_image'], '.2f')} per explained image; screening (finding the mistakes "
        f"through a remote box): {m['screening_queries']} queries.",
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
    given = {"max_queries": args.max_queries, "max_linf": args.max_linf}
    if args.refine is not None:
        given["refine"] = args.refine
    if args.alpha is not None:
        given["alpha"] = args.alpha
    options = method_options(args.method, **given)

    surrogate_paths = args.surrogate or [Path("models/surrogate")]
    surrogate_ckpts = [load_checkpoint(p) for p in surrogate_paths] if args.mode == "blackbox" else []
    blackbox_ckpt = load_checkpoint(args.blackbox) if (args.mode == "whitebox" or not args.blackbox_url) else None
    photos = load_photos(args.data, args.split)
    classes = tuple(surrogate_ckpts[0].classes if surrogate_ckpts else blackbox_ckpt.classes)
    if tuple(photos.classes) != classes:
        raise InvalidInput(f"data classes {photos.classes} differ from the model's {classes}")

    screening = 0
    if args.blackbox_url:
        oracle = RemoteClassifier(args.blackbox_url, classes, client_id="advexplain-evaluate")
        predict = lambda x: int(oracle.predict_proba(x.unsqueeze(0)).argmax())  # noqa: E731
    else:
        oracle = LocalClassifier(blackbox_ckpt.model, blackbox_ckpt.classes, label_only=args.label_only)
        network = LocalClassifier(blackbox_ckpt.model, blackbox_ckpt.classes)  # bookkeeping: counts nothing
        predict = lambda x: int(network.logits(x.unsqueeze(0)).argmax())  # noqa: E731
    images = [photos.image(i) for i in range(len(photos))]
    with torch.no_grad():
        mistakes = find_mistakes(predict, tqdm(images, desc="finding mistakes", disable=args.quiet, unit="photo"),
                                 photos.labels)
    if args.blackbox_url:
        screening = oracle.queries
    misclassified = len(mistakes)
    if args.limit is not None:
        mistakes = mistakes[: args.limit]

    if args.mode == "whitebox":
        source, source_name = oracle, f"{args.blackbox} (the real model)"
    else:
        members = [LocalClassifier(c.model, c.classes) for c in surrogate_ckpts]
        source = members[0] if len(members) == 1 else EnsembleSurrogate(members)
        source_name = " + ".join(map(str, surrogate_paths)) + (" (surrogate)" if len(members) == 1 else " (ensemble)")

    results = []
    for i, _ in tqdm(mistakes, desc=f"{args.mode} {args.method}", disable=args.quiet, unit="photo"):
        results.append(explain(images[i], photos.labels[i], source, oracle, args.method,
                               whitebox=args.mode == "whitebox", options=options))
    # Algorithm 2 in batch mode: quartiles over every successful perturbation of the run.
    maps = saliency_maps([r.perturbation if r.success and not r.already_correct else None for r in results],
                         tau=args.tau, beta=args.beta)

    out = args.out or Path("reports") / f"{args.mode}-{args.method}"
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    gallery = []
    for n, ((i, _), r, sal) in enumerate(zip(mistakes, results, maps)):
        if n >= GALLERY:
            break
        name = f"{n:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(photos.paths[i]).stem)}.png"
        (out / "gallery" / name).write_bytes(render_explanation(r, sal)["panel"])
        gallery.append(name)

    metrics = summarise(results, misclassified)
    spent = sum(int((c.meta.distillation or {}).get("queries", 0)) for c in surrogate_ckpts)
    metrics.update({
        "distillation_queries": spent,
        "distillation_queries_per_image": spent / len(results) if results else None,
        "mean_queries_with_distillation": metrics["mean_queries"] + spent / len(results) if results else None,
        "screening_queries": screening,
    })
    sizes = sorted(tuple(images[i].shape[-2:]) for i, _ in mistakes)
    meta = {
        "oracle": args.blackbox_url or f"{args.blackbox}{' (label-only)' if args.label_only else ''}",
        "gradient_source": source_name,
        "blackbox_val_accuracy": blackbox_ckpt.meta.metrics.get("val_accuracy") if blackbox_ckpt else None,
        "surrogate_val_accuracy": surrogate_ckpts[0].meta.metrics.get("val_accuracy") if len(surrogate_ckpts) == 1 else None,
        "median_size": f"{sizes[len(sizes) // 2][1]}x{sizes[len(sizes) // 2][0]}" if sizes else "n/a",
        "gallery": gallery,
    }
    metrics.update({
        "mode": args.mode, "method": args.method, "options": options.model_dump(), "label_only": args.label_only,
        "data": str(args.data), "split": args.split, "photos": len(photos), "tau": args.tau, "beta": args.beta,
        "oracle_queries_total": getattr(oracle, "queries", None), "paper": PAPER[args.mode],
        "wall_seconds": time.perf_counter() - started, **{k: v for k, v in meta.items() if k != "gallery"},
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    with (out / "explanations.jsonl").open("w") as fh:
        for (i, _), r in zip(mistakes, results):
            fh.write(json.dumps({"index": i, "path": photos.paths[i], **r.to_dict()}) + "\n")
    (out / "report.md").write_text(report_markdown(metrics, args, meta))
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{args.mode} {args.method}: {metrics['misclassified']} misclassified, success {fmt(metrics['success_rate'], '.2%')}, "
          f"mean search queries {fmt(metrics['mean_search_queries'], '.2f')}, median L-inf "
          f"{fmt(metrics['median_linf_255'], '.1f')}/255 (p90 {fmt(metrics['p90_linf_255'], '.1f')}), "
          f"{fmt(metrics['seconds_per_explanation'], '.3f')} s each; report in {out}")
    return 0
