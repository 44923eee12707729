"""Algorithms 1 and 3 of Haffar et al. as published: a line search along the raw loss gradient.

The loop is read as `while wrong AND eps < alpha` (the printed OR would never stop on success):
eps takes the values 0.1, 0.2, ... (k / 10, exact decimals, no drift) while eps < alpha, each
candidate is `clip(x - eps * g, 0, 1)` with `g` the cross-entropy gradient at the ORIGINAL image
(the real model's for Algorithm 1, the surrogate's for Algorithm 3), and each candidate costs one
oracle query. Like every candidate advexplain sends, it is rounded to 8 bits before the oracle
sees it, so success, the returned image and its norms are those of the image the oracle judged
(the paper's own numbers come from unrounded candidates, which no image file can hold).
"""

from __future__ import annotations

from pydantic import Field

from advexplain.shared.explain.base import (
    FAILED_ALPHA,
    FAILED_MAX_LINF,
    Method,
    Search,
    SearchOptions,
    linf_levels,
    max_levels,
    value_and_grad,
)

EPSILON_STEP = 0.1
# The paper does not publish alpha. With failures costing alpha/0.1 - 1 queries, its black-box
# numbers (26.9% failures, 8.73 queries on average) bound alpha to about 1.5..3.2 (alpha >= 3.3
# alone would cost 0.269 * 32 > 8.73); 2.0 is the round value in that range: eps = 0.1 .. 1.9.
DEFAULT_ALPHA = 2.0
# alpha / 0.1 queries at most: the schedule never needs more than the query limit allows.
MAX_ALPHA = 100.0


class PaperOptions(SearchOptions):
    """alpha: the bound on eps, in (0, 100]."""

    alpha: float = Field(DEFAULT_ALPHA, gt=0, le=MAX_ALPHA, allow_inf_nan=False)


def epsilon_schedule(alpha: float) -> list[float]:
    """The eps values the paper tries for a given alpha: k/10 for k = 1, 2, ... while k/10 < alpha."""
    out, k = [], 1
    while k / 10 < alpha:
        out.append(k / 10)
        k += 1
    return out


class PaperLineSearch(Method):
    """`x_adv = clip(x - eps * grad_x loss(f(x), label), 0, 1)` for eps = 0.1, 0.2, ... < alpha.

    Minimises nothing explicitly; the first eps whose (8-bit) candidate the oracle classifies as the
    goal wins. Fails when eps reaches alpha, when candidates grow past max_linf, or when the query
    budget runs out.

    >>> explain(x, 1, surrogate, black_box, method="paper", alpha=2.0)   # doctest: +SKIP
    """

    name = "paper"
    options_type = PaperOptions

    def search(self, s: Search) -> None:
        # The paper recomputes the gradient inside the loop, but always at the original image, so
        # it is the same vector every time: compute it once. Towards a target class other than the
        # true label, the loss is the target's (the step descends it).
        options = s.options
        assert isinstance(options, PaperOptions)  # explain() builds each method's own options_type
        _, gradient = value_and_grad(lambda x: s.gradient_source.loss(x, s.goal), s.image.unsqueeze(0))
        gradient = gradient[0]
        for eps in epsilon_schedule(options.alpha):
            candidate = s.snap(s.image - eps * gradient)
            if linf_levels(candidate, s.image) > max_levels(s.options.max_linf):
                # Every later candidate moves further along the same ray: none can be within max_linf.
                s.failure_reason = FAILED_MAX_LINF
                return
            if s.query(candidate, epsilon=eps):
                s.epsilon = eps
                return
        s.failure_reason = FAILED_ALPHA
