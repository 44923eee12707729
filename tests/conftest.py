"""Shared fixtures: one torch thread per test process, tiny seeded checkpoints, the faces setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TINY = {"image_size": 32, "width": 0.0625}


def train_tiny(kind: str, out: Path, *, epochs: int, fraction: float = 1.0, seed: int = 0) -> Path:
    """Train a tiny network on the built-in elpv data (seconds on one CPU thread) and save it."""
    from advexplain.shared.checkpoints import save_checkpoint
    from advexplain.shared.data import load_images, sample_fraction
    from advexplain.shared.models import ModelConfig
    from advexplain.shared.training import channel_stats, train_model

    train_set = load_images("elpv", "train", TINY["image_size"], progress=False)
    val_set = load_images("elpv", "validation", TINY["image_size"], progress=False)
    if fraction < 1.0:
        train_set = sample_fraction(train_set, fraction, seed=seed)
    mean, std = channel_stats(train_set)
    config = ModelConfig(architecture=kind, image_size=TINY["image_size"], width=TINY["width"], mean=mean, std=std)
    result = train_model(config, train_set, val_set, epochs=epochs, seed=seed, progress=False)
    save_checkpoint(out, result.model, kind=kind, classes=train_set.classes, data={"spec": "elpv"},
                    training=result.record, metrics={"val_accuracy": result.val_accuracy})
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny black box and a tiny surrogate (10% of the data), trained once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "blackbox": train_tiny("blackbox", root / "blackbox", epochs=3),
        "surrogate": train_tiny("surrogate", root / "surrogate", epochs=8, fraction=0.1),
    }


@pytest.fixture(scope="session")
def faces_root() -> Path:
    """The real gender-faces data set, from ADVEXPLAIN_FACES (set by .ci/run)."""
    value = os.environ.get("ADVEXPLAIN_FACES")
    if not value:
        pytest.skip(
            "ADVEXPLAIN_FACES is not set: point it at ../shared/datasets/gender-faces to run the real-faces tests"
        )
    root = Path(value)
    assert root.is_dir(), f"ADVEXPLAIN_FACES={value} is not a folder"
    return root
