"""Command lines the tests run as real processes, written once."""

from __future__ import annotations

import sys
from pathlib import Path


def distill_surrogate(source: str, out: Path, *extra: str) -> list[str]:
    """`advexplain train surrogate` at test size (elpv, 32x32, width 0.0625, 8 epochs), its labels
    bought from `source` (a black-box URL or checkpoint) with a 150-query budget."""
    return [sys.executable, "-m", "advexplain", "--threads", "1", "train", "surrogate", "--data", "elpv",
            "--epochs", "8", "--batch-size", "8", "--image-size", "32", "--width", "0.0625",
            "--distill-from", source, "--distill-budget", "150", *extra, "--out", str(out), "--quiet"]
