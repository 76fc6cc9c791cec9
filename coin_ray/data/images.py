"""Decoding images: RGB uint8 (H, W, 3) with EXIF orientation applied, or a clear error."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coin_ray import storage
from coin_ray.schema import ImageRecord

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


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
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{uri}: not an image file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{uri}: corrupt image ({err})") from err


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
