"""In-process classifiers over a loaded network: the Classifier protocols without HTTP."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from advexplain.shared.checkpoints import Checkpoint, load_checkpoint
from advexplain.shared.models import PaperCNN


def fit_to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a [0,1] batch to (size, size) the way uploaded images are resized; no-op when it fits."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


class LocalClassifier:
    """A network as a DifferentiableClassifier that counts every image it classifies.

    `predict_proba` counts one query per image (thread-safe); `logits` is the gradient source and
    counts nothing. The network stays in eval mode and its parameters are never changed.

    >>> clf = LocalClassifier.from_checkpoint("models/blackbox")      # doctest: +SKIP
    >>> clf.predict_proba(torch.rand(2, 3, 64, 64)).shape             # doctest: +SKIP
    torch.Size([2, 2])
    """

    def __init__(self, model: PaperCNN, classes: tuple[str, ...], name: str = "local", label_only: bool = False):
        self.model = model.eval()
        self.classes = tuple(classes)
        self.name = name
        self.label_only = label_only
        self.image_size = model.config.image_size
        self._lock = threading.Lock()
        self._queries = 0

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", label_only: bool = False) -> "LocalClassifier":
        ckpt: Checkpoint = load_checkpoint(path, device=device)
        return cls(ckpt.model, ckpt.classes, name=str(path), label_only=label_only)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def queries(self) -> int:
        return self._queries

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0,1] -> (N, K) logits; autograd flows back to x."""
        return self.model(fit_to_size(x.to(self.device), self.image_size))

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
