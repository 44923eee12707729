"""What the explanation engine needs from a model: predictions only, or predictions and gradients.

Every tensor that crosses these interfaces is a float image batch (N, C, H, W) in [0, 1];
normalisation and resizing to the model's input size happen behind them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


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
