"""Training: a few CPU steps lower the loss, seeds reproduce weights, collapse is caught."""

from __future__ import annotations

import subprocess
import sys
import json
from pathlib import Path

import pytest
import torch

from advexplain.shared.data import ImageSet
from advexplain.shared.errors import TrainingCollapsed
from advexplain.shared.models import ModelConfig
from advexplain.shared.training import check_collapse, train_model


def toy_set(n: int = 64, seed: int = 0) -> ImageSet:
    """Bright images are class 1, dark ones class 0: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 180, 60)
    noise = torch.randint(-40, 40, (n, 3, 16, 16), generator=g)
    return ImageSet(images=(base + noise).clamp(0, 255).to(torch.uint8), labels=labels, classes=("dark", "bright"),
                    description={"source": "toy"})


CONFIG = ModelConfig(architecture="surrogate", image_size=16, width=0.0625)


def test_a_few_steps_lower_the_loss():
    data = toy_set()
    result = train_model(CONFIG, data, data, epochs=6, batch_size=8, seed=0, progress=False)
    losses = [h["loss"] for h in result.record.history]
    assert losses[-1] < losses[0]
    assert result.val_accuracy > 0.9


def test_same_seed_same_weights():
    data = toy_set()
    a = train_model(CONFIG, data, data, epochs=1, batch_size=16, seed=7, progress=False, check=False).model
    b = train_model(CONFIG, data, data, epochs=1, batch_size=16, seed=7, progress=False, check=False).model
    c = train_model(CONFIG, data, data, epochs=1, batch_size=16, seed=8, progress=False, check=False).model
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_collapse_is_detected():
    labels = torch.tensor([0, 1] * 50)
    with pytest.raises(TrainingCollapsed, match="constant predictor"):
        check_collapse(torch.zeros(100, dtype=torch.int64), labels, ("a", "b"))
    check_collapse(labels.clone(), labels, ("a", "b"))
    # a data set that really is one class is not a collapse
    check_collapse(torch.zeros(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64), ("a", "b"))


def test_collapsed_training_saves_nothing(tmp_path: Path):
    """lr so high the network diverges to one class: the CLI says so and writes no checkpoint."""
    out = tmp_path / "bb"
    proc = subprocess.run(
        [sys.executable, "-m", "advexplain", "--threads", "1", "train", "surrogate", "--data", "elpv", "--epochs", "1",
         "--image-size", "32", "--width", "0.0625", "--lr", "50", "--fraction", "0.2", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "collapsed" in proc.stderr
    assert not (out / "model.safetensors").exists()


def test_cli_trains_and_stores_accuracy(tmp_path: Path):
    out = tmp_path / "sur"
    proc = subprocess.run(
        [sys.executable, "-m", "advexplain", "--threads", "1", "train", "surrogate", "--data", "elpv", "--epochs", "3",
         "--batch-size", "16", "--image-size", "32", "--width", "0.0625", "--seed", "1", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "surrogate" and meta["training"]["epochs"] == 3 and meta["training"]["seed"] == 1
    assert meta["data"]["fraction"] == 0.1 and meta["data"]["train_images"] == 210
    assert 0.5 < meta["metrics"]["val_accuracy"] <= 1.0
    assert f"validation accuracy {meta['metrics']['val_accuracy']:.4f}" in proc.stdout
