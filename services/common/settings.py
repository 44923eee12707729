"""What both services' settings share: the torch device, the checkpoint-folder check, the usable cores."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from advexplain.shared.checkpoints import CONFIG, WEIGHTS
from advexplain.shared.devices import pick_device


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a checkpoint folder, or None when it is one."""
    missing = [name for name in (CONFIG, WEIGHTS) if not (path / name).is_file()]
    return f"{path} is not a checkpoint folder: {', '.join(missing)} missing" if missing else None


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, Kubernetes limits)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        try:  # cgroup v1
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = limit / period if limit > 0 and period > 0 else None
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


class ServiceSettings(BaseSettings):
    """Base of the services' settings: a validated torch device (`auto` picks CUDA when present)."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        pick_device(value)  # its ValueError becomes the validation error
        return value

    @property
    def torch_device(self) -> torch.device:
        return pick_device(self.device)
