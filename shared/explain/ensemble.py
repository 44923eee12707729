"""Several surrogates used as one gradient source (an ensemble)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain.margin import input_side, trained_on_grey
from advexplain.shared.protocols import DifferentiableClassifier, GradientSource


class Member(DifferentiableClassifier, GradientSource, Protocol):
    """One model of an ensemble: both objectives, and logits for the averaged prediction."""


class EnsembleSurrogate:
    """A GradientSource over `members` whose objectives are the SUM of the members'.

    `margin(x, goal)` is the sum of each member's logit margin (what the margin search climbs) and
    `loss(x, label)` the sum of their cross-entropies (the paper's line search), so gradients are
    the sums of the members' gradients, and an image the ensemble pushes past a margin m is pushed,
    on average, m / len(members) past each member. `predict_proba` averages the members' logits
    (a prediction for reports, not an oracle: nothing is counted here).

    >>> ens = EnsembleSurrogate([LocalClassifier.from_checkpoint(p) for p in paths])   # doctest: +SKIP
    >>> explain(x, label, ens, black_box)                                              # doctest: +SKIP
    """

    def __init__(self, members: Sequence[Member]) -> None:
        members = list(members)
        if not members:
            raise InvalidInput("an ensemble needs at least one member")
        classes = {tuple(m.classes) for m in members}
        if len(classes) != 1:
            raise InvalidInput("ensemble members disagree on the classes")
        self.members = members
        self.classes = classes.pop()
        sides = [input_side(m) for m in members]
        # The largest input any member resizes to (None when a member does not say).
        self.image_size: int | None = None if None in sides else max(n for n in sides if n is not None)
        self.trained_on_grey = all(trained_on_grey(m) for m in members)

    def margin(self, x: torch.Tensor, goal: int) -> torch.Tensor:
        return torch.stack([m.margin(x, goal) for m in self.members]).sum(0)

    def loss(self, x: torch.Tensor, label: int) -> torch.Tensor:
        return torch.stack([m.loss(x, label) for m in self.members]).sum(0)

    def modules(self) -> list[nn.Module]:
        return [module for member in self.members for module in member.modules()]

    def tuned_copy(self) -> EnsembleSurrogate | None:
        """An ensemble of the members' `tuned_copy`s (None unless every member has one)."""
        copies: list[Member] = []
        for member in self.members:
            copy_for_tuning = getattr(member, "tuned_copy", None)
            tuned = copy_for_tuning() if copy_for_tuning is not None else None
            if tuned is None:
                return None
            copies.append(tuned)
        return EnsembleSurrogate(copies)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.stack([m.logits(x) for m in self.members]).mean(0), dim=1).cpu()
