"""The stand-in CLIP: a small ``transformers.CLIPModel`` trained contrastively on object crops.

Images are crops of the labelled source boxes (jittered, and a share of background crops
with no object), under broad photometric augmentation (haze, blur, colour jitter, noise),
so the model knows fog only as a generic corruption, as a web-trained CLIP would. Each
crop is paired with a caption such as "a photo of a bus." or "a bus in a foggy street
scene."; the loss is the image-to-text cross-entropy over the K+1 class captions written
with that crop's template (the captions of the other classes are the negatives).

The result is saved with ``save_pretrained`` (model, tokenizer, processor) and is meant to
be loaded only as a real checkpoint would be: ``CLIPModel.from_pretrained(dir)``,
``AutoProcessor.from_pretrained(dir)``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from transformers import CLIPModel, CLIPTokenizer

from coin_ray.config import DEFAULT_TEMPLATES
from coin_ray.models.clip_factory import CLIP_MEAN, CLIP_STD, write_clip
from coin_ray.world.cloud_standin import load_coco_split

BACKGROUND = "background"
STYLES = ["street scene", "foggy street scene", "hazy street scene", "clear street scene"]
TEMPLATES = DEFAULT_TEMPLATES + [f"a photo of a {{}} in a {s}." for s in STYLES] + \
    [f"a {{}} in a {s}." for s in STYLES] + [f"a photo of a {{}}, {s}." for s in STYLES]
CLIP_SHAPE = {"image_size": 64, "patch_size": 8, "hidden_size": 96, "projection_dim": 64,
              "num_layers": 3, "num_heads": 4}
BACKGROUND_SHARE = 0.12


def caption_words(categories: list[str]) -> list[str]:
    """Every word of every caption, so each becomes a single token."""
    text = " ".join(t.format(c) for t in TEMPLATES for c in [*categories, BACKGROUND])
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-6)


def _sample_box(rng: np.random.Generator, data: list, by_class: list[list[tuple[int, int]]],
                num_classes: int) -> tuple[int, np.ndarray, int]:
    """(image index, xyxy box, label in [0, K]) with classes balanced and K = background."""
    if rng.random() < BACKGROUND_SHARE:
        for _ in range(20):
            i = int(rng.integers(len(data)))
            image, boxes, _ = data[i]
            h, w = image.shape[:2]
            bw, bh = rng.uniform(12, 90), rng.uniform(12, 70)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([x0, y0, x0 + bw, y0 + bh], np.float32)
            if len(boxes) == 0 or _box_iou(box, boxes).max() < 0.2:
                return i, box, num_classes
    label = int(rng.choice([k for k in range(num_classes) if by_class[k]]))
    i, j = by_class[label][rng.integers(len(by_class[label]))]
    box = data[i][1][j].copy()
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2 + rng.uniform(-0.1, 0.1) * w, (box[1] + box[3]) / 2 + rng.uniform(-0.1, 0.1) * h
    w, h = w * rng.uniform(0.95, 1.3), h * rng.uniform(0.95, 1.3)
    return i, np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float32), label


def augment(crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Photometric augmentation of a (h, w, 3) uint8 crop; returns (float [0,1] crop, hazy?)."""
    x = crop.astype(np.float32) / 255.0
    hazy = rng.random() < 0.5
    if hazy:  # a uniform veil: I = J t + A (1 - t)
        t = rng.uniform(0.15, 1.0)
        x = x * t + rng.uniform(0.6, 0.95) * (1 - t)
    x = x * rng.uniform(0.7, 1.3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.6, 1.4) + mean
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * (0.0 if rng.random() < 0.1 else rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.3:
        img = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8))
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))), np.float32) / 255.0
    x = x + rng.normal(0, rng.uniform(0.0, 0.04), x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), hazy


def to_pixels(crop: np.ndarray, size: int) -> np.ndarray:
    """What the CLIP processor does: shortest edge to ``size`` (bicubic), centre crop, normalise.

    (h, w, 3) float [0, 1] -> (3, size, size) float32.
    """
    h, w = crop.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray((crop * 255 + 0.5).astype(np.uint8)).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    x = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return ((x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)


def _crop_batch(rng: np.random.Generator, data: list, by_class: list, num_classes: int, size: int,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels (B, 3, size, size), labels (B,) in [0, K], template index (B,))."""
    pixels, labels, templates = [], [], []
    foggy = [i for i, t in enumerate(TEMPLATES) if "foggy" in t or "hazy" in t]
    clear = [i for i, t in enumerate(TEMPLATES) if "clear" in t]
    plain = [i for i in range(len(TEMPLATES)) if i not in foggy and i not in clear]
    for _ in range(batch_size):
        i, box, label = _sample_box(rng, data, by_class, num_classes)
        image = data[i][0]
        x0, y0 = int(max(0, np.floor(box[0]))), int(max(0, np.floor(box[1])))
        x1, y1 = int(min(image.shape[1], np.ceil(box[2]))), int(min(image.shape[0], np.ceil(box[3])))
        crop, hazy = augment(image[y0:max(y1, y0 + 2), x0:max(x1, x0 + 2)], rng)
        pool = plain + (foggy if hazy else clear)  # the caption may describe the weather
        pixels.append(to_pixels(crop, size))
        labels.append(label)
        templates.append(pool[rng.integers(len(pool))])
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels), torch.tensor(templates)


def _caption_tokens(tokenizer: CLIPTokenizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Tokens of every (template, class) caption, row = template * (K+1) + class."""
    texts = [t.format(n) for t in TEMPLATES for n in names]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def _embed(out: object) -> torch.Tensor:
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]
    return torch.nn.functional.normalize(emb, dim=-1)


def train_clip(images_dir: str | Path, coco_json: str | Path, out_dir: str | Path, categories: list[str],
               *, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               log_every: int = 50) -> Path:
    """Create a small CLIP in ``out_dir``, train it on crops of a labelled split, save it back."""
    out = write_clip(out_dir, caption_words(categories) + list(categories), seed=seed, **CLIP_SHAPE)
    model = CLIPModel.from_pretrained(out).train()
    tokenizer = CLIPTokenizer.from_pretrained(out)
    data = load_coco_split(images_dir, coco_json)
    by_class: list[list[tuple[int, int]]] = [[] for _ in categories]
    for i, (_, _, labels) in enumerate(data):
        for j, lab in enumerate(labels.tolist()):
            by_class[lab - 1].append((i, j))
    data = [(image, boxes, labels - 1) for image, boxes, labels in data]
    names, k1 = [*categories, BACKGROUND], len(categories) + 1
    tokens = _caption_tokens(tokenizer, names)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + np.cos(np.pi * s / max(steps, 1))))
    start = time.time()
    for step in range(steps):
        pixels, labels, templates = _crop_batch(rng, data, by_class, len(categories),
                                                CLIP_SHAPE["image_size"], batch_size)
        text = _embed(model.get_text_features(**tokens)).view(len(TEMPLATES), k1, -1)
        image = _embed(model.get_image_features(pixel_values=pixels))
        # Each crop against the K+1 captions written with its own template.
        logits = model.logit_scale.exp() * torch.einsum("bd,bkd->bk", image, text[templates])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        if log_every and (step + 1) % log_every == 0:
            print(f"[world] CLIP step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)",
                  flush=True)
    model.eval().save_pretrained(out)
    return out
