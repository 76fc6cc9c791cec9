"""Decoding images: RGB uint8 (H, W, 3) with EXIF orientation applied, or a clear error.

This decoded frame is the one every stage uses, cloud backends included: a file whose plain
decoding differs from it (an EXIF orientation tag, CMYK, palette, 16-bit, alpha) is
re-encoded before upload (``is_pipeline_frame`` tells which).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coin_ray import storage
from coin_ray.schema import ImageRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit int) samples
EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The bytes are empty, truncated or not an image; the message says which."""


def decode_image(data: bytes, uri: str = "<bytes>") -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises:
        ImageDecodeError: naming ``uri`` and the reason (empty, not an image, truncated).
    """
    if not data:
        raise ImageDecodeError(f"{uri}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb8(img)
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{uri}: not an image file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{uri}: corrupt image ({err})") from err


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB; 16-bit samples are scaled (x / 257), never clipped at 255."""
    if img.mode in WIDE_INT_MODES:
        # PIL's own convert clips 0..65535 to 0..255, so a 16-bit gradient turns white.
        wide = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "F":  # float samples: 0..1 is the usual convention
        flt = np.asarray(img, dtype=np.float64)
        scale = 255.0 if flt.size and np.nanmax(flt) <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(flt) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def is_pipeline_frame(data: bytes) -> bool:
    """True when any decoder sees exactly ``decode_image(data)`` in ``data``: a JPEG or PNG,
    8-bit RGB or gray, no EXIF rotation. Reads the header only; False for anything unreadable.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG") or img.mode not in ("RGB", "L"):
                return False
            return img.getexif().get(EXIF_ORIENTATION, 1) == 1
    except (OSError, SyntaxError, ValueError):
        return False


def load_image(uri: str) -> np.ndarray:
    """Read and decode one image from a local path or s3:// URI: (H, W, 3) uint8 RGB."""
    return decode_image(storage.read_bytes(uri), uri)


def image_id_from_uri(uri: str, root: str = "") -> str:
    """A stable id: the path relative to ``root`` (or the file name), without extension."""
    rel = uri[len(root.rstrip("/")) + 1:] if root and uri.startswith(root.rstrip("/") + "/") else uri.rsplit("/", 1)[-1]
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def read_image_record(uri: str, image_id: str | None = None) -> ImageRecord:
    """Load one image as an ImageRecord; failures become an error record, never an exception."""
    image_id = image_id or image_id_from_uri(uri)
    try:
        image = load_image(uri)
    except (ImageDecodeError, OSError) as err:
        return ImageRecord(image_id, uri, None, error=str(err))
    return ImageRecord(image_id, uri, image, width=image.shape[1], height=image.shape[0])
