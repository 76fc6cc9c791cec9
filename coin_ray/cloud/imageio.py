"""Re-encoding images for services with size limits (boxes scaled back by the caller)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_mime(data: bytes) -> str | None:
    """'image/jpeg' or 'image/png' from the magic bytes; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return None


def shrink_to(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, 3) uint8 so its longest side is <= max_side.

    Returns:
        (resized image, scale) where original pixels = sent pixels * scale (scale >= 1).
    """
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    ratio = max_side / float(max(h, w))
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return small, w / float(size[0])


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def upload_bytes(image_bytes: bytes, image: np.ndarray, max_side: int,
                 max_bytes: int | None = None) -> tuple[bytes, str, float]:
    """What to send: the original file when the service takes it, else a shrunk JPEG.

    Returns:
        (encoded bytes, mime type, scale from sent pixels back to original pixels)
    """
    small, scale = shrink_to(image, max_side)
    mime = image_mime(image_bytes)
    if scale == 1.0 and mime and (max_bytes is None or len(image_bytes) <= max_bytes):
        return image_bytes, mime, 1.0
    data = encode_jpeg(small)
    while max_bytes is not None and len(data) > max_bytes and max(small.shape[:2]) > 64:
        small, extra = shrink_to(small, int(max(small.shape[:2]) * 0.7))
        scale *= extra
        data = encode_jpeg(small)
    return data, "image/jpeg", scale
