"""The stand-in cloud detector: a small Faster R-CNN trained on clear (source) images only.

It plays the part of Grounding DINO in the Foggy-Shapes world: good on the domain it was
trained on, noticeably worse in fog, and reachable only through the project's backend
interface (``DetectorBackend``), which the detector server wraps for the ``http`` backend.

Model: torchvision ``FasterRCNN`` on a 4-stage conv backbone (stride 8, 96 channels), one
feature map, anchors 12-192 px in five aspect ratios; torchvision labels are 1..K in
``categories`` order and 0 is background.

``cloud_confusion`` (rho, default 0) gives it the systematic category confusions of a real
open-vocabulary cloud: before training, a fraction rho of the source boxes of each category
in ``CONFUSION`` is relabelled as its partner (rider as person, train as bus, the classes on
which the paper's Grounding DINO is weak). The pattern is fixed a priori; rho = 0 leaves
the labels, and so the trained detector, exactly as without the knob.

Checkpoint (``torch.save``): {"state_dict": ..., "meta": {"categories": [...],
"model": {...builder kwargs...}}}.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from coin_ray.cloud.base import CloudAnswer

ANCHOR_SIZES = (12, 24, 48, 96, 192)
CONFUSION = {"rider": "person", "train": "bus"}  # true category -> the name the cloud learns for it
ANCHOR_RATIOS = (0.25, 0.5, 1.0, 2.0, 3.5)  # height / width: trains ... persons
# The stand-in answers only boxes scoring above this (torchvision's box_score_thresh is strict):
# the Foggy-Shapes world's runs ask at it (coin_ray.demo), so a request's threshold keeps them all.
SCORE_FLOOR = 0.05


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def build_detector(num_classes: int, *, width: int = 32, min_size: int = 160, max_size: int = 320,
                   score_threshold: float = SCORE_FLOOR, detections_per_image: int = 50) -> FasterRCNN:
    """A small Faster R-CNN for K = ``num_classes`` categories (K+1 outputs with background).

    Input images are (3, H, W) float in [0, 1]; outputs boxes are xyxy pixels of the input.
    """
    # Stride 4 straight away: full-resolution convolutions dominate CPU time.
    backbone = nn.Sequential(_conv(3, width // 2, 2), _conv(width // 2, width, 2), _conv(width, width, 1),
                             _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1))
    backbone.out_channels = 2 * width
    anchors = AnchorGenerator(sizes=(ANCHOR_SIZES,), aspect_ratios=(ANCHOR_RATIOS,))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=1)
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
        box_head=TwoMLPHead(2 * width * 49, 128), box_predictor=FastRCNNPredictor(128, num_classes + 1),
        min_size=min_size, max_size=max_size, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25],
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150, rpn_batch_size_per_image=128, box_batch_size_per_image=64,
        box_score_thresh=score_threshold, box_detections_per_img=detections_per_image)


def prompt_categories(prompts: list[str], categories: list[str]) -> list[str]:
    """Categories named by ``prompts`` (whole words, singular or plural), in first-mention order."""
    found: list[str] = []
    for prompt in prompts:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        for name in categories:
            if (name in words or name + "s" in words) and name not in found:
                found.append(name)
    return found


class StandInCloudDetector:
    """``DetectorBackend`` over a trained stand-in checkpoint (CPU or GPU, eval mode)."""

    name = "standin"

    def __init__(self, model: FasterRCNN, categories: list[str], full_probs: bool = False,
                 device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.categories = list(categories)
        self.full_probs = full_probs
        self.device = device

    @classmethod
    def load(cls, path: str | Path, *, full_probs: bool = False, score_threshold: float = SCORE_FLOOR,
             device: str = "cpu") -> "StandInCloudDetector":
        """Rebuild the detector from a checkpoint written by ``train_cloud_detector``."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = ckpt["meta"]
        kwargs = {**meta["model"], "score_threshold": score_threshold}
        model = build_detector(len(meta["categories"]), **kwargs)
        model.load_state_dict(ckpt["state_dict"])
        return cls(model, meta["categories"], full_probs, device)

    def unknown_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts naming none of its categories (it answers them with nothing, ever)."""
        return [p for p in prompts if not prompt_categories([p], self.categories)]

    @torch.no_grad()
    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """Detect the prompted categories in ``image`` ((H, W, 3) uint8 RGB).

        Returns category names as phrases, boxes xyxy in pixels of ``image``, class scores;
        with ``full_probs`` also (N, K'+1) probs over the prompted categories K' in
        first-mention order, background last (mass of unprompted categories goes to it).
        """
        wanted = prompt_categories(prompts, self.categories)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
        boxes, labels, scores, probs = self._run(x.to(self.device))
        keep = [i for i, lab in enumerate(labels.tolist()) if self.categories[lab - 1] in wanted]
        phrases = [self.categories[labels[i] - 1] for i in keep]
        answer_probs = None
        if self.full_probs:
            cols = [self.categories.index(n) + 1 for n in wanted]
            kept = probs[keep]
            answer_probs = np.concatenate([kept[:, cols], 1.0 - kept[:, cols].sum(1, keepdims=True)], 1)
            answer_probs = np.clip(answer_probs, 0.0, 1.0).astype(np.float32)
        return CloudAnswer(boxes[keep].astype(np.float32).reshape(-1, 4), phrases,
                           scores[keep].astype(np.float32), answer_probs)

    def _run(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(boxes, labels 1..K, scores, probs) for one image.

        probs is (N, K+1) softmax with background at 0, from the box head run again on the
        final boxes (torchvision keeps only the winning class); (N, 0) unless ``full_probs``.
        """
        m = self.model
        images, _ = m.transform([x])
        features = {"0": m.backbone(images.tensors)}
        proposals, _ = m.rpn(images, features)
        det, _ = m.roi_heads(features, proposals, images.image_sizes)
        probs = torch.zeros(len(det[0]["boxes"]), 0)
        if self.full_probs:
            pooled = m.roi_heads.box_roi_pool(features, [det[0]["boxes"]], images.image_sizes)
            probs = torch.softmax(m.roi_heads.box_predictor(m.roi_heads.box_head(pooled))[0], -1)
        out = m.transform.postprocess(det, images.image_sizes, [tuple(x.shape[-2:])])[0]
        return (out["boxes"].cpu().numpy(), out["labels"].cpu().numpy(), out["scores"].cpu().numpy(),
                probs.cpu().numpy())


def load_coco_split(images_dir: str | Path, coco_json: str | Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All images of a split in memory: [(image (H,W,3) uint8, boxes (N,4) xyxy px, labels (N,) 1..K)]."""
    import json

    from PIL import Image

    coco = json.loads(Path(coco_json).read_text())
    per_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    out = []
    for img in coco["images"]:
        anns = per_image[img["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32).reshape(-1, 4)
        labels = np.array([a["category_id"] for a in anns], np.int64)
        out.append((np.asarray(Image.open(Path(images_dir) / img["file_name"]).convert("RGB")), boxes, labels))
    return out


def confuse_labels(data: list, categories: list[str], rho: float, seed: int
                   ) -> tuple[list, dict[str, int]]:
    """``data`` (from ``load_coco_split``, labels 1..K) with a fraction rho of ``CONFUSION`` relabelled.

    For each confused category with n boxes in the split, exactly floor(rho * n + 1/2) of them,
    chosen by a generator seeded with (``seed``, 0xC0F), take the partner's label. Returns
    (new data, {category: boxes relabelled}); rho = 0 returns ``data`` itself.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"cloud_confusion must be in [0, 1], got {rho}")
    pairs = {categories.index(a) + 1: categories.index(b) + 1 for a, b in CONFUSION.items()
             if a in categories and b in categories}
    if rho == 0 or not pairs:
        return data, {categories[a - 1]: 0 for a in pairs}
    rng = np.random.default_rng([seed, 0xC0F])
    labels = [lab.copy() for _, _, lab in data]
    counts = {}
    for src, dst in pairs.items():
        where = [(i, j) for i, lab in enumerate(labels) for j in np.flatnonzero(lab == src)]
        chosen = rng.permutation(len(where))[:int(np.floor(rho * len(where) + 0.5))]
        for n in chosen:
            i, j = where[n]
            labels[i][j] = dst
        counts[categories[src - 1]] = len(chosen)
    return [(image, boxes, lab) for (image, boxes, _), lab in zip(data, labels)], counts


def _batch(data: list, rng: np.random.Generator, size: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for i in rng.choice(len(data), size, replace=len(data) < size):
        image, boxes, labels = data[i]
        x = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1).float().div(255.0)
        b = torch.from_numpy(boxes.copy())
        if rng.random() < 0.5:  # street scenes are left-right symmetric
            x = x.flip(-1)
            b = torch.stack([x.shape[-1] - b[:, 2], b[:, 1], x.shape[-1] - b[:, 0], b[:, 3]], 1)
        images.append(photometric_jitter(x, rng))
        targets.append({"boxes": b.reshape(-1, 4), "labels": torch.from_numpy(labels)})
    return images, targets


def photometric_jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Global exposure, contrast, colour and offset changes of a (3, H, W) [0, 1] image.

    A cloud detector has seen many cameras, so it should not hinge on absolute intensity;
    what it has never seen is fog's loss of contrast that grows with depth.
    """
    grey = x.mean(0, keepdim=True)
    x = grey + (x - grey) * float(rng.uniform(0.5, 1.5))  # saturation
    mean = x.mean()
    x = (x - mean) * float(rng.uniform(0.6, 1.4)) + mean  # contrast
    x = x * float(rng.uniform(0.7, 1.3)) + float(rng.uniform(-0.1, 0.1))  # exposure, offset
    return x.clamp(0.0, 1.0)


def train_cloud_detector(images_dir: str | Path, coco_json: str | Path, out_path: str | Path,
                         categories: list[str], *, steps: int, batch_size: int = 4, lr: float = 2e-3,
                         seed: int = 0, log_every: int = 50, cloud_confusion: float = 0.0) -> Path:
    """Train the stand-in on a labelled (source) split and save its checkpoint to ``out_path``.

    ``cloud_confusion``: rho of ``confuse_labels`` (0 = the split's true labels).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data, confused = confuse_labels(load_coco_split(images_dir, coco_json), categories, cloud_confusion, seed)
    if cloud_confusion:
        print(f"[world] cloud_confusion {cloud_confusion:g}: relabelled {confused}", flush=True)
    model_kwargs: dict[str, Any] = {"width": 32}
    model = build_detector(len(categories), **model_kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 5%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * s / max(steps, 1)))))
    start = time.time()
    for step in range(steps):
        images, targets = _batch(data, rng, batch_size)
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"[world] cloud detector step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    out = Path(out_path)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"categories": list(categories), "model": model_kwargs,
                         **({"cloud_confusion": cloud_confusion} if cloud_confusion else {})}}, out)
    return out
