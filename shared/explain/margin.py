"""The default method: free steps on the gradient source until it is confident, then one query.

Instead of walking a fixed line with one oracle query per step (the paper), this method moves the
image on the gradient source alone, which costs no query: targeted DeepFool steps (the smallest L2
step that, to first order, lifts the true class's logit margin to a target `m`) from the current
8-bit image, until the gradient source itself gives the true label a margin of at least `m` on the
8-bit-rounded candidate. Only then is the oracle asked, once. After a failed query the margin is
raised (`m <- m * growth + margin_step`) and the walk continues from where it stopped. It uses the
oracle's predicted label only, so a label-only black box serves as well as one giving scores.

What it minimises: the L2 norm of the perturbation, step by step (DeepFool's linearised minimum),
rather than the loss along a fixed direction; every queried image is on the 8-bit grid, so the
adversarial example is exactly the PNG the service returns. When the gradient source IS the
oracle (white-box), a margin just above 0 is exact, so the first query succeeds.

Two step geometries, registered as two methods: `margin` (the default) takes DeepFool's L2 steps,
which concentrate the change on the pixels the gradient source cares most about, so Algorithm 2's
map has a shape; `margin-linf` takes the smallest L-inf steps (every pixel moves by the same
amount), which gives the smallest L-inf perturbation but a nearly flat saliency map. On the
gender-faces CPU models (95 misclassified images, label-only black box) `margin` reached 100%
with 1.85 mean search queries, median L2 0.86 and L-inf 24/255, and its maps scored a deletion
AUC of 0.65 (Captum's Saliency 0.63, random 0.74); `margin-linf` reached 100%, 1.87, L2 1.34 and
L-inf 4/255, with maps at the random floor (0.75). See bench/README.md.

In black-box mode the surrogate's margin gradient is averaged over the candidate and `smooth - 1`
seeded Gaussian-noised copies (std `sigma` = 0.03; white-box keeps the exact gradient), which
transfers better. Tuned on 60 misclassified elpv TRAIN images (label-only box): 60.0% -> 73.3%
success, 5.40 -> 4.13 mean search queries. Reported (not tuned on): elpv validation (102 images)
79.4% -> 84.3%, 3.96 -> 3.24 queries, median L2 3.20 -> 1.97, L-inf 53 -> 45/255; gender-faces
validation (95) 100% -> 100%, 1.85 -> 1.66 queries, L2 0.86 -> 0.76, L-inf 24 -> 20/255.
Spending the whole budget (max_rounds 19), gentler growth (1.5) and line-search queries along
t * delta did not raise the tuning-set success.

An optional final search (`refine` queries, default 0 to keep the query count low) bisects the
scale t in (0, 1] of the found perturbation for the smallest one the oracle still accepts.
"""

from __future__ import annotations

import math

import torch

from advexplain.shared.errors import InvalidInput

from advexplain.shared.explain.base import Method, Search, margin_and_gradient, quantise

# Logit margin the surrogate must give the true class before a black-box query. On gender-faces
# (64x64, CPU default models, 60 misclassified images, label-only box) the margin at which the
# black box first agreed ranged from 4 to ~130 logits (median ~23): starting at 16 and doubling
# trades about two search queries for a median L-inf near 4-5/255; starting lower costs queries,
# higher costs perturbation.
DEFAULT_TRANSFER_MARGIN = 16.0
# White-box: the gradient source is the oracle, so only ties need clearing.
WHITEBOX_MARGIN = 1e-3
QUANTUM = 1.0 / 255


class MarginSearch(Method):
    """Surrogate-first margin search (targeted DeepFool on the gradient source, 8-bit queries).

    Options: margin (logit margin before the first query; None = WHITEBOX_MARGIN when the gradient
    source is the oracle, else DEFAULT_TRANSFER_MARGIN), growth and margin_step (how the margin is
    raised after a failed query), overshoot (relative extra per DeepFool step), max_steps (free
    steps per query), max_rounds (failed queries before giving up), refine (extra queries spent
    shrinking a found perturbation), quantise (round candidates to 8 bits), smooth and sigma
    (black-box gradient smoothing: samples and noise std; smooth 0 or 1 turns it off).

    image: (C, H, W) float in [0, 1]. Returns an image the oracle classifies as `label`.

    >>> explain(x, 1, surrogate, black_box)   # doctest: +SKIP
    """

    name = "margin"
    defaults = {
        "margin": None,
        "growth": 2.0,
        "margin_step": 0.0,
        "overshoot": 0.02,
        "max_steps": 50,
        "max_rounds": 10,
        "refine": 0,
        "quantise": True,
        "norm": "l2",
        "smooth": 4,
        "sigma": 0.03,
    }

    def validate_options(self, options: dict) -> dict:
        merged = super().validate_options({k: v for k, v in options.items() if k not in ("norm", "quantise", "margin")})
        merged.update({k: options[k] for k in ("norm", "quantise", "margin") if k in options})
        if merged["norm"] not in ("linf", "l2"):
            raise InvalidInput(f"norm must be 'linf' or 'l2', got {merged['norm']!r}")
        margin = merged["margin"]
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin) or margin < 0):
            raise InvalidInput(f"margin must be a finite number >= 0, got {margin!r}")
        if merged["growth"] < 1:
            raise InvalidInput(f"growth must be >= 1, got {merged['growth']!r}")
        merged["quantise"] = bool(merged["quantise"])
        return merged

    def search(self, s: Search):
        o = s.options
        snap = quantise if o["quantise"] else (lambda t: t.clamp(0, 1))
        margin = o["margin"]
        if margin is None:
            margin = WHITEBOX_MARGIN if s.gradient_source is s.oracle.oracle else DEFAULT_TRANSFER_MARGIN
        # Smoothing helps transfer only; white-box keeps the exact gradient. Seeded: reproducible.
        noise = None if s.gradient_source is s.oracle.oracle else torch.Generator().manual_seed(0)
        current = s.image.clone()
        for round_ in range(int(o["max_rounds"]) + 1):
            candidate, reached, steps = self._walk(s, current, margin, noise)
            current = candidate
            if s.query(candidate, margin=margin, steps=steps, surrogate_margin=reached,
                       linf=float((candidate - s.image).abs().max())):
                found = self._refine(s, candidate, snap, int(o["refine"]))
                s.epsilon = float((found - s.image).abs().max())
                return found
            margin = margin * float(o["growth"]) + float(o["margin_step"])
        return None

    def _walk(self, s: Search, start: torch.Tensor, target: float, noise=None) -> tuple[torch.Tensor, float, int]:
        """Free DeepFool steps on the gradient source from `start` until the snapped candidate has
        margin >= target; returns (candidate, its margin, steps taken). `noise` (a Generator)
        turns on gradient smoothing."""
        o = s.options
        snap = quantise if o["quantise"] else (lambda t: t.clamp(0, 1))
        current = start.clone()
        candidate = snap(current)
        value = float("-inf")
        for step in range(int(o["max_steps"]) + 1):
            value, grad = self._margin_and_gradient(s, candidate, noise)
            if value >= target or step == int(o["max_steps"]):
                return candidate, value, step
            norm2 = float((grad * grad).sum())
            if norm2 == 0.0:
                return candidate, value, step
            need = (target - value) * (1.0 + float(o["overshoot"]))
            if o["norm"] == "linf":
                # The smallest L-inf step reaching the target to first order: |g|_1 sign(g).
                direction = grad.sign() * (need / float(grad.abs().sum()))
            else:
                direction = grad * (need / norm2)
            if o["quantise"]:
                # A step below one 8-bit level would round away and stall the walk: move at least
                # one level (1/255) on the pixel that moves most.
                top = float(direction.abs().max())
                if 0 < top < QUANTUM:
                    direction = direction * (QUANTUM / top)
            # Step from the continuous iterate, so sub-quantum progress accumulates instead of
            # being rounded away each time.
            current = (current + direction).clamp(0, 1)
            candidate = snap(current)
        return candidate, value, int(o["max_steps"])

    def _margin_and_gradient(self, s: Search, image: torch.Tensor, noise) -> tuple[float, torch.Tensor]:
        """The margin at `image`; with a `noise` generator, its gradient averaged with `smooth - 1`
        Gaussian-noised copies (std `sigma`), which transfers better to the black box."""
        value, grad = margin_and_gradient(s.gradient_source, image, s.label)
        n = int(s.options["smooth"])
        if noise is not None and n > 1:
            sigma = float(s.options["sigma"])
            for _ in range(n - 1):
                jitter = torch.randn(image.shape, generator=noise).to(image.device, image.dtype)
                grad = grad + margin_and_gradient(s.gradient_source, (image + sigma * jitter).clamp(0, 1), s.label)[1]
            grad = grad / n
        return value, grad

    def _refine(self, s: Search, found: torch.Tensor, snap, queries: int) -> torch.Tensor:
        """Bisect t in (0, 1]: the smallest scaled perturbation the oracle still accepts."""
        delta = found - s.image
        low, high, best = 0.0, 1.0, found
        for _ in range(queries):
            if s.oracle.remaining <= 0:
                break
            mid = (low + high) / 2
            candidate = snap(s.image + mid * delta)
            if torch.equal(candidate, best) or torch.equal(candidate, s.image):
                break
            if s.query(candidate, refine=mid):
                high, best = mid, candidate
            else:
                low = mid
        if s.last_prediction != s.label:
            s.last_prediction = s.label  # the best candidate was accepted by an earlier query
        return best


class MarginSearchLinf(MarginSearch):
    """The margin search with L-inf steps: the smallest L-inf change, but a flat saliency map."""

    name = "margin-linf"
    defaults = {**MarginSearch.defaults, "norm": "linf"}
