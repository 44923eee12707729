"""`advexplain evaluate`: explain every misclassified photo of a split and write a report.

Photos are explained at their own size, as the services explain uploads. Writes metrics.json (the
numbers), explanations.jsonl (one line per photo), report.md (the paper's table beside ours) and
gallery/ (the first 16 Figure-2 panels) under --out.

Which photos, and toward which class (`choose_goals`):
- default: every photo the box gets wrong, toward its true label (the paper's explanation);
- `--target T`: every photo the box does not already classify as T, right or wrong, toward T
  ("what would make it say T?"); a mistake whose label is T is the paper's case;
- `--counterfactual`: every photo the box gets right, toward its nearest other class (`nearest`):
  the other class with the highest black-box probability when the box answers probabilities,
  else the other class the gradient source finds closest (its highest logit among the classes
  other than the box's prediction; for an ensemble, the highest summed margin).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from advexplain.commands.blackbox_flags import add_oip_flags, oip_options
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import BUILTIN, load_photos
from advexplain.shared.errors import InvalidInput
from advexplain.shared.evaluation import PAPER, summarise
from advexplain.shared.explain import (
    DEFAULT_MAX_LINF,
    DEFAULT_MAX_QUERIES,
    DEFAULT_METHOD,
    METHODS,
    EnsembleSurrogate,
    explain,
    method_options,
)
from advexplain.shared.remote import connect_black_box
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import DEFAULT_BETA, DEFAULT_TAU, saliency_maps

GALLERY = 16
MISTAKES, TARGET, COUNTERFACTUAL = "mistakes", "target", "counterfactual"
# How --counterfactual picked each photo's nearest other class (metrics.json `nearest_by`).
NEAREST_BY_BOX, NEAREST_BY_SOURCE = "black-box probabilities", "gradient source"


def class_index(text: str, classes: Sequence[str], what: str = "--target") -> int:
    """A class name, or an index into `classes` (names win when a class is named like a number)."""
    if text in classes:
        return list(classes).index(text)
    if text.strip().isdigit() and int(text) < len(classes):
        return int(text)
    raise InvalidInput(f"unknown {what} {text!r}: use one of {', '.join(classes)} or an index 0-{len(classes) - 1}")


def choose_goals(predictions: Sequence[int], labels: Sequence[int], *, target: int | None = None,
                 nearest: Callable[[int], int] | None = None) -> list[tuple[int, int]]:
    """(photo index, goal class) of every photo to explain, in split order.

    predictions: the box's class per photo; labels: the true ones. Default: every mistake, toward
    its label. target: every photo predicted as anything but `target` (right or wrong), toward it.
    nearest (photo index -> class other than its prediction): every correctly classified photo,
    toward nearest(index). Pass at most one of target and nearest.
    """
    if target is not None and nearest is not None:
        raise InvalidInput("choose --target or --counterfactual, not both")
    pairs = list(zip(predictions, labels))
    if target is not None:
        return [(i, target) for i, (p, _) in enumerate(pairs) if p != target]
    if nearest is not None:
        return [(i, nearest(i)) for i, (p, y) in enumerate(pairs) if p == y]
    return [(i, y) for i, (p, y) in enumerate(pairs) if p != y]


def runner_up(scores: torch.Tensor, prediction: int) -> int:
    """The class other than `prediction` with the highest score; ties go to the lower index."""
    others = scores.detach().double().clone()
    others[prediction] = float("-inf")
    return int(others.argmax())


def source_scores(source, image: torch.Tensor) -> torch.Tensor:
    """(K,) margin(image, c) of a gradient source for every class c, no query: among the classes
    other than the top one, the order of the logits (for an ensemble, of the summed margins)."""
    with torch.no_grad():
        return torch.stack([source.margin(image.unsqueeze(0), c)[0] for c in range(len(source.classes))])


def is_one_hot(scores: torch.Tensor) -> bool:
    """True for a label-only answer: a single 1 and zeros."""
    return bool(((scores == 0) | (scores == 1)).all()) and float(scores.sum()) == 1.0


def by_goal(results: Sequence, classes: Sequence[str]) -> dict[str, dict]:
    """The main numbers per `prediction -> goal` pair (the box's first answer, the class asked for)."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(f"{classes[r.original_prediction]} -> {classes[r.target]}", []).append(r)
    keep = ("explained", "successes", "success_rate", "mean_search_queries", "median_linf_255", "p90_linf_255",
            "median_rms_255", "failure_reasons")
    return {pair: {k: v for k, v in summarise(group).items() if k in keep} for pair, group in sorted(groups.items())}


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="explain every misclassified image of a split (or, with --target or "
                       "--counterfactual, images toward another class) and write a report",
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
                   help="a running black box as the oracle: anything that answers POST /predict, or an Open Inference "
                        "Protocol model URL http(s)://host:port/v2/models/<name>; the photos it gets wrong are found "
                        "by asking it (those queries are reported apart)")
    add_oip_flags(p)
    p.add_argument("--mode", choices=("whitebox", "blackbox"), default="blackbox")
    p.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    p.add_argument("--label-only", action="store_true", help="the local oracle answers one-hot labels only")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES)
    p.add_argument("--max-linf", type=float, default=DEFAULT_MAX_LINF, help="largest per-pixel change of a success")
    p.add_argument("--refine", type=int, default=None, help="extra queries spent shrinking a found change")
    p.add_argument("--alpha", type=float, default=None, help="method paper: the bound on eps (default 2.0)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU)
    p.add_argument("--beta", type=float, default=DEFAULT_BETA)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target", default=None,
                      help="a class name or index: explain every photo the box does not already classify as it "
                           "(right or wrong) toward it, instead of the mistakes toward their labels")
    goal.add_argument("--counterfactual", action="store_true",
                      help="explain every correctly classified photo toward its nearest other class (the box's "
                           "runner-up when it answers probabilities, else the gradient source's)")
    p.add_argument("--limit", type=int, default=None, help="explain only the first N photos chosen")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/<mode>-<method>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def setting_lines(args, meta: dict) -> list[str]:
    """What was explained with what: the oracle, the gradient source, accuracies and limits."""
    return [
        f"Oracle: {meta['oracle']}; gradient source: {meta['gradient_source']}. Photos at their own size "
        f"(median {meta['median_size']}).",
        f"Black-box validation accuracy {fmt(meta.get('blackbox_val_accuracy'), '.4f')}; "
        f"surrogate {fmt(meta.get('surrogate_val_accuracy'), '.4f')}. max_queries {args.max_queries}, "
        f"max_linf {args.max_linf * 255:.0f}/255.",
    ]


def ours_row(m: dict, args, count: int) -> str:
    return (f"| ours (`{args.method}`) | {count} | {fmt(m['success_rate'], '.2%')} | "
            f"{fmt(m['mean_search_queries'], '.2f')} | {fmt(m['median_linf_255'], '.1f')}/255 | "
            f"{fmt(m['p90_linf_255'], '.1f')}/255 | {fmt(m['median_rms_255'], '.2f')}/255 | "
            f"{fmt(m['seconds_per_explanation'], '.3f')} |")


def report_markdown(m: dict, args, meta: dict) -> str:
    paper = PAPER[args.mode]
    if m["selection"] != MISTAKES:
        return goal_report_markdown(m, args, meta)
    lines = [
        f"# {args.mode} explanations with `{args.method}` on {args.data} / {args.split}",
        "",
        *setting_lines(args, meta),
        "",
        "| | misclassified | success rate | mean search queries | median L-inf | p90 L-inf | median RMS "
        "| s / explanation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| paper ({'Alg. 1' if args.mode == 'whitebox' else 'Alg. 3'}) | {paper['misclassified']} | "
        f"{paper['success_rate']:.2%} | {paper['mean_search_queries']:.2f} | n/a | n/a | n/a | n/a |",
        ours_row(m, args, m["misclassified"]),
        "",
        "Search queries are oracle images after the first prediction (what the paper counts); "
        "mean queries including it: "
        f"{fmt(m['mean_queries'], '.2f')}. A success is a change the oracle accepts of at most max_linf; norms are of "
        "the change, over successes, in 8-bit levels. Failures: "
        + (", ".join(f"{k} {v}" for k, v in m["failure_reasons"].items()) or "none")
        + ".",
        "",
        f"Distillation: {m['distillation_queries']} black-box queries spent training the surrogate(s), "
        f"{fmt(m['distillation_queries_per_image'], '.2f')} per explained image; screening (finding the mistakes "
        f"through a remote box): {m['screening_queries']} queries.",
        "",
        *by_goal_lines(m),
        "## Gallery (original | adversarial | saliency)",
        "",
    ]
    lines += [f"![{name}](gallery/{name})" for name in meta["gallery"]]
    return "\n".join(lines) + "\n"


def by_goal_lines(m: dict) -> list[str]:
    lines = ["## By prediction -> goal", "",
             "| box's prediction -> goal | explained | success rate | mean search queries | median L-inf | p90 L-inf |"
             " median RMS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for pair, g in m["by_goal"].items():
        lines.append(f"| {pair} | {g['explained']} | {fmt(g['success_rate'], '.2%')} | "
                     f"{fmt(g['mean_search_queries'], '.2f')} | {fmt(g['median_linf_255'], '.1f')}/255 | "
                     f"{fmt(g['p90_linf_255'], '.1f')}/255 | {fmt(g['median_rms_255'], '.2f')}/255 |")
    return lines + [""]


def goal_report_markdown(m: dict, args, meta: dict) -> str:
    """The report of --target and --counterfactual runs: no paper row (the paper explains mistakes only)."""
    if m["selection"] == TARGET:
        title = f"toward `{m['target']}`"
        chosen = (f"Every photo the box does not already classify as `{m['target']}` ({m['selected']} of "
                  f"{m['photos']}; {m['misclassified']} of the split are mistakes), explained toward it.")
    else:
        title = "toward the nearest other class (counterfactuals)"
        chosen = (f"Every photo the box classifies correctly ({m['selected']} of {m['photos']}), explained toward its "
                  f"nearest other class by {m['nearest_by']}.")
    lines = [
        f"# {args.mode} explanations {title} with `{args.method}` on {args.data} / {args.split}",
        "",
        chosen + (f" --limit {args.limit}: the first {m['explained']} of them." if args.limit is not None else ""),
        "",
        *setting_lines(args, meta),
        "",
        "| | explained | success rate | mean search queries | median L-inf | p90 L-inf | median RMS "
        "| s / explanation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        ours_row(m, args, m["explained"]),
        "",
        "A success is a change of at most max_linf that the oracle classifies as the goal class; norms are of the "
        "change, over successes, in 8-bit levels. Failures: "
        + (", ".join(f"{k} {v}" for k, v in m["failure_reasons"].items()) or "none")
        + ".",
        "",
        *by_goal_lines(m),
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

    target = None if args.target is None else class_index(args.target, classes)
    selection = TARGET if target is not None else COUNTERFACTUAL if args.counterfactual else MISTAKES

    screening = 0
    if args.blackbox_url:
        oracle = connect_black_box(args.blackbox_url, classes, client_id="advexplain-evaluate",
                                   **oip_options(args, args.blackbox_url, "--blackbox-url"))
        box_scores = lambda x: oracle.predict_proba(x.unsqueeze(0))[0]  # noqa: E731
    else:
        oracle = LocalClassifier(blackbox_ckpt.model, blackbox_ckpt.classes, label_only=args.label_only)
        network = LocalClassifier(blackbox_ckpt.model, blackbox_ckpt.classes)  # bookkeeping: counts nothing
        box_scores = lambda x: network.logits(x.unsqueeze(0))[0]  # noqa: E731
    images = [photos.image(i) for i in range(len(photos))]
    with torch.no_grad():
        scores = [box_scores(x) for x in tqdm(images, desc="screening", disable=args.quiet, unit="photo")]
    predictions = [int(s.argmax()) for s in scores]
    misclassified = sum(p != y for p, y in zip(predictions, photos.labels))
    if args.blackbox_url:
        screening = oracle.queries

    if args.mode == "whitebox":
        source, source_name = oracle, f"{args.blackbox} (the real model)"
        nearest_source = network  # the same network, but its margins count no query
    else:
        members = [LocalClassifier(c.model, c.classes) for c in surrogate_ckpts]
        source = members[0] if len(members) == 1 else EnsembleSurrogate(members)
        source_name = " + ".join(map(str, surrogate_paths)) + (" (surrogate)" if len(members) == 1 else " (ensemble)")
        nearest_source = source

    nearest, nearest_by = None, None
    if selection == COUNTERFACTUAL:
        # The box's own runner-up when it answers probabilities; a label-only box says nothing about
        # the other classes, so then the gradient source decides (the class its margin search has
        # the least to climb for).
        box_probabilities = not args.label_only if not args.blackbox_url else not all(map(is_one_hot, scores))
        nearest_by = NEAREST_BY_BOX if box_probabilities else NEAREST_BY_SOURCE
        if box_probabilities:
            nearest = lambda i: runner_up(scores[i], predictions[i])  # noqa: E731
        else:
            nearest = lambda i: runner_up(source_scores(nearest_source, images[i]), predictions[i])  # noqa: E731
    goals = choose_goals(predictions, photos.labels, target=target, nearest=nearest)
    selected = len(goals)
    if args.limit is not None:
        goals = goals[: args.limit]

    results = []
    for i, goal in tqdm(goals, desc=f"{args.mode} {args.method}", disable=args.quiet, unit="photo"):
        results.append(explain(images[i], photos.labels[i], source, oracle, args.method, target=goal,
                               whitebox=args.mode == "whitebox", options=options))
    # Algorithm 2 in batch mode: quartiles over every successful perturbation of the run.
    maps = saliency_maps([r.perturbation if r.success and not r.already_correct else None for r in results],
                         tau=args.tau, beta=args.beta)

    suffix = {MISTAKES: "", TARGET: f"-to-{classes[target] if target is not None else ''}",
              COUNTERFACTUAL: "-counterfactual"}[selection]
    out = args.out or Path("reports") / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{args.mode}-{args.method}{suffix}")
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    gallery = []
    for n, ((i, goal), r, sal) in enumerate(zip(goals, results, maps)):
        if n >= GALLERY:
            break
        stem = Path(photos.paths[i]).stem + ("" if selection == MISTAKES else f"-to-{classes[goal]}")
        name = f"{n:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}.png"
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
    sizes = sorted(tuple(images[i].shape[-2:]) for i, _ in goals)
    meta = {
        "oracle": args.blackbox_url or f"{args.blackbox}{' (label-only)' if args.label_only else ''}",
        "gradient_source": source_name,
        "blackbox_val_accuracy": blackbox_ckpt.meta.metrics.get("val_accuracy") if blackbox_ckpt else None,
        "surrogate_val_accuracy": surrogate_ckpts[0].meta.metrics.get("val_accuracy")
        if len(surrogate_ckpts) == 1
        else None,
        "median_size": f"{sizes[len(sizes) // 2][1]}x{sizes[len(sizes) // 2][0]}" if sizes else "n/a",
        "gallery": gallery,
    }
    metrics.update(
        {
            "selection": selection,
            "target": None if target is None else classes[target],
            "nearest_by": nearest_by,
            "selected": selected,
            "correctly_classified_explained": sum(predictions[i] == photos.labels[i] for i, _ in goals),
            "by_goal": by_goal(results, classes),
            "mode": args.mode,
            "method": args.method,
            "options": options.model_dump(),
            "label_only": args.label_only,
            "data": str(args.data),
            "split": args.split,
            "photos": len(photos),
            "tau": args.tau,
            "beta": args.beta,
            "oracle_queries_total": getattr(oracle, "queries", None),
            "paper": PAPER[args.mode],
            "wall_seconds": time.perf_counter() - started,
            **{k: v for k, v in meta.items() if k != "gallery"},
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    with (out / "explanations.jsonl").open("w") as fh:
        for (i, _), r in zip(goals, results):
            fh.write(json.dumps({"index": i, "path": photos.paths[i], **r.to_dict()}) + "\n")
    (out / "report.md").write_text(report_markdown(metrics, args, meta))
    what = {MISTAKES: f"{metrics['misclassified']} misclassified",
            TARGET: f"{selected} photos toward {metrics['target']}",
            COUNTERFACTUAL: f"{selected} correct photos toward their nearest other class"}[selection]
    print(f"{args.mode} {args.method}: {what}, success {fmt(metrics['success_rate'], '.2%')}, "
          f"mean search queries {fmt(metrics['mean_search_queries'], '.2f')}, median L-inf "
          f"{fmt(metrics['median_linf_255'], '.1f')}/255 (p90 {fmt(metrics['p90_linf_255'], '.1f')}), "
          f"{fmt(metrics['seconds_per_explanation'], '.3f')} s each; report in {out}")
    return 0
