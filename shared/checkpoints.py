"""Checkpoints: a folder with `model.safetensors` (weights only) and `config.json` (everything else).

Nothing is ever unpickled. Loading checks the JSON against a strict schema, the weights' SHA-256
against the one recorded at save time, and every tensor name and shape against the architecture,
and fails with a CheckpointError that says which check failed.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from advexplain.shared.errors import CheckpointError
from advexplain.shared.models import ModelConfig, PaperCNN

FORMAT: Final = "advexplain-checkpoint"
FORMAT_VERSION: Final = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class TrainingRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int
    epochs: int
    batch_size: int
    lr: float
    device: str
    seconds: float
    augment: bool = False  # trained on shared.training.augment_batch views
    history: list[dict[str, Any]] = Field(default_factory=list)


class CheckpointMeta(BaseModel):
    """The schema of config.json."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["advexplain-checkpoint"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    kind: Literal["blackbox", "surrogate"]
    architecture: ModelConfig
    classes: tuple[str, ...]
    image_size: int
    data: dict[str, Any]
    training: TrainingRecord
    metrics: dict[str, float]
    distillation: dict[str, Any] | None = None
    versions: dict[str, str]
    created: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointMeta:
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.architecture.num_classes} outputs")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names repeat")
        if self.image_size != self.architecture.image_size:
            raise ValueError(
                f"image_size {self.image_size} differs from the architecture's {self.architecture.image_size}"
            )
        return self


class Checkpoint(BaseModel):
    """A loaded checkpoint: the network (eval mode) and its metadata."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: PaperCNN
    meta: CheckpointMeta
    path: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_checkpoint(
    out: str | Path,
    model: PaperCNN,
    *,
    kind: Literal["blackbox", "surrogate"],
    classes: tuple[str, ...],
    data: dict[str, Any],
    training: TrainingRecord,
    metrics: dict[str, float],
    distillation: dict[str, Any] | None = None,
) -> Path:
    """Write `out/model.safetensors` and `out/config.json`; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    meta = CheckpointMeta(
        kind=kind,
        architecture=model.config,
        classes=tuple(classes),
        image_size=model.config.image_size,
        data=data,
        training=training,
        metrics=metrics,
        distillation=distillation,
        versions=library_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        weights_sha256=_sha256(weights),
    )
    (out / CONFIG).write_text(meta.model_dump_json(indent=2) + "\n")
    return out


def read_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    config = path / CONFIG
    if not config.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG} is missing")
    try:
        return CheckpointMeta.model_validate_json(config.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise CheckpointError(f"{config} is invalid at {where}: {first['msg']}") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", expect_kind: str | None = None) -> Checkpoint:
    """Load and verify a checkpoint folder; the model comes back in eval mode on `device`."""
    path = Path(path)
    meta = read_meta(path)
    if expect_kind is not None and meta.kind != expect_kind:
        raise CheckpointError(f"{path} holds a {meta.kind} model, expected a {expect_kind}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {WEIGHTS} is missing")
    if _sha256(weights) != meta.weights_sha256:
        raise CheckpointError(
            f"{weights} does not match the SHA-256 recorded in {CONFIG}: the files do not belong together"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = PaperCNN(meta.architecture)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit the architecture in {CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights} does not fit the architecture in {CONFIG}: {name} has shape "
                f"{tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return Checkpoint(model=model, meta=meta, path=path)
