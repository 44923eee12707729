"""In-process classifiers over a loaded network: the Classifier protocols without HTTP."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from advexplain.shared.checkpoints import Checkpoint, load_checkpoint
from advexplain.shared.data import served_input
from advexplain.shared.models import PaperCNN, fold_batchnorm


def fit_to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a [0,1] batch of any size to (size, size) the way training images were resized
    (bilinear, antialiased, aspect ratio not kept); differentiable; a no-op when it already fits."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def logit_margin(logits: torch.Tensor, goal: int) -> torch.Tensor:
    """(N, K) logits -> (N,) logit of `goal` minus the largest other logit."""
    others = logits.masked_fill(F.one_hot(torch.tensor(goal, device=logits.device), logits.shape[1]).bool(),
                                float("-inf"))
    return logits[:, goal] - others.max(dim=1).values


class LocalClassifier:
    """A network as a Classifier, DifferentiableClassifier and GradientSource, counting what it classifies.

    `predict_proba` counts one query per image (thread-safe); `logits`, `margin` and `loss` are the
    gradient source and count nothing. Images of any size are resized to the network's input
    inside the graph. The network stays in eval mode and its parameters are never changed.

    >>> clf = LocalClassifier.from_checkpoint("models/blackbox")      # doctest: +SKIP
    >>> clf.predict_proba(torch.rand(2, 3, 80, 105)).shape            # doctest: +SKIP
    torch.Size([2, 2])
    """

    def __init__(self, model: PaperCNN, classes: Sequence[str], label_only: bool = False,
                 served_inputs: bool = False) -> None:
        self.model = model.eval()
        self.classes = tuple(classes)
        self.label_only = label_only
        # The network sees what our black box service would feed it (8-bit images resized as uint8,
        # `served_input`), so an oracle in-process answers exactly as the served model, and a white
        # box's margins are the served model's margins.
        self.served_inputs = served_inputs
        self.image_size = model.config.image_size
        # Trained on grey images: the per-channel statistics it normalises with are all equal.
        self.trained_on_grey = len(set(model.config.mean)) == 1 and len(set(model.config.std)) == 1
        self._lock = threading.Lock()
        self._queries = 0
        self._frozen = False

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", label_only: bool = False,
                        served_inputs: bool = False) -> LocalClassifier:
        ckpt: Checkpoint = load_checkpoint(path, device=device)
        return cls(ckpt.model, ckpt.classes, label_only=label_only, served_inputs=served_inputs)

    def freeze(self, fold: bool = True) -> LocalClassifier:
        """Freeze the network for good (a served network: eval mode, input gradients only); idempotent
        (the first call decides whether it is folded).

        The parameters stop requiring gradients, so concurrent searches' `no_side_effects` save and
        restore the same flags and cannot race. With `fold` (for gradient sources: the surrogates)
        the network becomes a copy with its BatchNorms folded into the convs (`fold_batchnorm`: the
        same function up to float rounding) and, on the CPU, channels-last weights; together about
        1.5x faster per forward and input-gradient pass on the CPU defaults
        (bench/results/frozen_network.json). Other wrappers of the original network keep it.
        Without `fold` (a network that is also the oracle, as the white box is) it computes exactly
        what the served model computes: a rounding-size difference would turn a white-box success
        at its 1e-3 margin into an image the served model still gets wrong (for the same reason
        such an oracle is built with `served_inputs`, so its input is resized as the service does).
        """
        if self._frozen:
            return self
        model: nn.Module = self.model.eval()
        if fold:
            model = fold_batchnorm(model)
            if self.device.type == "cpu":
                model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model  # type: ignore[assignment]
        self._frozen = True
        return self

    def tuned_copy(self) -> LocalClassifier:
        """A copy with its own network, for a search to fine-tune; counts nothing."""
        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model)
        clone._lock = threading.Lock()
        clone._queries = 0
        return clone

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def queries(self) -> int:
        return self._queries

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0,1] -> (N, K) logits; autograd flows back to x. With `served_inputs`
        the values are those of the served model's input (`served_input`) and the gradient that of
        the float resize (straight through the service's rounding)."""
        v = fit_to_size(x.to(self.device), self.image_size)
        if self.served_inputs:
            v = v + (served_input(x, self.image_size).to(v.device, v.dtype) - v).detach()
        logits: torch.Tensor = self.model(v)
        return logits

    def margin(self, x: torch.Tensor, goal: int) -> torch.Tensor:
        return logit_margin(self.logits(x), goal)

    def loss(self, x: torch.Tensor, label: int) -> torch.Tensor:
        logits = self.logits(x)
        return F.cross_entropy(logits, torch.full((logits.shape[0],), label, device=logits.device), reduction="none")

    def modules(self) -> list[nn.Module]:
        return [self.model]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0,1] -> (N, K) probabilities on the CPU; counts N queries."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
        with self._lock:
            self._queries += int(x.shape[0])
        probs = torch.softmax(self.logits(x), dim=1).cpu()
        if self.label_only:
            probs = F.one_hot(probs.argmax(1), len(self.classes)).float()
        return probs
