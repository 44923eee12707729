"""Distilled surrogates: labels come from the black box, the budget holds, the checkpoint records it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advexplain.shared.data import ImageSet
from advexplain.shared.distill import distill_labels, is_one_hot
from advexplain.shared.errors import InvalidInput
from advexplain.shared.models import ModelConfig
from advexplain.shared.training import train_model
from tests.commands import distill_surrogate


class BrightnessBox:
    """A black box that calls bright images class 1 and dark ones class 0, and counts queries."""

    classes = ("dark", "bright")

    def __init__(self, label_only: bool = False):
        self.queries = 0
        self.label_only = label_only

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        p_bright = torch.sigmoid((x.mean(dim=(1, 2, 3)) - 0.5) * 20)
        probs = torch.stack([1 - p_bright, p_bright], 1)
        if self.label_only:
            probs = torch.nn.functional.one_hot(probs.argmax(1), 2).float()
        return probs


def lying_folder(n: int = 80) -> ImageSet:
    """Bright/dark images whose folder labels are the opposite of what the black box answers."""
    g = torch.Generator().manual_seed(0)
    bright = torch.arange(n) % 2
    base = torch.where(bright.view(-1, 1, 1, 1) == 1, 200, 50)
    images = (base + torch.randint(-30, 30, (n, 3, 16, 16), generator=g)).clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, labels=1 - bright, classes=("dark", "bright"), description={"source": "toy"},
                    paths=[str(i) for i in range(n)])


def test_labels_come_from_the_black_box_not_the_folders():
    local = lying_folder()
    box = BrightnessBox()
    labelled = distill_labels(box, local, budget=None, seed=0)
    truth_by_path = dict(zip(local.paths, local.labels.tolist()))
    for part in (labelled.train, labelled.held_back):
        folder = torch.tensor([truth_by_path[p] for p in part.paths])
        assert torch.equal(part.labels, 1 - folder), "every label must be the black box's answer"
    assert labelled.soft and not is_one_hot(labelled.targets)
    assert labelled.queries == box.queries == len(local)
    assert len(labelled.held_back) == 16 and len(labelled.train) == 64


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(4, 120), label_only=st.booleans(), seed=st.integers(0, 5))
def test_budget_is_never_exceeded(budget, label_only, seed):
    box = BrightnessBox(label_only=label_only)
    labelled = distill_labels(box, lying_folder(), budget=budget, seed=seed)
    assert box.queries == labelled.queries <= budget
    assert labelled.soft is (not label_only)
    assert set(labelled.train.paths).isdisjoint(labelled.held_back.paths)


def test_tiny_budget_and_wrong_classes_are_refused():
    with pytest.raises(InvalidInput, match="too small"):
        distill_labels(BrightnessBox(), lying_folder(), budget=3, seed=0)
    other = lying_folder()
    other.classes = ("cat", "dog")
    with pytest.raises(InvalidInput, match="classes"):
        distill_labels(BrightnessBox(), other, budget=None, seed=0)


@pytest.mark.parametrize("label_only", [False, True])
def test_soft_and_hard_targets_both_train(label_only):
    local = lying_folder(96)
    labelled = distill_labels(BrightnessBox(label_only=label_only), local, budget=None, seed=0)
    config = ModelConfig(architecture="surrogate", image_size=16, width=0.0625)
    result = train_model(config, labelled.train, labelled.held_back, epochs=6, batch_size=8, seed=0,
                         targets=labelled.targets, progress=False)
    losses = [h["loss"] for h in result.record.history]
    assert losses[-1] < losses[0]
    assert result.val_accuracy >= 0.9, "the surrogate learns the black box's answers, not the folder labels"


def test_cli_records_distillation(tiny_models, tmp_path: Path):
    out = tmp_path / "distilled"
    proc = subprocess.run(
        distill_surrogate(str(tiny_models["blackbox"]), out, "--distill-label-only"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "config.json").read_text())
    d = meta["distillation"]
    assert d["queries"] == 150 <= d["budget"] == 150
    assert d["targets"] == "hard" and d["train_images"] + d["held_back_images"] == 150
    assert d["source"].startswith("checkpoint:") and "label-only" in d["source"]
    assert 0.0 <= d["agreement"] <= 1.0 and meta["metrics"]["blackbox_agreement"] == d["agreement"]
    assert "150 black-box queries" in proc.stdout
