"""Which torch device a name means, checked before anything loads: auto (CUDA when present), cpu, cuda, cuda:N."""

from __future__ import annotations

import re

import torch

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def pick_device(name: str = "auto") -> torch.device:
    """The torch device `name` means; `auto` is CUDA when torch sees one, else the CPU.

    Raises ValueError for a name that is not auto, cpu, cuda or cuda:N, or a CUDA device that is
    not there, so settings validators and command lines fail before a model loads.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} was asked for but torch sees no CUDA device")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)
