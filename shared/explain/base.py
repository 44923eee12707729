"""The small base every explanation method shares: options, the budgeted oracle, the result type.

A method subclasses `Method`, names its frozen options model, and overrides one hook, `search`,
which receives a `Search` (the original image, the goal class, the gradient source and a budgeted
oracle) and asks the oracle about candidates through `Search.query`. Everything else is done here
once for every method: the first prediction, the already-there short cut, the query budget, the
8-bit rounding of every queried image, the `max_linf` bound, distances, timing and the trace.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from advexplain.shared.pixels import LEVELS, quantise
from advexplain.shared.protocols import Classifier, GradientSource

# One explanation never needs more oracle images than this; a larger request is a client error.
MAX_QUERIES_LIMIT = 10_000
# 20 oracle images: the first prediction plus the paper's whole schedule at the default alpha
# (19 eps values), and ten times what the default method needs on average.
DEFAULT_MAX_QUERIES = 20
# The largest per-pixel change (L-inf, [0, 1] units) an explanation may make: 32/255. A change the
# oracle accepts but that is larger is a failure ("max_linf"), never a success: an explanation
# that repaints the image explains nothing. On every benchmark the default method's 90th
# percentile stays below it (bench/README.md).
DEFAULT_MAX_LINF = 32 / 255

# Why a search failed (Explanation.failure_reason).
FAILED_MAX_QUERIES = "max_queries"    # the query budget was spent
FAILED_MAX_LINF = "max_linf"          # nothing within max_linf made the oracle agree
FAILED_ALPHA = "alpha"                # the paper's eps reached alpha
FAILED_NO_GRADIENT = "no_gradient"    # the gradient source gives no direction


class SearchOptions(BaseModel):
    """Options every method takes, validated once here. Frozen: a search cannot change them.

    max_queries: most images sent to the oracle, the first prediction included.
    max_linf: the largest per-pixel change of a success, in [0, 1] pixel units.
    refine: extra queries a method may spend shrinking a change the oracle already accepted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_queries: int = Field(DEFAULT_MAX_QUERIES, ge=1, le=MAX_QUERIES_LIMIT)
    max_linf: float = Field(DEFAULT_MAX_LINF, gt=0, le=1, allow_inf_nan=False)
    refine: int = Field(0, ge=0, le=MAX_QUERIES_LIMIT)


@dataclass
class Explanation:
    """The outcome of one inverted adversarial search.

    original: (C, H, W) float in [0, 1], the image explained (the user's photo at its own size).
    adversarial: the 8-bit image the oracle classified as `target` (the original on failure);
    perturbation: adversarial - original, or None on failure (the paper's NIL). queries counts every
    image sent to the oracle, the first prediction included; search_queries = queries - 1 is what
    the paper reports. l2, linf and rms are norms of the perturbation in [0, 1] pixel units (0.0
    when already there, None on failure). `label` is the true class, `target` the class the change
    makes the oracle predict (the label unless asked otherwise).
    """

    success: bool
    already_correct: bool
    label: int
    target: int
    original_prediction: int
    final_prediction: int
    original: torch.Tensor
    adversarial: torch.Tensor
    perturbation: torch.Tensor | None
    epsilon: float | None
    queries: int
    l2: float | None
    linf: float | None
    rms: float | None
    method: str
    classes: tuple[str, ...] = ()
    trace: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    failure_reason: str | None = None

    @property
    def search_queries(self) -> int:
        return max(self.queries - 1, 0)

    @property
    def budget_exhausted(self) -> bool:
        return self.failure_reason == FAILED_MAX_QUERIES

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no tensors): numbers, labels, class names and the trace."""

        def name(index: int) -> str | None:
            return self.classes[index] if 0 <= index < len(self.classes) else None

        return {
            "success": self.success,
            "already_correct": self.already_correct,
            "label": self.label,
            "label_name": name(self.label),
            "target": self.target,
            "target_name": name(self.target),
            "original_prediction": self.original_prediction,
            "original_prediction_name": name(self.original_prediction),
            "final_prediction": self.final_prediction,
            "final_prediction_name": name(self.final_prediction),
            "epsilon": _finite(self.epsilon),
            "queries": self.queries,
            "search_queries": self.search_queries,
            "l2": _finite(self.l2),
            "linf": _finite(self.linf),
            "rms": _finite(self.rms),
            "method": self.method,
            "seconds": _finite(self.seconds),
            "failure_reason": self.failure_reason,
            "budget_exhausted": self.budget_exhausted,
            "size": [int(self.original.shape[-1]), int(self.original.shape[-2])],
            "trace": [{k: _jsonable(v) for k, v in step.items()} for step in self.trace],
        }


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def linf_levels(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest per-pixel difference of two 8-bit-grid images, in whole 8-bit levels."""
    return int(round(float((a - b).abs().max()) * LEVELS))


def max_levels(max_linf: float) -> int:
    """The most whole 8-bit levels a change may move a pixel by under `max_linf` ([0, 1] units)."""
    return int(math.floor(max_linf * LEVELS + 1e-6))


def source_device(source: GradientSource, default: torch.device) -> torch.device:
    """The device of a gradient source's networks (its first parameter's), else `default`."""
    for module in source.modules():
        for parameter in module.parameters():
            return parameter.device
    return default


class BudgetSpent(Exception):
    """Raised inside a search when the next oracle query would exceed `max_queries`."""


class BudgetedOracle:
    """The oracle as a search sees it: one 8-bit image at a time, counted, never past the budget."""

    def __init__(self, oracle: Classifier, max_queries: int) -> None:
        self.oracle = oracle
        self.max_queries = max_queries
        self.queries = 0

    @property
    def remaining(self) -> int:
        return self.max_queries - self.queries

    def predict(self, image: torch.Tensor) -> int:
        """image: (C, H, W) in [0, 1] on the 8-bit grid -> predicted class index. One query."""
        if self.queries >= self.max_queries:
            raise BudgetSpent
        self.queries += 1
        # Oracles get CPU images whatever device the search runs on: a Classifier owes nothing more.
        probs = self.oracle.predict_proba(image.unsqueeze(0).detach().to("cpu", copy=True))
        return int(torch.as_tensor(probs)[0].argmax())


@contextlib.contextmanager
def no_side_effects(source: GradientSource) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of a search, restored afterwards.

    Gradients are taken with `torch.autograd.grad` with respect to the input only, so no `.grad`
    is ever written; freezing the parameters also skips their backward work.
    """
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in source.modules()]
    try:
        for m, _, params in saved:
            m.eval()
            for p, _ in params:
                p.requires_grad_(False)
        yield
    finally:
        for m, training, params in saved:
            m.train(training)
            for p, flag in params:
                p.requires_grad_(flag)


def value_and_grad(
    objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective(x) as an (N,) tensor, d sum(objective) / dx), x never modified.

    The one copy of the input-gradient boilerplate: samples are independent (eval mode), so the
    gradient of the sum holds each sample's own gradient.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        values = objective(x)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad.detach()


class Search:
    """What a method's `search` hook works with; `query` records every step in `trace`.

    image: the original (C, H, W) on the 8-bit grid; goal: the class the oracle should answer.
    `accepted` is the last candidate the oracle classified as `goal` (None until one is).
    """

    def __init__(self, image: torch.Tensor, goal: int, gradient_source: GradientSource, oracle: BudgetedOracle,
                 options: SearchOptions, whitebox: bool) -> None:
        self.image = image
        self.goal = goal
        self.gradient_source = gradient_source
        self.oracle = oracle
        self.options = options
        self.whitebox = whitebox
        self.trace: list[dict[str, Any]] = []
        self.epsilon: float | None = None
        self.accepted: torch.Tensor | None = None
        self.failure_reason: str | None = None
        self.last_prediction: int | None = None

    def snap(self, candidate: torch.Tensor) -> torch.Tensor:
        """The image the oracle will see: clipped to [0, 1] and rounded to 8 bits."""
        return quantise(candidate)

    def query(self, candidate: torch.Tensor, **note: Any) -> bool:
        """Ask the oracle about one candidate (rounded to 8 bits first); True when it answers `goal`."""
        candidate = self.snap(candidate)
        prediction = self.oracle.predict(candidate)
        self.last_prediction = prediction
        self.trace.append({"query": self.oracle.queries, "prediction": prediction,
                           "linf_255": linf_levels(candidate, self.image), **note})
        if prediction == self.goal:
            self.accepted = candidate
        return prediction == self.goal


class Method:
    """One way of finding an inverted adversarial example. Subclasses override `search` only."""

    name: ClassVar[str] = "base"
    options_type: ClassVar[type[SearchOptions]] = SearchOptions

    def search(self, s: Search) -> None:
        """Query candidates through `s.query` until one is accepted (it ends up in `s.accepted`) or
        the method gives up (set `s.failure_reason`). Running out of queries raises BudgetSpent."""
        raise NotImplementedError

    def run(self, image: torch.Tensor, label: int, target: int, gradient_source: GradientSource,
            oracle: Classifier, options: SearchOptions, whitebox: bool) -> Explanation:
        started = time.perf_counter()
        # The search runs where the gradient source's network lives (a GPU's surrogate gets GPU
        # candidates and views); what it returns is on the caller's device.
        home = image.device
        original = quantise(image.detach().to(source_device(gradient_source, home), copy=True))
        budget = BudgetedOracle(oracle, options.max_queries)
        classes = tuple(getattr(oracle, "classes", ()) or getattr(gradient_source, "classes", ()))

        first = budget.predict(original)
        trace: list[dict[str, Any]] = [{"query": 1, "prediction": first, "step": "original"}]
        accepted, failure, epsilon, final = None, None, None, first
        if first != target:
            s = Search(original, target, gradient_source, budget, options, whitebox)
            with no_side_effects(gradient_source):
                try:
                    self.search(s)
                except BudgetSpent:
                    s.failure_reason = FAILED_MAX_QUERIES
            trace += s.trace
            accepted, epsilon = s.accepted, s.epsilon
            final = target if accepted is not None else (s.last_prediction if s.last_prediction is not None else first)
            failure = None if accepted is not None else (s.failure_reason or FAILED_MAX_LINF)
            if accepted is not None and linf_levels(accepted, original) > max_levels(options.max_linf):
                # The oracle agreed, but only with a change larger than allowed: not an explanation.
                accepted, failure = None, FAILED_MAX_LINF

        already = first == target
        if already:
            adversarial, perturbation, l2, linf, rms = original.clone(), torch.zeros_like(original), 0.0, 0.0, 0.0
        elif accepted is not None:
            # Both images are on the 8-bit grid: measure the change in whole levels, so the norms are
            # exact (32 levels is 32/255, not 32/255 plus float noise).
            levels = (accepted - original).mul(LEVELS).round().double()
            adversarial, perturbation = accepted, (levels / LEVELS).to(original.dtype)
            l2 = float(levels.pow(2).sum().sqrt()) / LEVELS
            linf = float(levels.abs().max()) / LEVELS
            rms = float(levels.pow(2).mean().sqrt()) / LEVELS
        else:
            adversarial, perturbation, l2, linf, rms, epsilon = original.clone(), None, None, None, None, None
        original, adversarial = original.to(home), adversarial.to(home)
        perturbation = None if perturbation is None else perturbation.to(home)
        return Explanation(
            success=already or accepted is not None, already_correct=already, label=label, target=target,
            original_prediction=first, final_prediction=final, original=original, adversarial=adversarial,
            perturbation=perturbation, epsilon=epsilon, queries=budget.queries, l2=l2, linf=linf, rms=rms,
            method=self.name, classes=classes, trace=trace, seconds=time.perf_counter() - started,
            failure_reason=None if already or accepted is not None else failure,
        )
