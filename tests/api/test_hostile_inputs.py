"""A corpus of hostile and malformed requests, one table per service: each gets a 4xx with the one error
body or a correct answer, never a 5xx; nothing is counted that was not classified; afterwards /healthz
still answers and a normal request still works and counts exactly.

Every hostile file is made here in code (Pillow or raw bytes), so the corpus needs no fixtures on disk.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from advexplain.services.blackbox.app import create_app as create_blackbox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.explainer.app import create_app as create_explainer
from advexplain.services.explainer.settings import ExplainerSettings

CLASSES = ["defective", "functional"]
CLIENT = "explainer-corpus"
MAX_IMAGES = 16
MAX_UPLOAD = 1_000_000  # small enough that an over-limit body is cheap to build


# ---------------------------------------------------------------- hostile files, made in code

def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size=(40, 30), seed: int = 0, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: Callable[[], list[bytes]],
            extra: list[bytes] = ()) -> bytes:
    """A PNG written by hand (filter byte 0 per row), for what Pillow will not write itself."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for row in rows()) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@functools.cache
def decompression_bomb() -> bytes:
    """A valid 20000x20000 1-bit PNG of ~50 kB that inflates to 400 M pixels (1.2 GB as RGB)."""
    row = b"\x00" * (1 + 20000 // 8)
    data = raw_png(20000, 20000, 1, 0, lambda: [row * 1000] * 20)
    assert len(data) < 100_000
    return data


def png16_rgb(size: int = 12) -> bytes:
    row = b"\x00" + b"".join(struct.pack(">HHH", 257 * x, 65535 - 257 * x, 30000) for x in range(size))
    return raw_png(size, size, 16, 2, lambda: [row] * size)


def ztxt_bomb() -> bytes:
    """A tiny PNG with a compressed text chunk that inflates to 50 MB (Pillow caps text at 1 MB)."""
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    return raw_png(4, 4, 8, 0, lambda: [b"\x00" + b"\x80" * 4] * 4, extra=[text])


def bmp_header_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


def huge_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "A" * 60_000  # ImageDescription: an APP1 segment near its 64 kB maximum
    return encode(noise((16, 16), 1), "JPEG", exif=exif.tobytes())


def animated(fmt: str, frames: int = 12) -> bytes:
    imgs = [Image.new("RGB", (24, 24), (20 * i, 255 - 20 * i, 0)) for i in range(frames)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=40, loop=0, **kw)


def png_bad_crc() -> bytes:
    data = bytearray(encode(noise((16, 16), 2)))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def text_chunk_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 200_000)
    return encode(noise((8, 8), 3), "PNG", pnginfo=info)


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">' \
      b'<script>alert(1)</script><rect width="10" height="10"/></svg>'

# name -> (bytes factory, statuses allowed when uploaded as the one image)
IMAGE_CASES: dict[str, tuple[Callable[[], bytes], set[int]]] = {
    "text_not_image": (lambda: b"hello, this is plain text and not an image", {415}),
    "zero_bytes": (lambda: b"", {400}),
    "nul_bytes": (lambda: b"\x00" * 4096, {415}),
    "png_signature_only": (lambda: b"\x89PNG\r\n\x1a\n", {400, 415}),
    "truncated_png": (lambda: (d := encode(noise((64, 64), 4)))[: len(d) // 2], {400}),
    "truncated_jpeg": (lambda: (d := encode(noise((64, 64), 5), "JPEG"))[: len(d) // 2], {400}),
    "truncated_gif": (lambda: (d := encode(noise((64, 64), 14, "P"), "GIF"))[: len(d) // 2], {400}),
    "png_bad_crc": (png_bad_crc, {400, 415}),  # Pillow gives up identifying it: "not an image we read"
    "one_by_one_png": (lambda: encode(Image.new("RGB", (1, 1), "red")), {200}),
    "one_by_one_jpeg": (lambda: encode(Image.new("L", (1, 1), 9), "JPEG"), {200}),
    "one_by_eight_thousand": (lambda: encode(Image.new("RGB", (1, 8000), "blue")), {200}),
    "bomb_20000x20000": (decompression_bomb, {413}),
    "bmp_header_claims_1e10_pixels": (lambda: bmp_header_claiming(100_000, 100_000), {413}),
    "huge_exif_jpeg": (huge_exif_jpeg, {200}),
    "ztxt_bomb": (ztxt_bomb, {400}),
    "big_text_chunk": (text_chunk_png, {200, 400}),
    "animated_gif": (lambda: animated("GIF"), {200}),
    "animated_webp": (lambda: animated("WEBP"), {200}),
    "png_16bit_gray": (lambda: encode(Image.new("I;16", (20, 20), 40000)), {200}),
    "png_16bit_rgb": (png16_rgb, {200}),
    "png_rgba_transparent": (lambda: encode(noise((20, 20), 6, "RGBA")), {200}),
    "png_palette": (lambda: encode(noise((20, 20), 7, "P")), {200}),
    "png_handmade_gray": (lambda: raw_png(8, 8, 8, 0, lambda: [b"\x00" + b"\x40" * 8] * 8), {200}),
    "jpeg_cmyk": (lambda: encode(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG"), {200}),
    "jpeg_progressive": (lambda: encode(noise((32, 32), 9), "JPEG", progressive=True), {200}),
    "png_with_zip_appended": (lambda: encode(noise((16, 16), 10)) + b"PK\x03\x04" + b"\x00" * 100, {200}),
    "svg_with_script": (lambda: SVG, {415}),
    "tiff": (lambda: encode(noise((16, 16), 11), "TIFF"), {415}),
    "ico": (lambda: encode(noise((16, 16), 12), "ICO"), {415}),
    "pdf_magic": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", {415}),
    "html": (lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", {415}),
}


def good_png(seed: int = 20) -> bytes:
    return encode(noise((32, 32), seed))


def image_part(data: bytes, *, name: str = "x.png", ctype: str = "image/png", field_name: str = "image"):
    return (field_name, (name, data, ctype))


# ---------------------------------------------------------------- the checks every case gets

def check_answer(resp: httpx.Response, allowed: set[int]) -> None:
    assert resp.status_code < 500, f"server error {resp.status_code}: {resp.text[:300]}"
    assert resp.status_code in allowed, f"{resp.status_code} not in {sorted(allowed)}: {resp.text[:300]}"
    if 400 <= resp.status_code < 500:
        assert resp.headers["content-type"].startswith("application/json"), resp.headers
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@dataclass(frozen=True)
class Case:
    """One hostile request: the keyword arguments of `client.post(path, ...)` and what may come back."""

    request: Callable[[], dict]
    allowed: set[int]
    images: int = 1  # images counted by the black box when the answer is 200
    path: str = "/predict"


# ---------------------------------------------------------------- the black box's table

def _bb_image_case(name: str) -> Case:
    make, allowed = IMAGE_CASES[name]
    return Case(lambda: {"files": [image_part(make())]}, allowed)


def _multipart(body: bytes, boundary: str | None = "BOUNDARY") -> dict:
    ctype = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"content": body, "headers": {"content-type": ctype}}


GOOD_PART = (b'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n")

BLACKBOX_CASES: dict[str, Case] = {
    **{f"image:{name}": _bb_image_case(name) for name in IMAGE_CASES},
    "part_content_type_text_plain": Case(lambda: {"files": [image_part(good_png(), ctype="text/plain")]}, {200}),
    "part_content_type_svg": Case(lambda: {"files": [image_part(good_png(), ctype="image/svg+xml")]}, {200}),
    "filename_path_traversal": Case(lambda: {"files": [image_part(good_png(), name="../../../etc/passwd")]}, {200}),
    "filename_unicode_and_nul": Case(
        lambda: {"files": [image_part(good_png(), name="ñ\u202e\x00gnp.exe")]}, {200, 400}
    ),
    "filename_10kb": Case(lambda: {"files": [image_part(good_png(), name="a" * 10_000 + ".png")]}, {200, 400}),
    "two_images": Case(lambda: {"files": [image_part(good_png(1)), image_part(good_png(2))]}, {200}, images=2),
    "max_images_exactly": Case(lambda: {"files": [image_part(good_png())] * MAX_IMAGES}, {200}, images=MAX_IMAGES),
    "one_image_too_many": Case(lambda: {"files": [image_part(good_png())] * (MAX_IMAGES + 1)}, {413}),
    "one_bad_among_good": Case(
        lambda: {"files": [image_part(good_png()), image_part(b"junk"), image_part(good_png())]}, {415}
    ),
    "body_over_byte_limit": Case(lambda: {"files": [image_part(encode(noise((700, 700), 13)))]}, {413}),
    "wrong_field_name": Case(lambda: {"files": [image_part(good_png(), field_name="picture")]}, {422}),
    "image_as_text_field": Case(lambda: {"data": {"image": "iVBORw0KGgo="}}, {422}),
    "no_body": Case(lambda: {}, {422}),
    "json_body": Case(lambda: {"json": {"image": base64.b64encode(good_png()).decode()}}, {422}),
    "urlencoded_body": Case(lambda: {"data": {"image": "x"}}, {422}),
    "text_plain_body": Case(lambda: {"content": good_png(), "headers": {"content-type": "text/plain"}}, {422}),
    "raw_png_body_image_type": Case(lambda: {"content": good_png(), "headers": {"content-type": "image/png"}}, {422}),
    "multipart_without_boundary": Case(lambda: _multipart(GOOD_PART + good_png(), boundary=None), {400, 422}),
    "multipart_never_closed": Case(lambda: _multipart(GOOD_PART + good_png()), {200, 400, 422}),
    "multipart_garbage": Case(lambda: _multipart(b"\xff\xfe" * 5000), {400, 422}),
    "multipart_empty": Case(lambda: _multipart(b"--BOUNDARY--\r\n"), {400, 422}),
    "multipart_header_flood": Case(
        lambda: _multipart(
            b"--BOUNDARY\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
            + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            + good_png()
            + b"\r\n--BOUNDARY--\r\n"
        ),
        {200, 400, 413, 422},
    ),
    "client_id_unicode": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": "cliént-ü".encode()}}, {400}
    ),
    "client_id_65_chars": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": "c" * 65}}, {400}
    ),
    "client_id_with_space": Case(lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": "a b"}}, {400}),
    "client_id_20kb": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": "c" * 20_000}}, {400}
    ),
    "client_id_empty_is_anonymous": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": ""}}, {200}
    ),
    "client_id_other_is_fine": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Client-Id": "other"}}, {200}
    ),
    "oversized_unrelated_header": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"X-Junk": "j" * 60_000}}, {431}
    ),
    "three_hundred_headers": Case(
        lambda: {"files": [image_part(good_png())], "headers": {f"X-H-{i}": str(i) for i in range(300)}}, {431}
    ),
    "ninety_headers_is_fine": Case(
        lambda: {"files": [image_part(good_png())], "headers": {f"X-H-{i}": str(i) for i in range(90)}}, {200}
    ),
    "content_encoding_gzip_claimed": Case(
        lambda: {"files": [image_part(good_png())], "headers": {"content-encoding": "gzip"}}, {200, 400, 415}
    ),
    "query_string_junk": Case(
        lambda: {"files": [image_part(good_png())], "params": {"x": "\x00" * 10, "y": "../.."}}, {200}
    ),
}


@contextlib.contextmanager
def blackbox_client(tiny_models) -> Iterator[TestClient]:
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, max_images=MAX_IMAGES,
                                max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_blackbox(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def blackbox(tiny_models):
    with blackbox_client(tiny_models) as client:
        yield client


def test_blackbox_corpus_is_big_enough():
    assert len(BLACKBOX_CASES) >= 30 and len(EXPLAINER_CASES) >= 30


@pytest.mark.parametrize("name", list(BLACKBOX_CASES))
def test_blackbox_hostile_input(blackbox, name):
    case = BLACKBOX_CASES[name]
    counter = blackbox.app.state.blackbox.counter
    before = counter.total
    resp = blackbox.post(case.path, **case.request())
    check_answer(resp, case.allowed)
    if resp.status_code == 200:
        body = resp.json()
        assert body["queries"] == case.images == len(body["predictions"])
        assert all(p["label"] in CLASSES and 0 <= p["index"] < 2 for p in body["predictions"])
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in body["predictions"])
    # Only classified images count: an error answer counts nothing.
    assert counter.total - before == (case.images if resp.status_code == 200 else 0)


def test_blackbox_is_healthy_and_exact_after_the_corpus(tiny_models):
    # Its own service and its own run of the whole corpus, so it holds whatever else ran, in any order.
    with blackbox_client(tiny_models) as blackbox:
        answered = sum(case.images for case in BLACKBOX_CASES.values()
                       if blackbox.post(case.path, **case.request()).status_code == 200)
        assert answered > 0, "some of the corpus is valid and must be classified"
        assert blackbox.get("/healthz").status_code == 200
        counter = blackbox.app.state.blackbox.counter
        assert counter.total == answered, "the counter holds exactly the images that were answered"
        resp = blackbox.post(
            "/predict", files=[image_part(good_png(), name="ok.png")], headers={"X-Client-Id": "after"}
        )
        assert resp.status_code == 200 and resp.headers["X-Query-Count"] == "1"
        assert counter.total == answered + 1
        assert blackbox.get("/metrics").status_code == 200


# ---------------------------------------------------------------- the explainer's table

def _form(image: bytes | None = None, **fields) -> dict:
    out: dict = {
        "data": {"label": "defective", "max_queries": "4", **{k: v for k, v in fields.items() if v is not None}}
    }
    out["data"] = {k: v for k, v in out["data"].items() if v is not ...}
    if image is not None:
        out["files"] = [image_part(image)]
    return out


def _ex_image_case(name: str) -> Case:
    make, allowed = IMAGE_CASES[name]
    return Case(lambda: _form(make()), allowed, path="/explain")


def _ex(request: Callable[[], dict], allowed: set[int], **kw) -> Case:
    return Case(request, allowed, path="/explain", **kw)


EXPLAINER_CASES: dict[str, Case] = {
    **{f"image:{name}": _ex_image_case(name) for name in IMAGE_CASES},
    "label_by_index": _ex(lambda: _form(good_png(), label="1"), {200}),
    "label_unknown": _ex(lambda: _form(good_png(), label="cat"), {400}),
    "label_index_out_of_range": _ex(lambda: _form(good_png(), label="2"), {400}),
    "label_negative_index": _ex(lambda: _form(good_png(), label="-1"), {400}),
    "label_huge_index": _ex(lambda: _form(good_png(), label="9" * 150), {400}),
    "label_empty": _ex(lambda: _form(good_png(), label=""), {422}),
    "label_10kb": _ex(lambda: _form(good_png(), label="d" * 10_000), {422}),
    "label_unicode": _ex(lambda: _form(good_png(), label="défectueux\u202e"), {400}),
    "label_nul": _ex(lambda: _form(good_png(), label="defective\x00"), {400}),
    "label_missing": _ex(lambda: _form(good_png(), label=...), {422}),
    "label_duplicated": _ex(
        lambda: {
            "files": [image_part(good_png())],
            "data": [("label", "defective"), ("label", "functional"), ("max_queries", "4")],
        },
        {200, 422},
    ),
    "image_missing": _ex(lambda: _form(None), {422}),
    "image_duplicated": _ex(
        lambda: {"files": [image_part(good_png()), image_part(good_png())], "data": {"label": "defective"}}, {413}
    ),
    "image_as_text_field": _ex(lambda: {"data": {"label": "defective", "image": "iVBORw0KGgo="}}, {422}),
    "tau_negative": _ex(lambda: _form(good_png(), tau="-1"), {422}),
    "tau_nan": _ex(lambda: _form(good_png(), tau="nan"), {422}),
    "tau_overflows_to_inf": _ex(lambda: _form(good_png(), tau="1e999"), {422}),
    "tau_text": _ex(lambda: _form(good_png(), tau="abc"), {422}),
    "beta_nan": _ex(lambda: _form(good_png(), beta="NaN"), {422}),
    "beta_negative": _ex(lambda: _form(good_png(), beta="-2"), {422}),
    "alpha_negative": _ex(lambda: _form(good_png(), alpha="-0.5"), {422}),
    "alpha_nan": _ex(lambda: _form(good_png(), alpha="nan"), {422}),
    "alpha_huge": _ex(lambda: _form(good_png(), alpha="1e300"), {422}),
    "max_queries_zero": _ex(lambda: _form(good_png(), max_queries="0"), {422}),
    "max_queries_negative": _ex(lambda: _form(good_png(), max_queries="-3"), {422}),
    "max_queries_1e9": _ex(lambda: _form(good_png(), max_queries=str(10**9)), {400}),
    "max_queries_1e40": _ex(lambda: _form(good_png(), max_queries=str(10**40)), {400, 422}),
    "max_queries_float": _ex(lambda: _form(good_png(), max_queries="2.5"), {422}),
    "max_queries_one": _ex(lambda: _form(good_png(), max_queries="1"), {200}),
    "method_unknown": _ex(lambda: _form(good_png(), method="fgsm"), {422}),
    "method_paper": _ex(lambda: _form(good_png(), method="paper", alpha="2"), {200}),
    "unknown_extra_field": _ex(lambda: _form(good_png(), surprise="1"), {200}),
    "body_over_byte_limit": _ex(lambda: _form(encode(noise((700, 700), 13))), {413}),
    "json_body": _ex(lambda: {"json": {"label": "defective", "image": base64.b64encode(good_png()).decode()}}, {422}),
    "urlencoded_body": _ex(lambda: {"data": {"label": "defective"}}, {422}),
    "text_plain_body": _ex(lambda: {"content": b"label=defective", "headers": {"content-type": "text/plain"}}, {422}),
    "multipart_without_boundary": _ex(lambda: _multipart(GOOD_PART + good_png(), boundary=None), {400, 422}),
    "multipart_garbage": _ex(lambda: _multipart(b"\xff\xfe" * 5000), {400, 422}),
    "accept_png": _ex(lambda: {**_form(good_png()), "headers": {"Accept": "image/png"}}, {200}),
    "accept_nonsense": _ex(lambda: {**_form(good_png()), "headers": {"Accept": "x/y;;q=a, */*"}}, {200}),
    "client_id_unicode_is_ignored": _ex(
        lambda: {**_form(good_png()), "headers": {"X-Client-Id": "cliént".encode()}}, {200}
    ),
    "oversized_unrelated_header": _ex(lambda: {**_form(good_png()), "headers": {"X-Junk": "j" * 60_000}}, {431}),
    "three_hundred_headers": _ex(
        lambda: {**_form(good_png()), "headers": {f"X-H-{i}": "v" for i in range(300)}}, {431}
    ),
    "whitebox_route_absent": Case(lambda: _form(good_png()), {404}, path="/internal/whitebox/explain"),
}


@contextlib.contextmanager
def explainer_and_box(tiny_models) -> Iterator[tuple[TestClient, TestClient]]:
    box_settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1)
    settings = ExplainerSettings(
        surrogate=[tiny_models["surrogate"]],
        blackbox_url="http://testserver",
        client_id=CLIENT,
        device="cpu",
        threads=1,
        max_upload_bytes=MAX_UPLOAD,
    )
    with TestClient(create_blackbox(box_settings)) as box, \
            TestClient(create_explainer(settings, blackbox_client=box), raise_server_exceptions=False) as explainer:
        yield explainer, box


@pytest.fixture(scope="module")
def explainer_pair(tiny_models):
    with explainer_and_box(tiny_models) as pair:
        yield pair


def reported_queries(resp: httpx.Response) -> int:
    if resp.headers["content-type"].startswith("image/png"):
        Image.open(io.BytesIO(resp.content)).verify()
        return int(resp.headers["X-Explanation-Queries"])
    body = resp.json()
    assert body["label"] in CLASSES and body["classes"] == CLASSES
    assert 1 <= body["queries"] <= body["max_queries"] and len(body["trace"]) == body["queries"]
    for name in ("saliency", "overlay", "adversarial", "panel"):
        Image.open(io.BytesIO(base64.b64decode(body["images"][name], validate=True))).verify()
    return body["queries"]


@pytest.mark.parametrize("name", list(EXPLAINER_CASES))
def test_explainer_hostile_input(explainer_pair, name):
    explainer, box = explainer_pair
    case = EXPLAINER_CASES[name]
    counter = box.app.state.blackbox.counter
    before = counter.of(CLIENT)
    resp = explainer.post(case.path, **case.request())
    check_answer(resp, case.allowed)
    spent = counter.of(CLIENT) - before
    if resp.status_code == 200:
        assert reported_queries(resp) == spent, "the reported queries equal the black box's counter delta"
    else:
        assert spent == 0, "a refused request spends no query"


def test_explainer_is_healthy_and_exact_after_the_corpus(tiny_models):
    # Its own pair and its own run of the whole corpus, so it holds whatever else ran, in any order.
    with explainer_and_box(tiny_models) as (explainer, box):
        reported = 0  # queries the explainer reported; the box's counter must equal it
        for case in EXPLAINER_CASES.values():
            resp = explainer.post(case.path, **case.request())
            if resp.status_code == 200:
                reported += reported_queries(resp)
        assert reported > 0, "some of the corpus is valid and must be explained"
        assert explainer.get("/healthz").status_code == 200
        counter = box.app.state.blackbox.counter
        assert counter.of(CLIENT) == reported
        resp = explainer.post("/explain", **_form(good_png(30), max_queries="6"))
        assert resp.status_code == 200, resp.text
        assert counter.of(CLIENT) == reported + reported_queries(resp)
        assert explainer.get("/metrics").status_code == 200
