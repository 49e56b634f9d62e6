"""Request body -> image bytes -> model-ready arrays; every way a request can be wrong is an ApiError."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from imgclf.data.io import ImageError, PixelBudget, Preprocess, open_rgb, resize_center_crop
from imgclf.utils import release_freed_memory

FILE_FIELDS = ("file", "files")
TUTORIAL_KEY = "image base64 string"


class ApiError(Exception):
    """A request the service refuses: HTTP status, short error code, a message saying what is wrong, and
    headers of the answer."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


@dataclass
class ImageInput:
    """One image of a request: its bytes and a name for error messages."""

    data: bytes
    name: str


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused (413) when Content-Length or the bytes actually sent exceed ``max_bytes``, and
    (408, closing the connection) when it has not all arrived within ``timeout_s``: a client sending slowly
    must not hold a connection for ever."""
    limit_mb = max_bytes / 1e6
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header {length!r}")
        if int(length) > max_bytes:
            raise ApiError(
                413,
                "body_too_large",
                f"request body of {int(length):,} bytes exceeds the limit of {limit_mb:g} MB ({max_bytes:,} bytes)",
            )
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit_mb:g} MB")
                chunks.append(chunk)
    except ClientDisconnect as e:
        raise ApiError(400, "client_disconnected", "the client closed the connection while sending") from e
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the request body did not all arrive within {timeout_s:g} s ({size} bytes came); the connection is closed",
            {"Connection": "close"},
        ) from None
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
    yield b""


async def parse_multipart(request: Request, body: bytes) -> list[ImageInput]:
    """Files of the ``file`` / ``files`` fields of a multipart/form-data body."""
    boundary = parse_options_header(request.headers.get("content-type", ""))[1].get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:  # the parser takes an unended part for no part
        raise ApiError(400, "bad_multipart", "malformed multipart body: it ends before its closing boundary")
    try:
        form = await MultiPartParser(request.headers, _once(body)).parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from e
    images: list[ImageInput] = []
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                if key in FILE_FIELDS:
                    raise ApiError(400, "bad_multipart", f"field {key!r} must be a file upload, not text")
                continue
            if key not in FILE_FIELDS:
                raise ApiError(400, "bad_multipart", f"unknown file field {key!r}: use 'file' or 'files'")
            images.append(ImageInput(await value.read(), value.filename or f"image {len(images)}"))
    finally:
        await form.close()
    return images


def decode_base64(text: Any, name: str) -> ImageInput:
    """Base64 -> bytes: the standard alphabet or the URL-safe one (``-_``), padded or not; a ``data:...;base64,``
    prefix and line breaks allowed."""
    if not isinstance(text, str):
        raise ApiError(400, "bad_json", f"{name}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    url_safe = ("-" in text or "_" in text) and not ("+" in text or "/" in text)
    if not text.endswith("="):  # unpadded: padded
        text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, altchars=b"-_" if url_safe else None, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"{name}: not valid base64 ({e})") from e
    return ImageInput(data, name)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:  # not UTF-8, not JSON, or an integer over Python's 4,300 digits (was a 500)
        raise ApiError(400, "bad_json", f"request body is not valid JSON ({e})") from e
    except RecursionError:
        raise ApiError(400, "bad_json", "request body is JSON nested too deeply") from None


def images_from_json(body: bytes, max_images: int) -> list[ImageInput]:
    """``{"images": ["<base64>", ...]}`` or, for one image, ``{"image": "<base64>"}`` -> image bytes; the count is
    checked before anything is decoded (millions of entries took the server's event loop for seconds)."""
    doc = parse_json(body)
    if isinstance(doc, dict) and isinstance(doc.get("images"), list) and "image" not in doc:
        check_count(len(doc["images"]), max_images)
        return [decode_base64(text, f"images[{i}]") for i, text in enumerate(doc["images"])]
    if isinstance(doc, dict) and "image" in doc and "images" not in doc:
        return [decode_base64(doc["image"], "image")]
    raise ApiError(
        400, "bad_json", 'expected a JSON object {"images": ["<base64 image>", ...]} or {"image": "<base64 image>"}'
    )


def images_from_tutorial_json(body: bytes, max_images: int) -> list[ImageInput]:
    """The 2017 tutorial's ``{"input_df": [{"image base64 string": "<base64>"}, ...]}`` -> image bytes; the count is
    checked before anything is decoded."""
    doc = parse_json(body)
    rows = doc.get("input_df") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise ApiError(400, "bad_json", f'expected {{"input_df": [{{"{TUTORIAL_KEY}": "<base64>"}}, ...]}}')
    check_count(len(rows), max_images)
    if not all(isinstance(r, dict) and TUTORIAL_KEY in r for r in rows):
        raise ApiError(400, "bad_json", f'expected {{"input_df": [{{"{TUTORIAL_KEY}": "<base64>"}}, ...]}}')
    return [decode_base64(r[TUTORIAL_KEY], f"input_df[{i}]") for i, r in enumerate(rows)]


async def images_from_request(request: Request, body: bytes, max_images: int) -> list[ImageInput]:
    """Images of a /v1/predict body: multipart files, base64 JSON (at most ``max_images``: 413), or one raw
    image (image/*)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return await parse_multipart(request, body)
    if ctype == "application/json":  # parsed in a thread: 20 MB of JSON held the event loop for seconds
        return await asyncio.to_thread(images_from_json, body, max_images)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [ImageInput(body, "body")]
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {ctype or '(none)'!r} not supported: send multipart/form-data with "
        """'file'/'files', application/json {"images": ["<base64>", ...]}, """
        "or one image as image/*",
    )


def check_count(n: int, max_images: int) -> None:
    """Refuses a request of no image (400) or more than ``max_images`` (413)."""
    if n == 0:
        raise ApiError(400, "no_images", "the request holds no image")
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request; limit {max_images}")


# Images larger than this (64 MB as RGBA) give their memory back to the system once cropped, or failed
TRIM_AFTER_PIXELS = 16_000_000


class DecodingBudget(PixelBudget):
    """The service's :class:`PixelBudget`: an image over :data:`TRIM_AFTER_PIXELS` gives the memory freed back
    to the system before its pixels go back to the budget, so that the next large image waits for it."""

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with super().hold(pixels):
            try:
                yield
            finally:
                if pixels > TRIM_AFTER_PIXELS:
                    release_freed_memory()


def decode_image(image: ImageInput, pre: Preprocess, max_pixels: int, budget: PixelBudget) -> np.ndarray:
    """Bytes -> upright RGB, resized and centre-cropped for the model (HxWx3 uint8); 422 if unusable. Its
    pixels are held in ``budget`` from decoding to the crop."""
    if not image.data:
        raise ApiError(422, "bad_image", f"{image.name}: empty image")
    try:
        with ExitStack() as held:  # the decoded image is a temporary: freed before the budget lets go
            return resize_center_crop(open_rgb(io.BytesIO(image.data), pre.resize_to, max_pixels, (budget, held)), pre)
    except ImageError as e:
        raise ApiError(422, "bad_image", f"{image.name}: {e}") from e
    except Exception as e:  # any failure on user bytes is the image's fault, never a server error
        raise ApiError(422, "bad_image", f"{image.name}: unusable image ({type(e).__name__}: {e})") from e
