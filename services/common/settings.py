"""What both services' settings share: the torch device and the checkpoint-folder check."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from advexplain.shared.checkpoints import CONFIG, WEIGHTS


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a checkpoint folder, or None when it is one."""
    missing = [name for name in (CONFIG, WEIGHTS) if not (path / name).is_file()]
    return f"{path} is not a checkpoint folder: {', '.join(missing)} missing" if missing else None


class ServiceSettings(BaseSettings):
    """Base of the services' settings: a validated torch device (`auto` picks CUDA when present)."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        if value.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {value} was asked for but torch sees no CUDA device")
            index = int(value.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {value}: only {torch.cuda.device_count()} CUDA device(s)")
        return value

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
