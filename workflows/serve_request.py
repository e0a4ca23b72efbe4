"""Validation of one Serve request (Ray-free): the JSON body of ``POST`` to the application of
:mod:`workflows.serve_app` -> a :class:`SegmentRequest`, or a :class:`RequestError` carrying the
one-line reason and its HTTP status (400 bad input, 403 a refused ``image_uri``, 413 an image
above ``serve.max_image_pixels`` or more people than ``serve.max_people``)."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.config import ServeConfig

REQUEST_FIELDS = ("image", "image_uri", "keypoints", "image_id", "overlay")


class RequestError(ValueError):
    """A request the API cannot answer: the message is the one-line reason sent back with
    HTTP ``status`` (400 bad input, 403 a refused ``image_uri``, 413 too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class SegmentRequest:
    """One validated request."""

    image_id: int
    pixels: np.ndarray  # (H, W, 3) uint8
    keypoints: np.ndarray | None  # (N, 17, 3) float32, or None: detect them
    overlay: bool


def decode_image_field(data: bytes, where: str, max_pixels: int) -> np.ndarray:
    """The image bytes of a request -> ``(H, W, 3)`` uint8, or a :class:`RequestError` whose
    one-line reason names ``where`` (the field, or the ``image_uri``): 413 above
    ``max_pixels`` (``serve.max_image_pixels``, read from the header before decoding), 400 for
    bytes that are not an image. The Serve application and the MLflow pyfunc both use it."""
    from preprocessing.schema import ImageDecodeError, ImageTooLargeError, decode_image

    try:
        pixels = decode_image(data, name=where, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise RequestError(f"{exc} (serve.max_image_pixels)", status=413) from None
    except ImageDecodeError as exc:
        raise RequestError(str(exc)) from None
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise RequestError(f"{where}: the image is empty")
    return pixels if pixels.flags.writeable else pixels.copy()  # torch wants it writable


def resolve_image_uri(uri: str, roots: list[str]) -> str:
    """The file ``image_uri`` names, which must lie inside one of ``roots``
    (``serve.image_roots``): a path or URI below a root, or a name relative to the first
    root. Raises RequestError (403) when no root is configured or the name leaves them."""
    from preprocessing.storage import UnsafePathError, is_remote, resolve_inside

    if not roots:
        raise RequestError(
            "image_uri is disabled on this server (serve.image_roots is empty): "
            "send the image bytes as 'image'",
            status=403,
        )
    for root in roots:
        base = root.rstrip("/") if is_remote(root) else os.path.abspath(root)
        separator = "/" if is_remote(root) else os.sep
        if uri.startswith(base + separator):
            name, inside = uri[len(base) + 1 :], base
            break
    else:
        if "://" in uri or os.path.isabs(uri):
            raise RequestError(
                f"image_uri {uri!r} is outside serve.image_roots {list(roots)}", status=403
            )
        name, inside = uri, roots[0]
    try:
        return resolve_inside(inside, name)
    except UnsafePathError as exc:
        raise RequestError(f"image_uri {uri!r}: {exc}", status=403) from None


def parse_keypoints(value: Any) -> np.ndarray:
    """JSON people list -> (N, 17, 3) float32; raises RequestError with the reason."""
    from pose2seg.keypoint_checks import people_keypoints

    try:
        return people_keypoints(value)
    except ValueError as exc:
        raise RequestError(f"keypoints: {exc}") from None


def parse_request(body: Any, *, limits: ServeConfig | None = None, read_uri=None) -> SegmentRequest:
    """Validate a decoded JSON body against ``limits`` (the ``serve.*`` keys: image size,
    people, image roots; default: their defaults); ``read_uri(uri) -> bytes`` reads
    ``image_uri``."""
    limits = limits or ServeConfig()
    if not isinstance(body, dict):
        raise RequestError(
            f"the body must be a JSON object with the fields {list(REQUEST_FIELDS)}, got {type(body).__name__}"
        )
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; the fields are {list(REQUEST_FIELDS)}")
    image_id = body.get("image_id", 0)
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise RequestError(f"image_id: expected an integer, got {image_id!r}")
    overlay = body.get("overlay", False)
    if not isinstance(overlay, bool):
        raise RequestError(f"overlay: expected true or false, got {overlay!r}")
    has_image, has_uri = "image" in body, "image_uri" in body
    if has_image == has_uri:
        raise RequestError("give exactly one of 'image' (base64 image bytes) and 'image_uri'")
    if has_image:
        text = body["image"]
        if not isinstance(text, str):
            raise RequestError("image: expected base64 text of a PNG/JPEG file")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image: not valid base64") from None
        pixels = decode_image_field(data, "image", limits.max_image_pixels)
    else:
        uri = body["image_uri"]
        if not isinstance(uri, str) or not uri:
            raise RequestError("image_uri: expected a path or s3:// URI")
        path = resolve_image_uri(uri, limits.image_roots)
        if read_uri is None:
            from preprocessing.storage import read_bytes as read_uri
        try:
            data = read_uri(path)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RequestError(f"image_uri {uri!r}: cannot be read ({reason})") from None
        pixels = decode_image_field(data, f"image_uri {uri!r}", limits.max_image_pixels)
    keypoints = None
    if "keypoints" in body:
        people = body["keypoints"]
        if limits.max_people and isinstance(people, list) and len(people) > limits.max_people:
            raise RequestError(
                f"keypoints: {len(people)} people, more than serve.max_people={limits.max_people}",
                status=413,
            )
        keypoints = parse_keypoints(people)
    return SegmentRequest(image_id=image_id, pixels=pixels, keypoints=keypoints, overlay=overlay)
