"""Checkpoints: identical logits after a round trip; tampering and mismatches are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from advexplain.shared.checkpoints import TrainingRecord, load_checkpoint, read_meta, save_checkpoint
from advexplain.shared.errors import CheckpointError
from advexplain.shared.models import ModelConfig, PaperCNN


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(3)
    model = PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.0625)).eval()
    record = TrainingRecord(seed=3, epochs=0, batch_size=64, lr=1e-3, device="cpu", seconds=0.0)
    return save_checkpoint(tmp_path / "ckpt", model, kind="surrogate", classes=("cat", "dog"), data={"spec": "test"},
                           training=record, metrics={"val_accuracy": 0.5})


def test_round_trip_gives_identical_logits(checkpoint: Path):
    first = load_checkpoint(checkpoint)
    second = load_checkpoint(checkpoint, expect_kind="surrogate")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
    assert not first.model.training
    assert first.classes == ("cat", "dog")
    meta = json.loads((checkpoint / "config.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["architecture"]["width"] == 0.0625


def edit_config(path: Path, change) -> None:
    meta = json.loads((path / "config.json").read_text())
    change(meta)
    (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["architecture"].update(width=0.125), "does not fit the architecture"),
        (lambda m: m.update(classes=["cat", "dog", "bird"]), "class names"),
        (lambda m: m.update(image_size=64), "image_size"),
        (lambda m: m.update(kind="resnet"), "kind"),
        (lambda m: m.update(extra_field=1), "extra_field"),
        (lambda m: m.update(weights_sha256="0" * 64), "SHA-256"),
        (lambda m: m.pop("architecture"), "architecture"),
    ],
)
def test_tampered_config_is_refused(checkpoint: Path, change, message):
    edit_config(checkpoint, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint)


def test_swapped_weights_are_refused(checkpoint: Path, tmp_path: Path):
    state = load_file(str(checkpoint / "model.safetensors"))
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(checkpoint)


def test_missing_and_broken_files(checkpoint: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid"):
        read_meta(broken)
    with pytest.raises(CheckpointError, match="holds a surrogate"):
        load_checkpoint(checkpoint, expect_kind="blackbox")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(checkpoint)


def test_pickle_is_never_loaded(checkpoint: Path):
    """A pickle dropped in as weights is rejected by the hash before anything parses it."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (checkpoint / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint)
