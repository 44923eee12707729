"""What the explanation engine needs from a model: predictions only, or predictions and gradients.

Every tensor that crosses these interfaces is a float image batch (N, C, H, W) in [0, 1] at any
size (the user's photo); normalisation and resizing to a model's input size happen behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Classifier(Protocol):
    """All a black box promises: class probabilities for images. Each image counts one query."""

    classes: tuple[str, ...]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float in [0, 1] -> (N, K) probabilities (one-hot for a label-only box)."""
        ...


@runtime_checkable
class DifferentiableClassifier(Classifier, Protocol):
    """A classifier whose logits can be differentiated (the white box, or a surrogate)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float in [0, 1] -> (N, K) logits, with autograd enabled."""
        ...


@runtime_checkable
class GradientSource(Protocol):
    """What the search methods differentiate: one model (white box or surrogate) or an ensemble.

    Both objectives are differentiable functions of a batch x: (N, C, H, W) float in [0, 1], at any
    size (each model resizes to its own input inside the graph), returning (N,) values.
    """

    classes: tuple[str, ...]

    def margin(self, x: torch.Tensor, goal: int) -> torch.Tensor:
        """(N,) logit of `goal` minus the largest other logit (> 0: the source predicts `goal`)."""
        ...

    def loss(self, x: torch.Tensor, label: int) -> torch.Tensor:
        """(N,) cross-entropy of `label` (the paper's objective)."""
        ...

    def modules(self) -> Sequence[nn.Module]:
        """The networks behind the source, so a search can freeze them and restore them afterwards."""
        ...
