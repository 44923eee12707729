"""Reading an uploaded file's bytes under a size limit (the HTTP side; decoding is in shared/images.py)."""

from __future__ import annotations

from starlette.datastructures import UploadFile

from advexplain.shared.errors import PayloadTooLarge

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
