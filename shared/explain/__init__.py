"""The explanation engine: find the inverted adversarial example of a misclassified image.

    explain(image, label, gradient_source, oracle, method=DEFAULT_METHOD, whitebox=False, **options)

`gradient_source` is a GradientSource (the real model for white-box, Algorithm 1; a surrogate or
an EnsembleSurrogate for black-box, Algorithm 3); `oracle` is any Classifier, and every image sent
to it counts one query. Methods: `margin` (the default: free L2 steps on the gradient source
inside a growing L-inf budget, then one 8-bit query), `margin-linf` (the same with sign steps) and
`paper` (the published line search). Each method's options are a frozen pydantic model
(`METHODS[name].options_type`), validated in one place.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from pydantic import ValidationError

from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain.base import (
    DEFAULT_MAX_LINF,
    DEFAULT_MAX_QUERIES,
    MAX_QUERIES_LIMIT,
    Explanation,
    Method,
    SearchOptions,
)
from advexplain.shared.explain.batching import BatchedSurrogate
from advexplain.shared.explain.ensemble import EnsembleSurrogate
from advexplain.shared.explain.margin import MarginOptions, MarginSearch, MarginSearchLinf
from advexplain.shared.explain.paper import DEFAULT_ALPHA, MAX_ALPHA, PaperLineSearch, PaperOptions, epsilon_schedule
from advexplain.shared.protocols import Classifier, GradientSource

METHODS: dict[str, Method] = {m.name: m for m in (MarginSearch(), MarginSearchLinf(), PaperLineSearch())}
DEFAULT_METHOD = "margin"

__all__ = [
    "BatchedSurrogate",
    "DEFAULT_ALPHA", "DEFAULT_MAX_LINF", "DEFAULT_MAX_QUERIES", "DEFAULT_METHOD", "EnsembleSurrogate", "Explanation",
    "MAX_ALPHA", "MAX_QUERIES_LIMIT", "METHODS", "MarginOptions", "Method", "PaperOptions", "SearchOptions",
    "epsilon_schedule", "explain", "method_options",
]


def method_options(method: str, **options: Any) -> SearchOptions:
    """The frozen options of `method`, validated; InvalidInput names every bad or unknown field."""
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    try:
        return METHODS[method].options_type(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid options for method {method!r}: {problems}") from None


def _class_index(value: object, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"{what} must be an integer class index, got {value!r}")
    if not 0 <= int(value) < n:
        raise InvalidInput(f"{what} {value} is out of range for {n} classes")
    return int(value)


def explain(
    image: torch.Tensor,
    label: int,
    gradient_source: GradientSource,
    oracle: Classifier,
    method: str = DEFAULT_METHOD,
    *,
    target: int | None = None,
    whitebox: bool = False,
    options: SearchOptions | None = None,
    **overrides: Any,
) -> Explanation:
    """Find an image close to `image` that `oracle` classifies as `target` (default: `label`).

    image: (C, H, W) float in [0, 1] at any size (rounded to 8 bits: the oracle judges 8-bit
    images), never mutated. label: the true class index. target: the class the change should make
    the oracle predict; the default, the label, explains a mistake. gradient_source: a
    GradientSource (never queried, never modified). oracle: a Classifier; at most `max_queries`
    images are sent to it, the first prediction of `image` included, one image per call.
    whitebox: the gradient source IS the oracle's model (Algorithm 1): exact gradients.
    options: the method's options object, or keyword overrides of its defaults (e.g.
    max_queries=20, max_linf=16/255, refine=2, alpha=2.0 for `paper`).

    Returns an Explanation: `already_correct` (one query) when the oracle already predicts the
    target; `success=False` with a `failure_reason` and the original image when no change within
    `max_linf` was found within the budget. Raises InvalidInput for a bad image, label, method or option.

    >>> result = explain(x, 1, surrogate, black_box)              # doctest: +SKIP
    >>> result.success, result.queries, result.linf * 255          # doctest: +SKIP
    (True, 2, 4.0)
    """
    if options is None:
        options = method_options(method, **overrides)
    elif overrides or not isinstance(options, METHODS[method].options_type if method in METHODS else SearchOptions):
        raise InvalidInput("pass either an options object of the method's type or keyword options, not both")
    if (
        not isinstance(image, torch.Tensor)
        or image.ndim != 3
        or not image.is_floating_point()
        or image.shape[0] not in (1, 3)
    ):
        raise InvalidInput("image must be a float tensor (C, H, W) with 1 or 3 channels")
    if image.numel() == 0 or not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
        raise InvalidInput("image values must be finite and in [0, 1]")
    if not isinstance(gradient_source, GradientSource):
        raise InvalidInput(f"the gradient source {type(gradient_source).__name__} is not a GradientSource")
    classes = tuple(getattr(oracle, "classes", ()) or ()) or tuple(gradient_source.classes)
    if len(gradient_source.classes) != len(classes):
        raise InvalidInput(f"the gradient source has {len(gradient_source.classes)} classes, the oracle {len(classes)}")
    label = _class_index(label, len(classes), "label")
    target = label if target is None else _class_index(target, len(classes), "target")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return METHODS[method].run(image, label, target, gradient_source, oracle, options, whitebox)
