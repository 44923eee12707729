"""The one place where [0, 1] float images meet 8-bit pixels: rounding, uint8 arrays and PNG bytes.

Every image the explainer sends to a black box, returns to a user or draws goes through here, so
"the 8-bit image the box judged" and "the PNG the user gets" are the same pixels by construction.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

LEVELS = 255
QUANTUM = 1.0 / LEVELS


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] float image (any shape) to the 8-bit grid: exactly what a PNG of it holds.

    >>> quantise(torch.tensor([0.5, 1.2, -0.1]))
    tensor([0.5020, 1.0000, 0.0000])
    """
    return image.clamp(0, 1).mul(LEVELS).round().div(LEVELS)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1], C = 1 or 3 -> (H, W, 3) uint8, rounded as `quantise` rounds."""
    arr = image.detach().to("cpu", torch.float32).clamp(0, 1).mul(LEVELS).round().to(torch.uint8).numpy()
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return np.ascontiguousarray(arr[:3].transpose(1, 2, 0))


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1] (exactly on the 8-bit grid)."""
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), copy=True)).float().div_(LEVELS)


def encode_png(image: torch.Tensor | np.ndarray, compress_level: int = 1) -> bytes:
    """A (C, H, W) float image in [0, 1] or an (H, W, 3) uint8 array -> lossless 8-bit RGB PNG bytes."""
    array = to_uint8(image) if isinstance(image, torch.Tensor) else image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
