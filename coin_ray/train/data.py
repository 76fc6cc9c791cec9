"""Training data for both stages: images by uri plus their stored detections.

    DetectionDataset[i] -> (image (3,H,W) float32 in [0,1], target)
    target = {"boxes": (N,4) float32 xyxy pixels of the original image,
              "labels": (N,) int64 in [0,K), "probs": (N,K+1) float32 rows summing to 1}

Batches are chosen by ``step_indices``: a pure function of (seed, step, rank), so a run
resumed from a checkpoint at step s sees exactly the batches it would have seen.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from coin_ray import storage
from coin_ray.data.images import load_image
from coin_ray.run import RunDir
from coin_ray.schema import DETECTION_SCHEMA, Detections, table_to_records


def detection_target(record: Detections, num_classes: int, min_score: float = 0.0) -> dict[str, torch.Tensor]:
    """The boxes of ``record`` with score >= ``min_score`` as a target dict (see module doc).

    Probability rows are renormalised; a row with no mass falls back to one-hot of its label.
    """
    keep = record.scores >= min_score
    labels = torch.as_tensor(record.labels[keep], dtype=torch.long)
    probs = torch.as_tensor(record.probs[keep], dtype=torch.float32).reshape(-1, num_classes + 1)
    total = probs.sum(dim=1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels, num_classes + 1).float()
    probs = torch.where(total > 0, probs / total.clamp_min(1e-12), onehot)
    return {"boxes": torch.as_tensor(record.boxes[keep], dtype=torch.float32).reshape(-1, 4),
            "labels": labels, "probs": probs}


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (3,H,W) float32 in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3,H,W) -> (3,h,w) bilinear, and the (4,) factors mapping xyxy boxes back to (H,W)."""
    h0, w0 = image.shape[-2:]
    if (h0, w0) == tuple(size):
        return image, torch.ones(4)
    out = torch.nn.functional.interpolate(image[None], size=tuple(size), mode="bilinear",
                                          align_corners=False)[0]
    sx, sy = w0 / size[1], h0 / size[0]
    return out, torch.tensor([sx, sy, sx, sy])


class DetectionDataset(Dataset):
    """Images (read by uri through coin_ray.storage) with their detection records as targets.

    Args:
        records: one Detections per image; error records are dropped (nothing to learn from).
        num_classes: K.
        min_score: boxes scoring below it are not targets (the image stays, maybe empty).
        load: uri -> (H,W,3) uint8 RGB; ``coin_ray.data.images.load_image`` by default.
    """

    def __init__(self, records: list[Detections], num_classes: int, min_score: float = 0.0,
                 load: Callable[[str], np.ndarray] = load_image) -> None:
        self.records = [r for r in records if r.ok]
        self.num_classes = num_classes
        self.min_score = min_score
        self.load = load

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        return image_tensor(self.load(record.uri)), detection_target(record, self.num_classes, self.min_score)


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
            ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A list of (image, target) pairs -> (images, targets): sizes differ, so lists, not stacks."""
    return [image for image, _ in batch], [target for _, target in batch]


@lru_cache(maxsize=4)
def _permutation(num_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_items, generator=generator).tolist())


def step_indices(num_items: int, batch_size: int, step: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> list[int]:
    """Dataset indices of ``rank``'s batch at ``step`` (0-based).

    Every epoch is a fresh seeded permutation; the global batch (batch_size * world_size
    items) walks through it, ranks taking consecutive slices, wrapping into the next epoch.
    """
    if num_items <= 0:
        return []
    start = (step * world_size + rank) * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_items)
        out.append(_permutation(num_items, seed, epoch)[offset])
    return out


def load_batch(dataset: DetectionDataset, indices: list[int]
               ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Read and collate the items at ``indices``."""
    return collate([dataset[i] for i in indices])


def to_device(images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device
              ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Move a collated batch to ``device``."""
    return ([img.to(device) for img in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def cloud_records(run: RunDir, uris: list[str] | None = None) -> list[Detections]:
    """The run's collected cloud detections (error records dropped), restricted to ``uris`` if given."""
    records = table_to_records(storage.read_parquet(run.cloud_detections, DETECTION_SCHEMA))
    wanted = set(uris) if uris is not None else None
    return [r for r in records if r.ok and (wanted is None or r.uri in wanted)]
