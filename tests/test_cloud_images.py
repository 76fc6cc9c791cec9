"""Awkward images reach every backend in the pipeline's frame; Retry-After in both forms."""

from __future__ import annotations

import io
import time
from email.utils import formatdate

import numpy as np
import pytest
from PIL import Image

from cloud_world import draw, png_bytes
from coin_ray.cloud.client import CloudClient, RetryPolicy
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.cloud.imageio import upload_bytes
from coin_ray.cloud.ratelimit import LocalLimiter
from coin_ray.cloud.rest import parse_retry_after
from coin_ray.data.images import decode_image, is_pipeline_frame

ORIENTATION = 0x0112


def plain_decode(data: bytes) -> np.ndarray:
    """What a service that ignores EXIF and converts naively sees."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def exif_jpeg(display: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG whose stored pixels, turned by ``orientation``, show ``display``."""
    # Orientation 6 means "turn the stored image 90 degrees clockwise to show it".
    stored = Image.fromarray(display).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def blocks() -> np.ndarray:
    image = np.zeros((60, 90, 3), np.uint8)
    image[5:25, 10:40] = (255, 0, 0)
    image[35:55, 60:85] = (0, 0, 255)
    return image


def test_sixteen_bit_gradient_decodes_to_an_eight_bit_gradient():
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    got = decode_image(buf.getvalue())
    assert got.shape == (4, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, :, 0], np.rint(ramp[0] / 257.0).astype(np.uint8))
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and (np.diff(got[0, :, 0].astype(int)) >= 0).all()
    assert len(np.unique(got[0, :, 0])) > 200  # a gradient, not black and white


def awkward_files() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the pixels the pipeline decodes)."""
    image = blocks()
    out = {}
    data = exif_jpeg(image)
    out["exif6"] = (data, decode_image(data))
    buf = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(buf, format="JPEG", quality=95)
    out["cmyk"] = (buf.getvalue(), decode_image(buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(buf, format="PNG")
    out["palette"] = (buf.getvalue(), decode_image(buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray((image[..., 0].astype(np.uint16) * 257)).save(buf, format="PNG")
    out["16bit"] = (buf.getvalue(), decode_image(buf.getvalue()))
    return out


@pytest.mark.parametrize("name", ["exif6", "cmyk", "palette", "16bit"])
def test_uploads_carry_the_pipeline_frame(name):
    data, pixels = awkward_files()[name]
    assert not is_pipeline_frame(data)
    sent, mime, scale = upload_bytes(data, pixels)
    assert scale == 1.0 and mime == "image/png" and is_pipeline_frame(sent)
    np.testing.assert_array_equal(plain_decode(sent), pixels)  # exactly, not approximately
    plain = png_bytes(blocks())
    assert upload_bytes(plain, blocks()) == (plain, "image/png", 1.0)  # sent as it is


def test_exif_rotated_photo_is_displayed_upright():
    data = exif_jpeg(blocks())
    got = decode_image(data)
    assert got.shape == (60, 90, 3)
    assert np.abs(got.astype(int) - blocks()).mean() < 3  # JPEG noise only


class _Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def detect(self, image_bytes, image, prompts):
        from coin_ray.cloud.base import CloudAnswer

        self.seen.append(image_bytes)
        return CloudAnswer(np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32))


def test_http_backend_sends_the_pipeline_frame():
    from coin_ray.serve import start_server

    recorder = _Recorder()
    server = start_server(recorder)
    try:
        for data, pixels in awkward_files().values():
            HttpBackend(server.url).detect(data, pixels, ["car"])
    finally:
        server.stop()
    for sent, (_, pixels) in zip(recorder.seen, awkward_files().values()):
        np.testing.assert_array_equal(plain_decode(sent), pixels)


def test_retry_after_both_forms_and_the_cap():
    now = 1_700_000_000.0
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25
    assert parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert parse_retry_after(formatdate(now - 5, usegmt=True), now=now) == 0.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now=784111777.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def _client(url: str, max_wait_s: float) -> CloudClient:
    return CloudClient(HttpBackend(url, timeout_s=5.0), prompts=["car"], model="m", threshold=0.25,
                       cache=None, limiter=LocalLimiter(1000, 4),
                       policy=RetryPolicy(1, 0.01, 0.05, max_wait_s=max_wait_s))


def test_429_with_an_http_date_is_not_retried_before_that_date(served):
    server = served(fail_429=1.0, retry_after_s=2.0, retry_after_date=1.0)
    image, _ = draw(0)
    out = _client(server.url, max_wait_s=60).ask(png_bytes(image), image)
    first, second = server.stats(arrivals=True)["arrivals"]
    assert out.reason == "http 429" and out.calls == 2
    # The date said int(first + 2) + 1 at the earliest (whole seconds, rounded up).
    assert second >= int(first + 2.0) + 1 and second - first >= 2.0
    capped = served(fail_429=1.0, retry_after_s=30.0, retry_after_date=1.0)
    start = time.monotonic()
    _client(capped.url, max_wait_s=0.3).ask(png_bytes(image), image)
    assert time.monotonic() - start < 10.0  # waited our 0.3 s cap, not the server's 30 s
