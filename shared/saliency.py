"""Algorithm 2 of Haffar et al.: saliency maps from inverted adversarial perturbations.

Per pixel, the perturbation's magnitude is the Euclidean length of its change over the colour
channels, sqrt(sum_c delta_c^2) (a pure red shift and a grey shift of the same size count the
same; the paper thresholds "the pixel" without saying how channels combine). Magnitudes below
`q3 + tau * iqr` are set to 0 and the rest multiplied by `beta`. The quartiles (linear
interpolation, numpy's default) come from every pixel of every non-NIL perturbation of a batch
(`saliency_maps`, the paper's batch mode) or of the one image (`saliency_map`, single mode).

An empty map explains nothing, and the paper's fence can pass every change: a change pinned at
its L-inf budget puts more than a quarter of its pixels at the maximum, so q3 is the maximum and
q3 + tau * iqr lies above it. In single mode (the services) such a map keeps the largest changes
instead (those within half an 8-bit level of the maximum), boosted by `beta`; whenever the
paper's map keeps any pixel it is returned unchanged. Batch mode stays the paper's: there the
fence is a common scale, and a map below it says its change was small next to the others.

Defaults (the paper needs tau > 0 and beta > 1 and gives no values): tau = 0.5. Tukey's fence
(1.5) finds outliers in heavy-tailed changes such as the paper's eps * gradient, but the default
search draws its change on a coarse grid so that it survives a box's resizing, and such a smooth
change has few outliers: on 60 misclassified training photos of the third-party benchmark box
(bench/native_resolution.py) tau = 1.5 left 27 of 60 maps empty and kept 2.4% of the pixels on
average; tau = 0.5 keeps 10.4% and left 3 empty. beta = 2.0 doubles the kept pixels, so they stand
out when maps are drawn on a common scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from advexplain.shared.errors import InvalidInput

DEFAULT_TAU = 0.5
DEFAULT_BETA = 2.0
# Single mode's fallback keeps the changes within this much of the largest (half an 8-bit level).
TOP_TOLERANCE = 0.5 / 255


def pixel_magnitude(perturbation: torch.Tensor) -> torch.Tensor:
    """(C, H, W) perturbation in [0,1] pixel units -> (H, W) per-pixel Euclidean length over channels."""
    if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3:
        raise InvalidInput("a perturbation must be a tensor (C, H, W)")
    return perturbation.detach().float().pow(2).sum(0).sqrt()


def _check(tau: float, beta: float) -> None:
    for name, value in (("tau", tau), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    if tau <= 0:
        raise InvalidInput(f"tau must be > 0 (the paper's relaxation parameter), got {tau}")
    if beta <= 1:
        raise InvalidInput(f"beta must be > 1 (the paper's boost), got {beta}")


def quartiles(magnitudes: Sequence[torch.Tensor]) -> tuple[float, float]:
    """q1 and q3 over every value of every map (linear interpolation)."""
    values = np.concatenate([m.detach().cpu().numpy().ravel() for m in magnitudes]).astype(np.float64)
    q1, q3 = np.percentile(values, [25, 75])
    return float(q1), float(q3)


def _threshold(magnitude: torch.Tensor, q1: float, q3: float, tau: float, beta: float) -> torch.Tensor:
    cut = q3 + (q3 - q1) * tau
    return torch.where(magnitude < cut, torch.zeros_like(magnitude), magnitude * beta)


def saliency_maps(perturbations: Sequence[torch.Tensor | None], tau: float = DEFAULT_TAU,
                  beta: float = DEFAULT_BETA) -> list[torch.Tensor | None]:
    """Batch mode (the paper): quartiles over all non-NIL perturbations, one (H, W) map each.

    perturbations: (C, H, W) tensors in [0,1] pixel units, or None (NIL) -> None in the output.

    >>> maps = saliency_maps([e.perturbation for e in explanations])   # doctest: +SKIP
    """
    _check(tau, beta)
    magnitudes = [None if p is None else pixel_magnitude(p) for p in perturbations]
    present = [m for m in magnitudes if m is not None]
    if not present:
        return [None] * len(magnitudes)
    q1, q3 = quartiles(present)
    return [None if m is None else _threshold(m, q1, q3, tau, beta) for m in magnitudes]


def saliency_map(perturbation: torch.Tensor, tau: float = DEFAULT_TAU, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Single mode: Algorithm 2 with the quartiles of this one perturbation. (C,H,W) -> (H,W) >= 0.

    >>> saliency_map(result.perturbation).shape   # doctest: +SKIP
    torch.Size([64, 64])
    """
    if perturbation is None:
        raise InvalidInput("no perturbation (the search failed): nothing to draw")
    _check(tau, beta)
    magnitude = pixel_magnitude(perturbation)
    q1, q3 = quartiles([magnitude])
    out = _threshold(magnitude, q1, q3, tau, beta)
    top = float(magnitude.max())
    if top > 0 and not bool((out > 0).any()):
        # The fence passed every change (see the module docstring): keep the largest ones.
        out = torch.where(magnitude >= top - TOP_TOLERANCE, magnitude * beta, torch.zeros_like(magnitude))
    return out
