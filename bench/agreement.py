"""Agreement between black-box and white-box saliency maps of the same misclassified images.

The paper claims the black-box maps (surrogate gradients, Algorithm 3) highlight the same regions
as the white-box maps (the real model's gradients, Algorithm 1). For each image and each method,
both maps are computed and compared:

  top-10% IoU     intersection over union of the 10% most salient pixels of each map, ranked by
                  Algorithm 2's unthresholded magnitude (ties broken by a seeded random order)
  Spearman        rank correlation of the two magnitude maps over all pixels (average ranks)
  Alg.2 IoU       IoU of the pixels Algorithm 2 keeps (single-mode quartiles, tau 1.5) in each map
  random          the same numbers for the white-box map against a seeded random map (the floor;
                  top-10% IoU of two independent random sets is about 0.053)

Pairs are only formed where both searches succeeded. Prints a markdown table, writes JSON.

    flock /tmp/advexplain-cpu.lock python -m bench.agreement --data $ADVEXPLAIN_FACES
"""

from __future__ import annotations

import torch

from advexplain.shared.saliency import saliency_map
from bench.common import (
    OUR_SETTINGS,
    base_parser,
    fmt,
    load_bench,
    magnitude_map,
    markdown_table,
    mean,
    median,
    run_ours,
    seed_everything,
    spearman,
    topk_iou,
    write_json,
)

PAIRS = {
    # name: (map A, map B)
    "margin: white-box vs black-box": ("ours white-box margin", "ours black-box margin"),
    "paper: white-box vs black-box": ("ours white-box paper", "ours black-box paper"),
    "margin-linf: white-box vs black-box": ("ours white-box margin-linf", "ours black-box margin-linf"),
    "white-box: margin vs paper": ("ours white-box margin", "ours white-box paper"),
}


def kept_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of the non-zero pixels of two thresholded (Algorithm 2) maps; 1.0 when both keep none."""
    ma, mb = a > 0, b > 0
    union = int((ma | mb).sum())
    return float((ma & mb).sum()) / union if union else 1.0


def compare(a_pert, b_pert, shape, fraction, seed) -> dict:
    a, b = magnitude_map(a_pert, shape), magnitude_map(b_pert, shape)
    return {"iou": topk_iou(a, b, fraction, seed), "spearman": spearman(a, b),
            "alg2_iou": kept_iou(saliency_map(a_pert), saliency_map(b_pert))}


def summary(rows: list[dict]) -> dict:
    return {"pairs": len(rows),
            **{f"{stat}_{k}": f([r[k] for r in rows]) for k in ("iou", "spearman", "alg2_iou")
               for stat, f in (("mean", mean), ("median", median))}}


def main(argv=None) -> int:
    p = base_parser("agreement", __doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.10, help="top fraction of pixels for the IoU")
    args = p.parse_args(argv)
    bench = load_bench(args)
    shape = bench.images.shape[-2:]

    explanations = {}
    for name in sorted({m for pair in PAIRS.values() for m in pair}):
        seed_everything(args.seed)
        explanations[name] = run_ours(bench, *OUR_SETTINGS[name])

    def usable(r):
        return r.success and not r.already_correct

    g = torch.Generator().manual_seed(args.seed)
    randoms = [torch.rand(bench.images.shape[1:], generator=g) - 0.5 for _ in range(len(bench.images))]
    results = {}
    for pair, (a_name, b_name) in PAIRS.items():
        rows, random_rows = [], []
        for i, (ra, rb) in enumerate(zip(explanations[a_name], explanations[b_name])):
            if not (usable(ra) and usable(rb)):
                continue
            rows.append(
                {
                    "image": bench.indices[i],
                    **compare(ra.perturbation, rb.perturbation, shape, args.fraction, args.seed + i),
                }
            )
            # the floor: map A against a random perturbation of the same image
            random_rows.append(compare(ra.perturbation, randoms[i], shape, args.fraction, args.seed + i))
        results[pair] = {"maps": [a_name, b_name], "aggregate": summary(rows), "random_baseline": summary(random_rows),
                         "rows": rows}

    headers = ["pair", "pairs", f"top-{args.fraction:.0%} IoU mean (median)", "Spearman mean (median)",
               "Alg.2 kept IoU mean", f"random: top-{args.fraction:.0%} IoU", "random: Spearman", "random: Alg.2 IoU"]
    table = markdown_table(headers, [[
        pair, a["pairs"], f"{fmt(a['mean_iou'])} ({fmt(a['median_iou'])})",
        f"{fmt(a['mean_spearman'])} ({fmt(a['median_spearman'])})", fmt(a["mean_alg2_iou"]),
        fmt(z["mean_iou"]), fmt(z["mean_spearman"]), fmt(z["mean_alg2_iou"])]
        for pair, r in results.items() for a, z in [(r["aggregate"], r["random_baseline"])]])
    print(table)
    write_json(args.out, {"benchmark": "agreement", "config": {
        **bench.meta, "fraction": args.fraction, "settings": {k: OUR_SETTINGS[k] for k in explanations},
        "ranking": "Algorithm 2 magnitude (per-pixel L2 over channels), seeded random tie-breaking",
        "random_baseline": "map A against a uniform random perturbation, per image"},
        "table": table, "pairs": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
