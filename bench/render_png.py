"""The cost of an explanation's four PNGs at each zlib level, side by side: milliseconds and bytes.

Explains the first elpv training mistakes (300x300 photos, the default models, default `margin`), then
renders every explanation (saliency, overlay, adversarial, panel: what /explain returns) at each
compression level, interleaved in rounds, and reports the median milliseconds per explanation and the
mean bytes of each PNG. PNG is lossless at every level: the level trades CPU for bytes only.

    flock /tmp/advexplain-cpu.lock python -m bench.render_png     # writes bench/results/render_png.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from advexplain.shared import render
from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.explain import explain
from advexplain.shared.saliency import saliency_map
from bench.common import fmt, markdown_table, photo_mistakes, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=12)
    p.add_argument("--levels", type=int, nargs="+", default=[6, 3, 1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "render_png.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    bb = load_checkpoint(ROOT / "models" / "blackbox")
    oracle = LocalClassifier(bb.model, bb.classes, label_only=True)
    surrogate = LocalClassifier.from_checkpoint(ROOT / "models" / "surrogate").freeze()
    images, labels = photo_mistakes(LocalClassifier(bb.model, bb.classes), "elpv", "train", args.photos)
    results = [explain(x, y, surrogate, oracle, "margin") for x, y in zip(images, labels)]
    maps = [None if r.perturbation is None else saliency_map(r.perturbation) for r in results]

    ms: dict[int, list[float]] = {lvl: [] for lvl in args.levels}
    sizes: dict[int, dict[str, list[int]]] = {lvl: {} for lvl in args.levels}
    default_level = render.PNG_LEVEL
    try:
        for _ in range(args.rounds):
            for lvl in args.levels:
                render.PNG_LEVEL = lvl  # render.png reads it at each call
                t = time.perf_counter()
                for r, m in zip(results, maps):
                    for name, data in render.render_explanation(r, m).items():
                        sizes[lvl].setdefault(name, []).append(len(data))
                ms[lvl].append((time.perf_counter() - t) / len(results) * 1000)
    finally:
        render.PNG_LEVEL = default_level
    rows, out = [], {}
    for lvl in args.levels:
        mean_bytes = {name: float(np.mean(v)) for name, v in sizes[lvl].items()}
        out[str(lvl)] = {"ms_per_explanation": statistics.median(ms[lvl]), "mean_bytes": mean_bytes,
                         "mean_total_bytes": sum(mean_bytes.values())}
        rows.append([lvl, fmt(statistics.median(ms[lvl]), ".1f"), *(round(v) for v in mean_bytes.values()),
                     round(sum(mean_bytes.values()))])
    table = markdown_table(["zlib level", "ms / explanation", *sizes[args.levels[0]].keys(), "total bytes"], rows)
    print(table)
    write_json(args.out, {"benchmark": "render_png", "command": "python -m bench.render_png",
                          "photos": len(results), "data": "elpv train mistakes of models/blackbox, 300x300",
                          "levels": out, "table": table,
                          "meta": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
