"""What a remote service is sent: the pipeline's pixels, within the service's size limits.

A service decodes what it is sent in its own way (many ignore EXIF orientation, read CMYK or
16-bit differently); boxes it returns are in the frame it decoded. So the original file is
sent only when its plain decoding *is* the pipeline's frame (``is_pipeline_frame``);
otherwise the decoded (H, W, 3) RGB image is re-encoded, losslessly (PNG) unless it must
shrink. Boxes then come back in pixels of the sent image, which the caller scales back.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from coin_ray.data.images import is_pipeline_frame


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


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def upload_bytes(image_bytes: bytes, image: np.ndarray, max_side: int | None = None,
                 max_bytes: int | None = None) -> tuple[bytes, str, float]:
    """What to send for ``image`` ((H, W, 3) uint8 RGB, the decoded ``image_bytes``).

    The original file when its plain decoding is ``image`` and it fits; else a PNG of
    ``image`` when no shrinking is needed; else a JPEG shrunk to ``max_side``/``max_bytes``.

    Returns:
        (encoded bytes, mime type, scale from sent pixels back to ``image``'s pixels)
    """
    small, scale = shrink_to(image, max_side) if max_side else (image, 1.0)
    mime = image_mime(image_bytes)
    fits = max_bytes is None or len(image_bytes) <= max_bytes
    if scale == 1.0 and mime and fits and is_pipeline_frame(image_bytes):
        return image_bytes, mime, 1.0
    if scale == 1.0:
        data = encode_png(image)
        if max_bytes is None or len(data) <= max_bytes:
            return data, "image/png", 1.0
    data = encode_jpeg(small)
    while max_bytes is not None and len(data) > max_bytes and max(small.shape[:2]) > 64:
        small, extra = shrink_to(small, int(max(small.shape[:2]) * 0.7))
        scale *= extra
        data = encode_jpeg(small)
    return data, "image/jpeg", scale
