"""The small base every explanation method shares: validation, query counting, the result type.

A method subclasses `Method` and overrides one hook, `search`, which receives a `Search` (the
original image, its true label, the gradient source and a budgeted oracle) and returns the
adversarial image it found, or None. Everything else (the first prediction, the already-correct
short cut, the query budget, distances, timing, the trace) is done here once for every method.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from advexplain.shared.errors import InvalidInput
from advexplain.shared.protocols import Classifier, DifferentiableClassifier

# One explanation never needs more oracle images than this; a larger request is a client error.
MAX_QUERIES_LIMIT = 10_000
# The paper's epsilon schedule needs alpha / 0.1 queries; refuse schedules longer than the limit.
MAX_ALPHA = 100.0


class BudgetSpent(Exception):
    """Raised inside a search when the next oracle query would exceed `max_queries`."""


@dataclass
class Explanation:
    """The outcome of one inverted adversarial search.

    adversarial: (C, H, W) float in [0, 1], the image the oracle classified as `label` (the
    original when the search failed). perturbation: adversarial - original, or None on failure
    (the paper's NIL). queries counts every image sent to the oracle, the first prediction
    included; search_queries = queries - 1 is what the paper reports. l2 / linf are norms of the
    perturbation in [0, 1] pixel units (0.0 when already correct, None on failure).
    """

    success: bool
    already_correct: bool
    label: int
    original_prediction: int
    final_prediction: int
    original: torch.Tensor
    adversarial: torch.Tensor
    perturbation: torch.Tensor | None
    epsilon: float | None
    queries: int
    l2: float | None
    linf: float | None
    method: str
    classes: tuple[str, ...] = ()
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    budget_exhausted: bool = False

    @property
    def search_queries(self) -> int:
        return max(self.queries - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no tensors): numbers, labels, class names and the trace."""

        def name(index: int) -> str | None:
            return self.classes[index] if 0 <= index < len(self.classes) else None

        return {
            "success": self.success,
            "already_correct": self.already_correct,
            "label": self.label,
            "label_name": name(self.label),
            "original_prediction": self.original_prediction,
            "original_prediction_name": name(self.original_prediction),
            "final_prediction": self.final_prediction,
            "final_prediction_name": name(self.final_prediction),
            "epsilon": _finite(self.epsilon),
            "queries": self.queries,
            "search_queries": self.search_queries,
            "l2": _finite(self.l2),
            "linf": _finite(self.linf),
            "method": self.method,
            "seconds": _finite(self.seconds),
            "budget_exhausted": self.budget_exhausted,
            "trace": [{k: _jsonable(v) for k, v in step.items()} for step in self.trace],
        }


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value):
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return str(value)


class BudgetedOracle:
    """The oracle as a search sees it: one image at a time, counted, never past the budget."""

    def __init__(self, oracle: Classifier, max_queries: int):
        self.oracle = oracle
        self.max_queries = max_queries
        self.queries = 0

    @property
    def remaining(self) -> int:
        return self.max_queries - self.queries

    def predict(self, image: torch.Tensor) -> int:
        """image: (C, H, W) in [0, 1] -> predicted class index. Costs exactly one query."""
        if self.queries >= self.max_queries:
            raise BudgetSpent
        self.queries += 1
        probs = self.oracle.predict_proba(image.unsqueeze(0).detach().clone())
        return int(torch.as_tensor(probs)[0].argmax())


@contextlib.contextmanager
def no_side_effects(source):
    """Eval mode and frozen parameters for the duration of a search, restored afterwards.

    Gradients are taken with `torch.autograd.grad` with respect to the input only, so no `.grad`
    is ever written; freezing the parameters also skips their backward work.
    """
    modules = [m for m in _modules_of(source) if isinstance(m, torch.nn.Module)]
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
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


def _modules_of(source) -> list:
    members = getattr(source, "members", None)
    if members is not None:
        return [m for member in members for m in _modules_of(member)]
    model = getattr(source, "model", None)
    return [model] if model is not None else []


def loss_gradient(source: DifferentiableClassifier, image: torch.Tensor, label: int) -> torch.Tensor:
    """Gradient of the cross-entropy loss at `image` w.r.t. the image, (C, H, W) like the image.

    This is the paper's `get_model_gradients(x, loss)`. An `EnsembleSurrogate` (anything with a
    `loss_gradient` method) supplies its own, the sum of its members'.
    """
    own = getattr(source, "loss_gradient", None)
    if own is not None:
        return own(image, label)
    x = image.detach().clone().unsqueeze(0).requires_grad_(True)
    with torch.enable_grad():
        logits = source.logits(x)
        loss = F.cross_entropy(logits, torch.tensor([label], device=logits.device))
        (grad,) = torch.autograd.grad(loss, x)
    return grad[0].detach().to(image.device)


def margin_and_gradient(source: DifferentiableClassifier, image: torch.Tensor, label: int) -> tuple[float, torch.Tensor]:
    """The true class's logit margin over the best other class, and its gradient w.r.t. the image.

    margin > 0 means the gradient source predicts `label`. An ensemble supplies the sum of its
    members' margins and gradients.
    """
    own = getattr(source, "margin_and_gradient", None)
    if own is not None:
        return own(image, label)
    x = image.detach().clone().unsqueeze(0).requires_grad_(True)
    with torch.enable_grad():
        margin = logit_margin(source.logits(x), label)[0]
        (grad,) = torch.autograd.grad(margin, x)
    return float(margin.detach()), grad[0].detach().to(image.device)


def logit_margin(logits: torch.Tensor, label: int) -> torch.Tensor:
    """(N, K) logits -> (N,) logit of `label` minus the largest other logit."""
    others = logits.clone()
    others[:, label] = float("-inf")
    return logits[:, label] - others.max(dim=1).values


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] image to the 8-bit grid, so it is exactly what a PNG of it would hold."""
    return image.clamp(0, 1).mul(255).round().div(255)


class Search:
    """What a method's `search` hook works with; it records every step in `trace`."""

    def __init__(self, image, label, gradient_source, oracle: BudgetedOracle, alpha: float, options: dict):
        self.image = image
        self.label = label
        self.gradient_source = gradient_source
        self.oracle = oracle
        self.alpha = alpha
        self.options = options
        self.trace: list[dict] = []
        self.epsilon: float | None = None
        self.last_prediction: int | None = None

    def query(self, candidate: torch.Tensor, **note) -> bool:
        """Ask the oracle about one candidate; True when it predicts the true label."""
        prediction = self.oracle.predict(candidate)
        self.last_prediction = prediction
        self.trace.append({"query": self.oracle.queries, "prediction": prediction, **note})
        return prediction == self.label


class Method:
    """One way of finding an inverted adversarial example. Subclasses override `search` only."""

    name: ClassVar[str] = "base"
    # Options a caller may pass through `explain(..., **options)`, with their defaults.
    defaults: ClassVar[dict[str, Any]] = {}

    def search(self, s: Search) -> torch.Tensor | None:
        """Return an adversarial image (C, H, W) in [0, 1] that s.query() accepted, or None."""
        raise NotImplementedError

    def validate_options(self, options: dict) -> dict:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise InvalidInput(f"method {self.name!r} takes no option(s) {', '.join(sorted(unknown))}")
        merged = {**self.defaults, **options}
        for key, value in merged.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(float(value)) or value < 0:
                    raise InvalidInput(f"{key} must be a finite number >= 0, got {value!r}")
        return merged

    def run(self, image, label, gradient_source, oracle, *, max_queries: int, alpha: float, **options) -> Explanation:
        started = time.perf_counter()
        options = self.validate_options(options)
        original = image.detach().clone()
        budget = BudgetedOracle(oracle, max_queries)
        classes = tuple(getattr(oracle, "classes", ()))

        first = budget.predict(original)
        trace = [{"query": 1, "prediction": first, "step": "original"}]
        adversarial, epsilon, exhausted = None, None, False
        final = first
        if first != label:
            s = Search(original, label, gradient_source, budget, alpha, options)
            with no_side_effects(gradient_source):
                try:
                    adversarial = self.search(s)
                except BudgetSpent:
                    adversarial, exhausted = None, True
            trace += s.trace
            epsilon = s.epsilon
            if s.last_prediction is not None:
                final = s.last_prediction
            if adversarial is not None and final != label:
                raise AssertionError(f"{self.name}: search returned an image the oracle did not accept")

        already_correct = first == label
        success = already_correct or adversarial is not None
        if already_correct:
            adversarial, perturbation, l2, linf = original.clone(), torch.zeros_like(original), 0.0, 0.0
        elif adversarial is not None:
            adversarial = adversarial.detach().clamp(0, 1)
            perturbation = adversarial - original
            l2, linf = float(perturbation.norm()), float(perturbation.abs().max())
        else:
            adversarial, perturbation, l2, linf, epsilon = original.clone(), None, None, None, None
        return Explanation(
            success=success, already_correct=already_correct, label=label, original_prediction=first,
            final_prediction=final, original=original, adversarial=adversarial, perturbation=perturbation,
            epsilon=epsilon, queries=budget.queries, l2=l2, linf=linf, method=self.name, classes=classes,
            trace=trace, seconds=time.perf_counter() - started, budget_exhausted=exhausted,
        )
