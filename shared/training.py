"""Train and evaluate the paper's CNNs: seeded, deterministic per device, with a collapse check."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from advexplain.shared.checkpoints import TrainingRecord
from advexplain.shared.data import ImageSet
from advexplain.shared.errors import TrainingCollapsed
from advexplain.shared.models import ModelConfig, PaperCNN, build_model

# A network is "collapsed" when one class takes at least this share of validation predictions
# while that class is not nearly as common in the labels.
COLLAPSE_SHARE = 0.98


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def channel_stats(images: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the [0,1] training images (std floored to avoid dividing by ~0)."""
    x = images.images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-2)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


@torch.no_grad()
def predict(model: torch.nn.Module, images: ImageSet, batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Predicted class index for every image, (N,) int64 on the CPU. Restores the model's mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images.as_float(slice(start, start + batch_size)).to(device)
        out.append(model(x).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: torch.nn.Module, images: ImageSet, device: torch.device | None = None) -> float:
    return float((predict(model, images, device=device) == images.labels).float().mean())


def check_collapse(predictions: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> None:
    """Raise TrainingCollapsed when the network predicts essentially one class for everything."""
    counts = torch.bincount(predictions, minlength=len(classes))
    top = int(counts.argmax())
    share = float(counts[top]) / max(1, len(predictions))
    label_share = float((labels == top).float().mean())
    if share >= COLLAPSE_SHARE and label_share < COLLAPSE_SHARE:
        raise TrainingCollapsed(
            f"training collapsed to a constant predictor: {share:.1%} of validation images are predicted "
            f"'{classes[top]}' (its true share is {label_share:.1%}). Nothing was saved. Try another --seed, "
            "a larger --width, or a lower --lr.",
            predicted_share=share,
        )


@dataclass
class TrainResult:
    model: PaperCNN
    record: TrainingRecord
    val_accuracy: float
    train_accuracy: float


def train_model(
    config: ModelConfig,
    train_set: ImageSet,
    val_set: ImageSet,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    targets: torch.Tensor | None = None,
    progress: bool = True,
    check: bool = True,
) -> TrainResult:
    """Adam + cross-entropy, as in the paper. Same seed and device give the same weights.

    targets: optional (N, K) probabilities per training image (soft labels, for distillation);
    by default the folder labels are the targets. Raises TrainingCollapsed when `check` is on
    and the trained network predicts one class for nearly all validation images.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(config).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    started = time.perf_counter()
    n = len(train_set)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(0, n, batch_size), desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False)
        for start in bar:
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples; drop a lone leftover image this epoch
                continue
            x = train_set.as_float(idx).to(device)
            y = train_set.labels[idx].to(device)
            logits = model(x)
            if targets is None:
                loss = F.cross_entropy(logits, y)
            else:
                loss = F.cross_entropy(logits, targets[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        val_acc = accuracy(model, val_set, device=device)
        entry = {"epoch": epoch, "loss": round(total_loss / max(seen, 1), 6),
                 "train_accuracy": round(correct / max(seen, 1), 6), "val_accuracy": round(val_acc, 6)}
        history.append(entry)
        if progress:
            tqdm.write(f"epoch {epoch}/{epochs}  loss {entry['loss']:.4f}  train acc {entry['train_accuracy']:.3f}  "
                       f"val acc {val_acc:.3f}")
    seconds = time.perf_counter() - started
    model.eval()
    if check:
        check_collapse(predict(model, val_set, device=device), val_set.labels, val_set.classes)
    record = TrainingRecord(seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, device=str(device),
                            seconds=round(seconds, 2), history=history)
    return TrainResult(model=model, record=record, val_accuracy=history[-1]["val_accuracy"] if history else accuracy(model, val_set, device),
                       train_accuracy=history[-1]["train_accuracy"] if history else 0.0)
