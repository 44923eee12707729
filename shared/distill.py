"""Distillation: label local images with the black box's own answers, so a surrogate imitates it.

The paper motivates its surrogate by knowledge distillation (Hinton et al.) and then trains it on
the true labels only. Here the black box labels the user's local images instead: its probabilities
become soft targets when it returns them, its one-hot labels when it is label-only. Every image
sent costs one query; the total never exceeds the budget and is recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advexplain.shared.data import ImageSet
from advexplain.shared.errors import InvalidInput
from advexplain.shared.protocols import Classifier

HELD_BACK_SHARE = 0.2


@dataclass
class DistilledLabels:
    """Black-box answers for the training part and the held-back part of the local images."""

    train: ImageSet          # labels replaced by the black box's argmax
    targets: torch.Tensor    # (N_train, K) soft or one-hot targets from the black box
    held_back: ImageSet      # labels replaced by the black box's argmax, for the agreement figure
    queries: int
    soft: bool


def is_one_hot(probabilities: torch.Tensor) -> bool:
    return bool(((probabilities == 0) | (probabilities == 1)).all() and torch.all(probabilities.sum(1) == 1))


def query_labels(oracle: Classifier, images: ImageSet, batch_size: int = 64) -> torch.Tensor:
    """(N, K) probabilities from the oracle for every image, `batch_size` images a call."""
    out = [oracle.predict_proba(images.as_float(slice(s, s + batch_size))) for s in range(0, len(images), batch_size)]
    return torch.cat(out).float()


def distill_labels(oracle: Classifier, local: ImageSet, *, budget: int | None, seed: int,
                   held_back_share: float = HELD_BACK_SHARE, batch_size: int = 64) -> DistilledLabels:
    """Spend at most `budget` queries labelling `local` with the black box.

    When the budget is smaller than the local set, a seeded random `budget` of the images is used.
    A `held_back_share` of the labelled images is kept out of training to measure agreement.
    """
    if tuple(oracle.classes) != tuple(local.classes):
        raise InvalidInput(f"the black box's classes {tuple(oracle.classes)} differ from the data's {local.classes}")
    n = len(local) if budget is None else min(len(local), budget)
    if n < 4:
        raise InvalidInput(f"a distillation budget of {budget} queries is too small: need at least 4 images")
    order = torch.randperm(len(local), generator=torch.Generator().manual_seed(seed))[:n]
    n_held = max(1, int(round(n * held_back_share)))
    train_idx, held_idx = order[n_held:].sort().values, order[:n_held].sort().values
    chosen = local.subset(torch.cat([train_idx, held_idx]))
    probabilities = query_labels(oracle, chosen, batch_size=batch_size)
    answers = probabilities.argmax(1)
    n_train = len(train_idx)

    def relabel(part: ImageSet, labels: torch.Tensor) -> ImageSet:
        part.labels = labels.clone()
        part.description = {**part.description, "labels": "black-box answers"}
        return part

    return DistilledLabels(
        train=relabel(local.subset(train_idx), answers[:n_train]),
        targets=probabilities[:n_train],
        held_back=relabel(local.subset(held_idx), answers[n_train:]),
        queries=len(chosen),
        soft=not is_one_hot(probabilities),
    )
