"""Tiny four-class checkpoints on the built-in elpv4 view, for tests of `target` beyond two classes.

Trained like tests/conftest.py's `train_tiny` (32x32, width 0.0625, seconds on one CPU thread);
the black box reaches about 0.68 validation accuracy and predicts more than one class.
"""

from __future__ import annotations

from pathlib import Path

SIZE, WIDTH = 32, 0.0625


def train_tiny4(kind: str, out: Path, *, epochs: int, fraction: float = 1.0, seed: int = 0) -> Path:
    """Train a tiny four-class network on elpv4 and save it as a checkpoint folder."""
    from advexplain.shared.checkpoints import save_checkpoint
    from advexplain.shared.data import ELPV4, load_images, sample_fraction
    from advexplain.shared.models import ModelConfig
    from advexplain.shared.training import channel_stats, train_model

    train_set = load_images(ELPV4, "train", SIZE, progress=False)
    val_set = load_images(ELPV4, "validation", SIZE, progress=False)
    if fraction < 1.0:
        train_set = sample_fraction(train_set, fraction, seed=seed)
    mean, std = channel_stats(train_set)
    config = ModelConfig(architecture=kind, image_size=SIZE, width=WIDTH, num_classes=len(train_set.classes),
                         mean=mean, std=std)
    result = train_model(config, train_set, val_set, epochs=epochs, seed=seed, progress=False)
    save_checkpoint(out, result.model, kind=kind, classes=train_set.classes, data={"spec": ELPV4},
                    training=result.record, metrics={"val_accuracy": result.val_accuracy})
    return out


def tiny4_models(root: Path) -> dict[str, Path]:
    """A tiny elpv4 black box and surrogate (10% of the training split) under `root`."""
    return {
        "blackbox": train_tiny4("blackbox", root / "blackbox4", epochs=3),
        "surrogate": train_tiny4("surrogate", root / "surrogate4", epochs=8, fraction=0.1),
    }
