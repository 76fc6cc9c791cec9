"""TensorBoard event files of a run, every stage under one folder: ``<run>/tensorboard``.

    <run>/tensorboard/disseminate   training losses and lr per logged step
    <run>/tensorboard/distill       losses, separation counts, lr per logged step
    <run>/tensorboard/evaluate      AP50 per method and category, mAP50, the report figures

Folders are named by ``coin_ray.run.RunDir`` (``tensorboard``, ``tensorboard_dir(stage)``);
open them all at once with ``tensorboard --logdir <run>/tensorboard``.
For s3:// runs the events are written to a local temp folder and uploaded on flush.
"""

from __future__ import annotations

import io
import tempfile

import numpy as np

from coin_ray import storage

class TensorBoardLog:
    """Scalars (and images) to TensorBoard event files under ``uri``; tags are ``<stage>/<key>``."""

    def __init__(self, uri: str, stage: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.uri, self.stage = uri, stage
        self.local = tempfile.mkdtemp(prefix="coin-tb-") if storage.is_s3(uri) else uri
        self.writer = SummaryWriter(self.local)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.stage}/{key}", value, step)

    def add_png(self, tag: str, png: bytes, step: int = 0) -> None:
        """A PNG (e.g. a report figure) as an image summary."""
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(f"{self.stage}/{tag}", image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if storage.is_s3(self.uri):
            storage.upload_dir(self.local, self.uri)

    def close(self) -> None:
        self.flush()
        self.writer.close()
