"""Beyond two classes and beyond mistakes: elpv4 mistakes explained, and counterfactuals toward every other class.

The CPU-default elpv4 models (`models-elpv4/blackbox`, a label-only oracle; `models-elpv4/surrogate`,
the gradient source), the validation split at photo resolution (300x300), black-box `margin` with
its defaults (20 queries, max_linf 32/255). Two kinds of cell, each `source -> target`:

  mistake         photos the box gets wrong, explained toward their true label (the paper's case);
                  source is the box's (wrong) prediction, target the label
  counterfactual  photos the box gets right (source = label = prediction), explained toward each
                  of the other classes in turn: the same photos for every target of one source

plus, per source, `-> nearest`: each counterfactual photo's result toward its nearest other class
as `advexplain evaluate --counterfactual` picks it for a label-only box (the surrogate's highest
logit among the other classes), read from the cells above, no extra search.

Each cell: success (the box answers the target AND the change is within max_linf), mean search
queries, median / p90 L-inf and median RMS (8-bit levels, over successes), seconds per
explanation. `--limit N` explains the first N photos of each cell in split order (the JSON says
how many each cell had). Screening uses the box's network directly and is not counted; every
explanation's `queries` is checked against the oracle's own count.

    flock /tmp/advexplain-cpu.lock python -m bench.counterfactuals --limit 15
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from advexplain.commands.evaluate import runner_up, source_scores
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import ELPV4, load_photos
from advexplain.shared.explain import DEFAULT_METHOD, explain, method_options
from bench.common import RESULTS, fmt, markdown_table, write_json
from bench.native_resolution import summary

ROOT = Path(__file__).resolve().parents[1]
MISTAKE, COUNTERFACTUAL = "mistake", "counterfactual"


def explain_all(oracle: LocalClassifier, surrogate: LocalClassifier, photos, labels, jobs, method: str):
    """jobs: (photo index, target) -> their Explanations (the method's defaults); queries checked
    against the oracle's own count."""
    out = []
    for i, target in jobs:
        before = oracle.queries
        r = explain(photos[i], labels[i], surrogate, oracle, method, target=target)
        assert oracle.queries - before == r.queries, "queries must equal the box's own count"
        out.append(r)
    return out


def row(kind: str, pair: str, available: int, s: dict) -> list:
    return [
        kind,
        pair,
        f"{s['images']} / {available}",
        fmt(s["success_rate"], ".1%"),
        fmt(s["mean_search_queries"], ".2f"),
        fmt(s["median_linf_255"], ".1f"),
        fmt(s["p90_linf_255"], ".1f"),
        fmt(s["median_rms_255"], ".2f"),
        fmt(s["seconds_per_explanation"], ".2f"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blackbox", type=Path, default=ROOT / "models-elpv4" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models-elpv4" / "surrogate")
    p.add_argument("--split", default="validation")
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--limit", type=int, default=15, help="photos per cell (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "counterfactuals_elpv4.json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    started = time.perf_counter()

    bb = load_checkpoint(args.blackbox)
    network = LocalClassifier(bb.model, bb.classes)                     # screening: counts nothing
    oracle = LocalClassifier(bb.model, bb.classes, label_only=True)     # what the searches may ask
    surrogate = LocalClassifier.from_checkpoint(args.surrogate)
    photo_set = load_photos(ELPV4, args.split)
    classes = tuple(photo_set.classes)
    if classes != tuple(surrogate.classes) or classes != tuple(bb.classes):
        raise SystemExit(f"data classes {classes} are not the models' {bb.classes} / {surrogate.classes}")
    photos = [photo_set.image(i) for i in range(len(photo_set))]
    labels = photo_set.labels
    with torch.no_grad():
        predictions = [int(network.logits(x[None]).argmax()) for x in photos]
    options = method_options(args.method).model_dump()
    limit = args.limit or None

    # cells: (kind, source, target) -> photo indices in split order.
    cells: dict[tuple[str, int, int], list[int]] = {}
    for i, (p_, y) in enumerate(zip(predictions, labels)):
        if p_ != y:
            cells.setdefault((MISTAKE, p_, y), []).append(i)
    for s in range(len(classes)):
        correct = [i for i, (p_, y) in enumerate(zip(predictions, labels)) if p_ == y == s]
        for t in range(len(classes)):
            if t != s:
                cells[(COUNTERFACTUAL, s, t)] = correct
    order = sorted(cells, key=lambda k: (k[0] != MISTAKE, k[1], k[2]))

    runs, rows, results_of = {}, [], {}
    for kind, s, t in order:
        chosen = cells[(kind, s, t)][:limit]
        results = explain_all(oracle, surrogate, photos, labels, [(i, t) for i in chosen], args.method)
        results_of[(kind, s, t)] = dict(zip(chosen, results))
        key = f"{kind}: {classes[s]} -> {classes[t]}"
        summ = summary(results)
        runs[key] = {
            "kind": kind,
            "source": classes[s],
            "target": classes[t],
            "available": len(cells[(kind, s, t)]),
            "summary": summ,
            "rows": [r.to_dict() | {"path": photo_set.paths[i]} for i, r in zip(chosen, results)],
        }
        rows.append(row(kind, f"{classes[s]} -> {classes[t]}", len(cells[(kind, s, t)]), summ))
        print(rows[-1], flush=True)

    # -> nearest: each counterfactual photo's own result toward the class evaluate --counterfactual picks.
    nearest = {}
    for s in range(len(classes)):
        chosen = cells[(COUNTERFACTUAL, s, (s + 1) % len(classes))][:limit]
        if not chosen:
            continue
        picks = [runner_up(source_scores(surrogate, photos[i]), predictions[i]) for i in chosen]
        results = [results_of[(COUNTERFACTUAL, s, t)][i] for i, t in zip(chosen, picks)]
        summ = summary(results)
        counts = {classes[t]: picks.count(t) for t in sorted(set(picks))}
        nearest[classes[s]] = {"summary": summ, "nearest_counts": counts}
        rows.append(row(COUNTERFACTUAL, f"{classes[s]} -> nearest ({', '.join(f'{k} {v}' for k, v in counts.items())})",
                        len(cells[(COUNTERFACTUAL, s, (s + 1) % len(classes))]), summ))
        print(rows[-1], flush=True)

    all_mistakes = [r for (kind, _, _), rs in results_of.items() if kind == MISTAKE for r in rs.values()]
    overall = summary(all_mistakes)
    rows.append(row(MISTAKE, "all mistakes (as above)", sum(len(v) for k, v in cells.items() if k[0] == MISTAKE),
                    overall))
    table = markdown_table(["kind", "source -> target", "images / in cell", "success", "mean search q",
                            "median L-inf /255", "p90 L-inf /255", "median RMS /255", "s / expl."], rows)
    print(table)

    matrix_rows = []
    for s in range(len(classes)):
        cellsrow = []
        for t in range(len(classes)):
            run = runs.get(f"{COUNTERFACTUAL}: {classes[s]} -> {classes[t]}")
            if t == s:
                cellsrow.append("-")
            elif not run or not run["summary"]["images"]:
                cellsrow.append("no correct photos")
            else:
                m = run["summary"]
                cellsrow.append(f"{fmt(m['success_rate'], '.0%')} (q {fmt(m['mean_search_queries'], '.1f')}, "
                                f"L-inf {fmt(m['median_linf_255'], '.0f')})")
        matrix_rows.append([classes[s], *cellsrow])
    matrix = markdown_table(["correct photos of \\ toward", *classes], matrix_rows)
    print(matrix)

    predicted_counts = {c: predictions.count(k) for k, c in enumerate(classes)}
    write_json(
        args.out,
        {
            "benchmark": "counterfactuals",
            "config": {
                "data": ELPV4,
                "split": args.split,
                "images_in_split": len(photos),
                "blackbox": str(
                    args.blackbox.relative_to(ROOT) if args.blackbox.is_relative_to(ROOT) else args.blackbox
                ),
                "surrogate": str(
                    args.surrogate.relative_to(ROOT) if args.surrogate.is_relative_to(ROOT) else args.surrogate
                ),
                "oracle": "the black box, label-only (one-hot answers)",
                "gradient_source": "surrogate",
                "blackbox_metrics": bb.meta.metrics,
                "surrogate_val_accuracy": load_checkpoint(args.surrogate).meta.metrics.get("val_accuracy"),
                "box_predictions_per_class": predicted_counts,
                "misclassified": sum(p_ != y for p_, y in zip(predictions, labels)),
                "method": args.method,
                "options": options,
                "limit_per_cell": limit,
                "limit_note": "each cell explains its first `limit_per_cell` photos in split order; "
                "`available` in each run is how many the cell had. Counterfactual cells of one source share "
                "the same photos.",
                "nearest": "per photo, the class other than the box's prediction with the surrogate's highest logit "
                "(what `advexplain evaluate --counterfactual` picks for a label-only box)",
                "seed": args.seed,
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "wall_seconds": time.perf_counter() - started,
            },
            "table": table,
            "matrix_table": matrix,
            "overall_mistakes": overall,
            "nearest": nearest,
            "runs": runs,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
