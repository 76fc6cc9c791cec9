"""How good the stand-ins are: detector mAP50 on a split, CLIP zero-shot crop accuracy.

Both go through the same interfaces the pipeline uses: the detector as a
``DetectorBackend`` (``detect`` on decoded images), CLIP loaded with
``CLIPModel.from_pretrained`` / ``AutoProcessor.from_pretrained`` from a directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coin_ray.cloud.base import DetectorBackend
from coin_ray.cloud.clip_score import crop_pixels
from coin_ray.data.datasets import LabelledSplit, load_coco
from coin_ray.data.images import load_image
from coin_ray.evaluate import EvalResult, evaluate
from coin_ray.schema import SOURCE_CLOUD, Detections


def detect_split(backend: DetectorBackend, split: LabelledSplit) -> list[Detections]:
    """Run ``backend`` on every image of ``split``, prompting with the split's category names."""
    records = []
    index = {name: k for k, name in enumerate(split.categories)}
    for gt in split.items:
        image = load_image(gt.uri)
        answer = backend.detect(b"", image, list(split.categories))
        labels = np.array([index[p] for p in answer.phrases], np.int64)
        records.append(Detections.from_class_only(gt.image_id, gt.uri, gt.width, gt.height, answer.boxes,
                                                  labels, answer.scores, len(split.categories), SOURCE_CLOUD))
    return records


def detector_map50(backend: DetectorBackend, images_dir: str | Path, coco_json: str | Path,
                   categories: list[str]) -> EvalResult:
    """pycocotools AP50 of ``backend`` on a COCO split (AP values in percent)."""
    split = load_coco(str(coco_json), str(images_dir), categories)
    return evaluate(split, detect_split(backend, split))


def gt_crops(split: LabelledSplit, limit: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Crops of the ground-truth boxes ((h, w, 3) uint8 each) and their labels (N,) in [0, K)."""
    crops, labels = [], []
    for gt in split.items:
        image = load_image(gt.uri)
        for box, label in zip(gt.boxes, gt.labels):
            x0, y0, x1, y1 = np.round(box).astype(int)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                crops.append(image[y0:y1, x0:x1])
                labels.append(int(label))
        if limit and len(crops) >= limit:
            break
    return crops, np.array(labels, np.int64)


def load_clip(clip_dir: str | Path) -> tuple[object, object]:
    """(CLIPModel in eval mode, processor), loaded as any real CLIP checkpoint is."""
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)


@torch.no_grad()
def clip_text_embeddings(model: object, processor: object, names: list[str], templates: list[str]) -> torch.Tensor:
    """(len(names), D) normalised text embeddings, each the mean over ``templates``."""
    rows = []
    for name in names:
        tokens = processor(text=[t.format(name) for t in templates], return_tensors="pt", padding=True)
        emb = _features(model.get_text_features(**tokens))
        rows.append(torch.nn.functional.normalize(emb, dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def _features(out: object) -> torch.Tensor:
    """Projected embeddings whether transformers returns a tensor or an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


@torch.no_grad()
def clip_crop_accuracy(clip_dir: str | Path, crops: list[np.ndarray], labels: np.ndarray,
                       categories: list[str], templates: list[str], batch_size: int = 128) -> float:
    """Zero-shot top-1 accuracy (0..1) of the CLIP at ``clip_dir`` on labelled crops (K-way)."""
    if len(crops) == 0:
        return float("nan")
    model, processor = load_clip(clip_dir)
    text = clip_text_embeddings(model, processor, categories, templates)
    predictions = []
    for i in range(0, len(crops), batch_size):
        pixels = crop_pixels(processor, crops[i:i + batch_size])
        emb = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        predictions.append((emb @ text.T).argmax(-1).numpy())
    return float((np.concatenate(predictions) == labels).mean())
