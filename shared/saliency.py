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

What the map is of (`explanation_saliency`, the services' `saliency` field): `change`, the
perturbation's magnitude above (the paper's map), or `detail`, the default of the margin methods:
per pixel, the positive part of the change's dot product with the photo's detail, blur(photo) -
photo (`detail_alignment`). A change drawn smooth, so that it survives a box's resizing, ranks
another photo's pixels about as well as its own; its alignment with the photo's own detail does
not. On the third-party benchmark box's first 90 training mistakes (bench/native_resolution.py
--detail-maps, tuning_maps_detail_train_thirdparty.json) the deletion AUC (lower is better) of
`ours . detail` was 0.4349 against 0.6096 for the change's magnitude and 0.5520 for Captum's best
map on the box's own network, and 0.6285 with the next photo's change on the same detail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from advexplain.shared.errors import InvalidInput

DEFAULT_TAU = 0.5
DEFAULT_BETA = 2.0
# Single mode's fallback keeps the changes within this much of the largest (half an 8-bit level).
TOP_TOLERANCE = 0.5 / 255
# What a served map shows: the change's magnitude (the paper's Algorithm 2) or its alignment with the
# photo's detail (the default of the margin methods).
CHANGE, DETAIL = "change", "detail"
SALIENCY_SOURCES = (DETAIL, CHANGE)
# The detail map's blur: the "removed" baseline of the deletion benchmark (bench/native_resolution.py).
DETAIL_SIGMA = 5.0
DETAIL_KERNEL = 11
# A detail map whose largest score is below this (half an 8-bit level of change against half a level of
# detail) has nothing to show (float rounding of a flat photo's blur): the change's map is served instead.
DETAIL_FLOOR = (0.5 / 255) ** 2


def pixel_magnitude(perturbation: torch.Tensor) -> torch.Tensor:
    """(C, H, W) perturbation in [0,1] pixel units -> (H, W) per-pixel Euclidean length over channels."""
    if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3:
        raise InvalidInput("a perturbation must be a tensor (C, H, W)")
    return perturbation.detach().float().pow(2).sum(0).sqrt()


def photo_detail(photo: torch.Tensor) -> torch.Tensor:
    """(C, H, W) photo in [0, 1] -> its fine detail, blur(photo) - photo: how each pixel moves when its
    detail is taken away (Gaussian blur, sigma DETAIL_SIGMA pixels, kernel 11, reflect padding; the
    kernel shrinks on photos under 6 pixels a side so that the padding fits)."""
    if not isinstance(photo, torch.Tensor) or photo.ndim != 3:
        raise InvalidInput("a photo must be a tensor (C, H, W)")
    photo = photo.detach().float()
    kernel = min(DETAIL_KERNEL, 2 * min(photo.shape[-2:]) - 1)
    blurred: torch.Tensor = gaussian_blur(photo, kernel_size=[kernel, kernel], sigma=[DETAIL_SIGMA, DETAIL_SIGMA])
    return blurred - photo


def detail_alignment(perturbation: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """(C, H, W) change and (C, H, W) photo -> (H, W) >= 0: per pixel, the positive part of the change's
    dot product over channels with the photo's detail (`photo_detail`). Taking away a pixel's detail
    moves it by that detail; where this moves it the way the change that fixes the mistake does, the
    detail is evidence for the mistake, and the product is the first-order share of the fix its
    removal makes (gradient x (baseline - input), with the change in place of a gradient)."""
    if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3:
        raise InvalidInput("a perturbation must be a tensor (C, H, W)")
    detail = photo_detail(photo)
    if detail.shape != perturbation.shape:
        raise InvalidInput(f"change {tuple(perturbation.shape)} and photo {tuple(detail.shape)} differ in shape")
    return (perturbation.detach().float() * detail).sum(0).clamp(min=0)


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


def fence_map(score: torch.Tensor, tau: float = DEFAULT_TAU, beta: float = DEFAULT_BETA,
              tolerance: float = TOP_TOLERANCE) -> torch.Tensor:
    """Single mode of Algorithm 2 on any (H, W) per-pixel score >= 0: zero below q3 + tau * iqr of this
    one map, `beta` times the score above. If the fence passes every pixel (see the module docstring),
    the scores within `tolerance` of the largest are kept instead."""
    _check(tau, beta)
    q1, q3 = quartiles([score])
    out = _threshold(score, q1, q3, tau, beta)
    top = float(score.max())
    if top > 0 and not bool((out > 0).any()):
        out = torch.where(score >= top - tolerance, score * beta, torch.zeros_like(score))
    return out


def saliency_map(perturbation: torch.Tensor, tau: float = DEFAULT_TAU, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Single mode: Algorithm 2 with the quartiles of this one perturbation. (C,H,W) -> (H,W) >= 0.

    >>> saliency_map(result.perturbation).shape   # doctest: +SKIP
    torch.Size([64, 64])
    """
    if perturbation is None:
        raise InvalidInput("no perturbation (the search failed): nothing to draw")
    return fence_map(pixel_magnitude(perturbation), tau, beta)


def default_saliency(method: str) -> str:
    """The map a method draws unless asked: the paper's own (`change`) for `paper`, `detail` otherwise."""
    return CHANGE if method == "paper" else DETAIL


def explanation_saliency(perturbation: torch.Tensor, photo: torch.Tensor, source: str,
                         tau: float = DEFAULT_TAU, beta: float = DEFAULT_BETA) -> tuple[torch.Tensor, str]:
    """The served map and what it shows: Algorithm 2 (single mode) on the change's magnitude
    (`change`, the paper's map) or on the change's alignment with the photo's detail (`detail`,
    `detail_alignment`). A `detail` map with nothing above DETAIL_FLOOR (a flat photo has no detail, or
    the change moves every pixel against it) falls back to the change's map, and says so."""
    if source not in SALIENCY_SOURCES:
        raise InvalidInput(f"saliency must be one of {', '.join(SALIENCY_SOURCES)}, got {source!r}")
    if perturbation is None:
        raise InvalidInput("no perturbation (the search failed): nothing to draw")
    if source == DETAIL:
        score = detail_alignment(perturbation, photo)
        if float(score.max()) > DETAIL_FLOOR:
            return fence_map(score, tau, beta, tolerance=0.0), DETAIL
    return saliency_map(perturbation, tau, beta), CHANGE
