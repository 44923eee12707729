"""Encoded image bytes -> [0, 1] tensors, with the size checks done before any pixel is decoded.

Two ways in: `decode_image` resizes to a model's square input (what a black box does with an
upload), `decode_photo` keeps the photo at its own size (what the explainer explains), downscaling
only a photo whose longer side is over `max_side`, once, keeping its aspect ratio.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from advexplain.shared.data import load_pil_rgb, resize_transform
from advexplain.shared.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from advexplain.shared.pixels import from_uint8

# Pillow's format names for what the services accept; only the first frame of a GIF is used.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def check_image_header(data: bytes, max_pixels: int, name: str = "image") -> tuple[str, tuple[int, int]]:
    """Identify the format and size from the header alone (Pillow opens lazily); nothing is decoded.

    Raises UnsupportedMediaType for non-images and formats outside ACCEPTED_FORMATS, PayloadTooLarge
    when width x height is over `max_pixels` (decompression bombs), InvalidInput for a broken header.
    """
    if not data:
        raise InvalidInput(f"{name} is an empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{name} has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(f"{name} is not an image in a format this service reads "
                                   f"({', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{name} has a corrupt image header: {exc}") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"{name} is a {fmt} image; accepted formats are {', '.join(ACCEPTED_FORMATS)}")
    width, height = size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return fmt, size


def _rgb(data: bytes, max_pixels: int, name: str) -> Image.Image:
    check_image_header(data, max_pixels, name)
    try:
        return load_pil_rgb(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{name} has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{name} is truncated or corrupt: {exc}") from exc


def decode_image(data: bytes, image_size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Encoded image bytes -> float32 (3, image_size, image_size) in [0, 1], resized as in training.

    Any Pillow mode becomes RGB (shared.data.load_pil_rgb); GIFs give their first frame.
    """
    pixels: torch.Tensor = resize_transform(image_size)(_rgb(data, max_pixels, name))
    return pixels.float().div_(255.0)


@dataclass(frozen=True)
class Photo:
    """A decoded upload at its own size. image: (3, H, W) float32 in [0, 1] on the 8-bit grid;
    original_size: (width, height) as uploaded; downscaled: whether max_side shrank it."""

    image: torch.Tensor
    original_size: tuple[int, int]
    downscaled: bool

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-1]), int(self.image.shape[-2])


def decode_photo(data: bytes, max_pixels: int, max_side: int | None = None, name: str = "image") -> Photo:
    """Encoded image bytes -> the photo at its own resolution, RGB, [0, 1].

    With `max_side`, a photo whose longer side is larger is downscaled once (antialiased, aspect
    ratio kept) so its longer side is `max_side`; `Photo.downscaled` says so.
    """
    rgb = _rgb(data, max_pixels, name)
    original = rgb.size
    downscaled = max_side is not None and max(original) > max_side
    if max_side is not None and downscaled:
        scale = max_side / max(original)
        rgb = rgb.resize((max(1, round(original[0] * scale)), max(1, round(original[1] * scale))),
                         Image.Resampling.LANCZOS)
    return Photo(from_uint8(np.asarray(rgb, dtype=np.uint8)), original, downscaled)
