"""Algorithms 1 and 3 of Haffar et al. as published: a line search along the raw loss gradient.

The loop is read as `while wrong AND eps < alpha` (the printed OR would never stop on success):
eps takes the values 0.1, 0.2, ... (k / 10, exact decimals, no drift) while eps < alpha, each
candidate is `clip(x - eps * g, 0, 1)` with `g` the cross-entropy gradient at the ORIGINAL image
(the real model's for Algorithm 1, the surrogate's for Algorithm 3), and each candidate costs one
oracle query. The candidates are not rounded to 8 bits, exactly as in the paper.
"""

from __future__ import annotations

from advexplain.shared.explain.base import Method, Search, loss_gradient

EPSILON_STEP = 0.1


def epsilon_schedule(alpha: float) -> list[float]:
    """The eps values the paper tries for a given alpha: k/10 for k = 1, 2, ... while k/10 < alpha."""
    out, k = [], 1
    while k / 10 < alpha:
        out.append(k / 10)
        k += 1
    return out


class PaperLineSearch(Method):
    """`x_adv = clip(x - eps * grad_x loss(f(x), label), 0, 1)` for eps = 0.1, 0.2, ... < alpha.

    Minimises nothing explicitly; the first eps whose candidate the oracle classifies as `label`
    wins. Fails (NIL) when eps reaches alpha or the query budget runs out.

    >>> explain(x, 1, surrogate, black_box, method="paper", alpha=2.0)   # doctest: +SKIP
    """

    name = "paper"

    def search(self, s: Search):
        # The paper recomputes the gradient inside the loop, but always at the original image, so
        # it is the same vector every time: compute it once.
        gradient = loss_gradient(s.gradient_source, s.image, s.label)
        for eps in epsilon_schedule(s.alpha):
            candidate = (s.image - eps * gradient).clamp(0, 1)
            if s.query(candidate, epsilon=eps):
                s.epsilon = eps
                return candidate
        return None
