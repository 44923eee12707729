"""The batch evaluation's library half: the paper's figures, finding mistakes, and the summary of a run.

`advexplain evaluate` and the benchmarks both use it, so every report computes its numbers the same
way (percentiles with numpy's default linear interpolation, norms in 8-bit levels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from advexplain.shared.explain import Explanation

# Haffar et al., Section 4: 301 misclassified test images of the gender-faces data set.
PAPER = {
    "whitebox": {"success_rate": 0.9967, "mean_search_queries": 1.96, "misclassified": 301},
    "blackbox": {"success_rate": 0.7308, "mean_search_queries": 8.73, "misclassified": 301},
}


def find_mistakes(predict: Callable[[torch.Tensor], int], images: Sequence[torch.Tensor],
                  labels: Sequence[int]) -> list[tuple[int, int]]:
    """(index, predicted class) of every image `predict` gets wrong.

    predict: one (C, H, W) [0, 1] image -> a class index (a local model's forward pass, or one
    counted black-box query); images may have different sizes.
    """
    out = []
    for i, (image, label) in enumerate(zip(images, labels)):
        predicted = int(predict(image))
        if predicted != int(label):
            out.append((i, predicted))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy's percentile (linear interpolation) of `values`, or None when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else None


def summarise(results: Sequence[Explanation], misclassified: int | None = None) -> dict[str, Any]:
    """The numbers of a run: success, queries, change size (over successes, in 8-bit levels and
    [0, 1] units), time, and why searches failed. `misclassified` defaults to len(results)."""
    changed = [r for r in results if r.success and not r.already_correct]
    failed = [r for r in results if not r.success]
    # A success that changed the image always has its norms; the filters only tell the type checker.
    linf = [r.linf * 255 for r in changed if r.linf is not None]
    l2 = [r.l2 for r in changed if r.l2 is not None]
    return {
        "misclassified": len(results) if misclassified is None else misclassified,
        "explained": len(results),
        "successes": sum(r.success for r in results),
        "already_correct": sum(r.already_correct for r in results),
        "success_rate": sum(r.success for r in results) / len(results) if results else None,
        "mean_queries": mean([r.queries for r in results]),
        "median_queries": percentile([r.queries for r in results], 50),
        "mean_search_queries": mean([r.search_queries for r in results]),
        "median_search_queries": percentile([r.search_queries for r in results], 50),
        "max_queries_used": max((r.queries for r in results), default=None),
        "median_linf_255": percentile(linf, 50),
        "p90_linf_255": percentile(linf, 90),
        "max_linf_255": max(linf, default=None),
        "median_linf": percentile([r.linf for r in changed if r.linf is not None], 50),
        "median_l2": percentile(l2, 50),
        "mean_l2": mean(l2),
        "median_rms_255": percentile([r.rms * 255 for r in changed if r.rms is not None], 50),
        "seconds_per_explanation": mean([r.seconds for r in results]),
        "seconds_per_failure": mean([r.seconds for r in failed]),
        "max_seconds_failure": max((r.seconds for r in failed), default=None),
        "failure_reasons": {reason: sum(r.failure_reason == reason for r in failed)
                            for reason in sorted({str(r.failure_reason) for r in failed})},
    }
