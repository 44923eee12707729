"""Several differentiable classifiers used as one gradient source (an ensemble of surrogates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain.base import logit_margin


class EnsembleSurrogate:
    """A DifferentiableClassifier over `members`; its gradients are the SUM of the members'.

    `loss_gradient(x, label)` (what the paper's line search uses) is the sum of each member's
    cross-entropy gradient, and `margin_and_gradient(x, label)` (what the margin search uses) the
    sum of each member's logit margin and its gradient, so an image the ensemble pushes past a
    margin m is pushed, on average, m / len(members) past each member. `logits` / `predict_proba`
    average the members' logits (a prediction, not an oracle: nothing is counted here).

    image: (C, H, W) float in [0, 1]; gradients come back with the same shape.

    >>> ens = EnsembleSurrogate([LocalClassifier.from_checkpoint(p) for p in paths])   # doctest: +SKIP
    >>> explain(x, label, ens, black_box)                                              # doctest: +SKIP
    """

    def __init__(self, members: Sequence):
        members = list(members)
        if not members:
            raise InvalidInput("an ensemble needs at least one member")
        classes = {tuple(getattr(m, "classes", ())) for m in members}
        if len(classes) != 1:
            raise InvalidInput("ensemble members disagree on the classes")
        self.members = members
        self.classes = classes.pop()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.logits(x) for m in self.members]).mean(0)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1).cpu()

    def _sum(self, image: torch.Tensor, label: int, objective) -> tuple[float, torch.Tensor]:
        total_value, total_grad = 0.0, torch.zeros_like(image)
        for member in self.members:
            x = image.detach().clone().unsqueeze(0).requires_grad_(True)
            with torch.enable_grad():
                value = objective(member.logits(x))
                (grad,) = torch.autograd.grad(value, x)
            total_value += float(value.detach())
            total_grad += grad[0].detach().to(image.device)
        return total_value, total_grad

    def loss_gradient(self, image: torch.Tensor, label: int) -> torch.Tensor:
        """Sum over members of d CE(member(image), label) / d image, (C, H, W)."""
        return self._sum(image, label, lambda z: F.cross_entropy(z, torch.tensor([label], device=z.device)))[1]

    def margin_and_gradient(self, image: torch.Tensor, label: int) -> tuple[float, torch.Tensor]:
        """Sum over members of the logit margin of `label` and of its gradient."""
        return self._sum(image, label, lambda z: logit_margin(z, label)[0])
