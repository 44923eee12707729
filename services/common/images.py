"""Uploaded bytes -> a [0,1] image tensor at the model's size, with the size checks done before decoding."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from advexplain.shared.data import load_pil_rgb, resize_transform
from advexplain.shared.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

# Pillow's format names for what the API accepts; only the first frame of a GIF is used.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
READ_CHUNK = 1 << 16


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The bytes of one uploaded file, stopping (PayloadTooLarge) as soon as they pass `max_bytes`."""
    if upload.size is not None and upload.size > max_bytes:
        raise PayloadTooLarge(f"file {upload.filename!r} is {upload.size} bytes, over the limit of {max_bytes}")
    chunks, total = [], 0
    while chunk := await upload.read(READ_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"file {upload.filename!r} is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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


def decode_image(data: bytes, image_size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Encoded image bytes -> float32 (3, image_size, image_size) in [0, 1], resized as in training.

    The header is checked first (format, pixel count) so a decompression bomb is refused before any
    pixel is decoded; any Pillow mode becomes RGB (advexplain.shared.data.load_pil_rgb), GIFs give their first frame.
    """
    check_image_header(data, max_pixels, name)
    try:
        rgb = load_pil_rgb(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{name} has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{name} is truncated or corrupt: {exc}") from exc
    return resize_transform(image_size)(rgb).float().div_(255.0)
