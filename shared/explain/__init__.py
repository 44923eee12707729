"""The explanation engine: find the inverted adversarial example of a misclassified image.

    explain(image, label, gradient_source, oracle, method=DEFAULT_METHOD, max_queries=..., alpha=...)

`gradient_source` is a DifferentiableClassifier (the real model for white-box, Algorithm 1; a
surrogate or an EnsembleSurrogate for black-box, Algorithm 3); `oracle` is any Classifier, and
every image sent to it counts one query. Methods: `paper` (the published line search), `margin`
(the default: free L2 steps on the gradient source to a logit margin, then one 8-bit query) and
`margin-linf` (the same with L-inf steps: smallest L-inf change, flat saliency maps).
"""

from __future__ import annotations

import math
import numbers

import torch

from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain.base import MAX_ALPHA, MAX_QUERIES_LIMIT, Explanation, Method, quantise
from advexplain.shared.explain.ensemble import EnsembleSurrogate
from advexplain.shared.explain.margin import MarginSearch, MarginSearchLinf
from advexplain.shared.explain.paper import PaperLineSearch, epsilon_schedule

METHODS: dict[str, Method] = {m.name: m for m in (MarginSearch(), MarginSearchLinf(), PaperLineSearch())}
DEFAULT_METHOD = "margin"
# 20 oracle images: the first prediction plus the paper's whole schedule at the default alpha
# (19 eps values), and ten times what the margin method needs on average.
DEFAULT_MAX_QUERIES = 20
# The paper does not publish alpha. With failures costing alpha/0.1 - 1 queries, its black-box
# numbers (26.9% failures, 8.73 queries on average) bound alpha to about 1.5..3.2 (alpha >= 3.3
# alone would cost 0.269 * 32 > 8.73); 2.0 is the round value in that range: eps = 0.1 .. 1.9.
DEFAULT_ALPHA = 2.0

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_MAX_QUERIES", "DEFAULT_METHOD", "EnsembleSurrogate", "Explanation", "METHODS",
    "Method", "epsilon_schedule", "explain", "quantise",
]


def explain(
    image: torch.Tensor,
    label: int,
    gradient_source,
    oracle,
    method: str = DEFAULT_METHOD,
    *,
    max_queries: int = DEFAULT_MAX_QUERIES,
    alpha: float = DEFAULT_ALPHA,
    **options,
) -> Explanation:
    """Find an image close to `image` that `oracle` classifies as `label`.

    image: (C, H, W) float in [0, 1], never mutated. label: the true class index.
    gradient_source: DifferentiableClassifier or EnsembleSurrogate (never queried as an oracle,
    never modified). oracle: Classifier; at most `max_queries` images are sent to it, the first
    prediction of `image` included, one image per call. alpha: the paper's bound on eps (method
    `paper`). Extra keyword options go to the method (see its `defaults`).

    Returns an Explanation; `already_correct` (one query) when the oracle already predicts
    `label`; `success=False` with the original image when nothing was found within the limits.
    Raises InvalidInput for a bad image, label, method or parameter.

    >>> result = explain(x, 1, surrogate, black_box)              # doctest: +SKIP
    >>> result.success, result.queries, result.linf               # doctest: +SKIP
    (True, 2, 0.00784...)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
        raise InvalidInput("image must be a float tensor (C, H, W)")
    if image.numel() == 0 or not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
        raise InvalidInput("image values must be finite and in [0, 1]")
    classes = tuple(getattr(oracle, "classes", ()))
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise InvalidInput(f"label must be an integer class index, got {label!r}")
    label = int(label)
    if label < 0 or (classes and label >= len(classes)):
        raise InvalidInput(f"label {label} is out of range for {len(classes)} classes")
    source_classes = tuple(getattr(gradient_source, "classes", ()))
    if classes and source_classes and len(source_classes) != len(classes):
        raise InvalidInput(f"the gradient source has {len(source_classes)} classes, the oracle {len(classes)}")
    if isinstance(max_queries, bool) or not isinstance(max_queries, numbers.Integral) or not 1 <= max_queries <= MAX_QUERIES_LIMIT:
        raise InvalidInput(f"max_queries must be an integer in [1, {MAX_QUERIES_LIMIT}], got {max_queries!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise InvalidInput(f"alpha must be a finite number in (0, {MAX_ALPHA}], got {alpha!r}")
    return METHODS[method].run(image, label, gradient_source, oracle, max_queries=int(max_queries),
                               alpha=float(alpha), **options)
