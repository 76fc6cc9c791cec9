"""The stand-in CLIP: a small ``transformers.CLIPModel`` trained contrastively on object crops.

Images are crops of the labelled source boxes (jittered), and a share ``BACKGROUND_SHARE``
of non-object crops: random windows of scene background, the distractor objects (trees,
poles, crates, bushes, from the split's ``"distractors"`` list) and parts of objects that
overlap every object by IoU < ``PARTIAL_MAX_IOU``; these are captioned with the collector's
background ensemble (``coin_ray.cloud.clip_score.background_texts``), so the stand-in can
call a junk box background, as a web-scale CLIP can. All under broad photometric augmentation (haze, blur, colour jitter, noise),
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

from coin_ray.boxes import pairwise_iou
from coin_ray.cloud.clip_score import background_texts
from coin_ray.config import DEFAULT_TEMPLATES, FOGGY_SHAPES_CATEGORIES
from coin_ray.models.clip_factory import CLIP_MEAN, CLIP_STD, write_clip
from coin_ray.world.cloud_standin import load_coco_split

BACKGROUND = "background"
STYLES = ["street scene", "foggy street scene", "hazy street scene", "clear street scene"]
# Plain templates, and each with a style phrase after the class name (as the collector writes
# "a photo of a {car in a foggy street scene}."), plus a few short captions.
TEMPLATES = DEFAULT_TEMPLATES + [t.replace("{}", f"{{}} in a {s}") for s in STYLES for t in DEFAULT_TEMPLATES] + \
    [f"a {{}} in a {s}." for s in STYLES]
CLIP_SHAPE = {"image_size": 48, "patch_size": 8, "hidden_size": 64, "projection_dim": 64,
              "num_layers": 3, "num_heads": 4}
BACKGROUND_SHARE = 0.2
# How the background crops split: scene windows, distractor objects, parts of objects.
BACKGROUND_KINDS = {"scene": 0.4, "distractor": 0.3, "partial": 0.3}
SCENE_MAX_IOU = 0.2
PARTIAL_MAX_IOU = 0.3


def caption_words(categories: list[str]) -> list[str]:
    """Every word of every caption, so each becomes a single token."""
    text = " ".join(t.format(c) for t in TEMPLATES for c in [*categories, BACKGROUND])
    text += " " + " ".join(b for style in ["", *STYLES] for b in background_texts(style))
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def load_distractors(coco_json: str | Path) -> list[np.ndarray]:
    """Per image of the split (COCO ``images`` order): (M, 4) xyxy px boxes of its distractors."""
    import json

    coco = json.loads(Path(coco_json).read_text())
    per_image: dict[int, list[list[float]]] = {img["id"]: [] for img in coco["images"]}
    for d in coco.get("distractors", []):
        x, y, w, h = d["bbox"]
        per_image[d["image_id"]].append([x, y, x + w, y + h])
    return [np.asarray(per_image[img["id"]], np.float32).reshape(-1, 4) for img in coco["images"]]


def _max_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    if len(boxes) == 0:
        return 0.0
    return float(pairwise_iou(torch.from_numpy(box[None]), torch.from_numpy(boxes)).max())


def _jitter(rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    """A loose crop around ``box`` (centre shifted up to 10 %, sides grown 0-30 %)."""
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2 + rng.uniform(-0.1, 0.1) * w, (box[1] + box[3]) / 2 + rng.uniform(-0.1, 0.1) * h
    w, h = w * rng.uniform(0.95, 1.3), h * rng.uniform(0.95, 1.3)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float32)


def _background_box(rng: np.random.Generator, data: list, distractors: list[np.ndarray],
                    kind: str | None = None) -> tuple[int, np.ndarray] | None:
    """(image index, xyxy box) of one non-object crop, or None when a draw found none.

    ``kind`` (one of ``BACKGROUND_KINDS``) is drawn with their shares unless given.
    """
    if kind is None:
        kind = rng.choice(list(BACKGROUND_KINDS), p=list(BACKGROUND_KINDS.values()))
    i = int(rng.integers(len(data)))
    image, boxes, _ = data[i]
    h, w = image.shape[:2]
    if kind == "distractor":
        if len(distractors[i]) == 0:
            return None
        box = _jitter(rng, distractors[i][rng.integers(len(distractors[i]))])
        return (i, box) if _max_iou(box, boxes) < SCENE_MAX_IOU else None
    if kind == "partial" and len(boxes):
        obj = boxes[rng.integers(len(boxes))]
        ow, oh = obj[2] - obj[0], obj[3] - obj[1]
        bw, bh = ow * rng.uniform(0.25, 0.6), oh * rng.uniform(0.25, 0.6)  # part of the object ...
        x0 = rng.uniform(obj[0] - 0.5 * bw, obj[2] - 0.5 * bw)  # ... or of its edge and surroundings
        y0 = rng.uniform(obj[1] - 0.5 * bh, obj[3] - 0.5 * bh)
        box = np.array([x0, y0, x0 + bw, y0 + bh], np.float32)
        return (i, box) if min(bw, bh) >= 4 and _max_iou(box, boxes) < PARTIAL_MAX_IOU else None
    bw, bh = rng.uniform(12, 90), rng.uniform(12, 70)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    box = np.array([x0, y0, x0 + bw, y0 + bh], np.float32)
    return (i, box) if _max_iou(box, boxes) < SCENE_MAX_IOU else None


def _sample_box(rng: np.random.Generator, data: list, by_class: list[list[tuple[int, int]]],
                num_classes: int, distractors: list[np.ndarray]) -> tuple[int, np.ndarray, int]:
    """(image index, xyxy box, label in [0, K]) with classes balanced and K = background."""
    if rng.random() < BACKGROUND_SHARE:
        for _ in range(20):
            found = _background_box(rng, data, distractors)
            if found is not None:
                return found[0], found[1], num_classes
    label = int(rng.choice([k for k in range(num_classes) if by_class[k]]))
    i, j = by_class[label][rng.integers(len(by_class[label]))]
    return i, _jitter(rng, data[i][1][j].copy()), label


def augment(crops: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Photometric augmentation of a batch of (B, S, S, 3) uint8 crops.

    Returns (float32 [0, 1] crops, (B,) bool: hazy). Haze is a uniform veil
    I = J t + A (1 - t); then exposure, contrast, saturation, flips, blur and noise.
    """
    b = len(crops)
    x = crops.astype(np.float32) / 255.0
    col = lambda v: np.asarray(v, np.float32).reshape(b, 1, 1, 1)  # noqa: E731
    hazy = rng.random(b) < 0.5
    t = np.where(hazy, rng.uniform(0.15, 1.0, b), 1.0)
    x = x * col(t) + col(rng.uniform(0.6, 0.95, b) * (1 - t))
    x = x * col(rng.uniform(0.7, 1.3, b))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * col(rng.uniform(0.6, 1.4, b)) + mean
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * col(np.where(rng.random(b) < 0.1, 0.0, rng.uniform(0.5, 1.5, b)))
    flip = rng.random(b) < 0.5
    x[flip] = x[flip, :, ::-1]
    x = np.clip(x, 0.0, 1.0)
    for i in np.flatnonzero(rng.random(b) < 0.3):
        img = Image.fromarray((x[i] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        x[i] = np.asarray(img, np.float32) / 255.0
    x = x + rng.standard_normal(x.shape, np.float32) * col(rng.uniform(0.0, 0.04, b))
    return np.clip(x, 0.0, 1.0), hazy


def resize_like_processor(crop: np.ndarray, size: int) -> np.ndarray:
    """What the CLIP processor does first: shortest edge to ``size`` (bicubic), centre crop.

    (h, w, 3) uint8 -> (size, size, 3) uint8.
    """
    h, w = crop.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def normalise(x: np.ndarray) -> np.ndarray:
    """(B, size, size, 3) float [0, 1] -> (B, 3, size, size) float32 with CLIP's mean and std."""
    return ((x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(0, 3, 1, 2)


def _template_groups() -> tuple[list[int], list[int], list[int]]:
    """Template indices: (no weather, foggy or hazy, clear)."""
    foggy = [i for i, t in enumerate(TEMPLATES) if "foggy" in t or "hazy" in t]
    clear = [i for i, t in enumerate(TEMPLATES) if "clear" in t]
    return [i for i in range(len(TEMPLATES)) if i not in foggy + clear], foggy, clear


def _crop_batch(rng: np.random.Generator, data: list, by_class: list, num_classes: int, size: int,
                batch_size: int, distractors: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """(pixels (B, 3, size, size), labels (B,) in [0, K], the step's 3 templates, choice (B,) in 0..2).

    Each step draws one template of each group; a crop's caption uses the plain one or the
    one that matches its weather (so captions may describe the haze, as web captions do).
    """
    groups = _template_groups()
    chosen = [g[rng.integers(len(g))] for g in groups]
    crops, labels = [], []
    for _ in range(batch_size):
        i, box, label = _sample_box(rng, data, by_class, num_classes, distractors)
        image = data[i][0]
        x0, y0 = int(max(0, np.floor(box[0]))), int(max(0, np.floor(box[1])))
        x1, y1 = int(min(image.shape[1], np.ceil(box[2]))), int(min(image.shape[0], np.ceil(box[3])))
        crops.append(resize_like_processor(image[y0:max(y1, y0 + 2), x0:max(x1, x0 + 2)], size))
        labels.append(label)
    pixels, hazy = augment(np.stack(crops), rng)  # after resizing: the same look, a fraction of the work
    choice = np.where(rng.random(batch_size) < 0.5, 0, np.where(hazy, 1, 2))
    return torch.from_numpy(normalise(pixels)), torch.tensor(labels), chosen, torch.from_numpy(choice)


def template_style(template: str) -> str:
    """The style phrase a template writes after the class name ("" for a plain template)."""
    return next((s for s in sorted(STYLES, key=len, reverse=True) if f"in a {s}" in template), "")


def _caption_tokens(tokenizer: CLIPTokenizer, categories: list[str], templates: list[int],
                    rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Tokens of the (template, class) captions, row = template position * (K+1) + class.

    The background row is one text of the collector's background ensemble, with the
    template's style phrase (so it is the text the collector will compare crops with).
    """
    texts = []
    for t in templates:
        backgrounds = background_texts(template_style(TEMPLATES[t]))
        texts += [TEMPLATES[t].format(n) for n in categories] + [backgrounds[rng.integers(len(backgrounds))]]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def _embed(out: object) -> torch.Tensor:
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]
    return torch.nn.functional.normalize(emb, dim=-1)


def train_clip(images_dir: str | Path, coco_json: str | Path, out_dir: str | Path, categories: list[str],
               *, steps: int, batch_size: int = 64, lr: float = 1.5e-3, seed: int = 0,
               log_every: int = 50, shape: dict | None = None) -> Path:
    """Create a small CLIP in ``out_dir``, train it on crops of a labelled split, save it back.

    ``shape`` overrides entries of ``CLIP_SHAPE`` (``write_clip`` arguments).
    """
    shape = {**CLIP_SHAPE, **(shape or {})}
    out = write_clip(out_dir, caption_words(categories) + list(categories), seed=seed, **shape)
    model = CLIPModel.from_pretrained(out).train()
    with torch.no_grad():  # a sharper start than CLIP's 1/0.07: with K+1 captions it learns faster
        model.logit_scale.fill_(float(np.log(30.0)))
    tokenizer = CLIPTokenizer.from_pretrained(out)
    data = load_coco_split(images_dir, coco_json)
    by_class: list[list[tuple[int, int]]] = [[] for _ in categories]
    for i, (_, _, labels) in enumerate(data):
        for j, lab in enumerate(labels.tolist()):
            by_class[lab - 1].append((i, j))
    data = [(image, boxes, labels - 1) for image, boxes, labels in data]
    distractors = load_distractors(coco_json)
    k1 = len(categories) + 1
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + np.cos(np.pi * s / max(steps, 1))))
    start = time.time()
    for step in range(steps):
        pixels, labels, templates, choice = _crop_batch(rng, data, by_class, len(categories),
                                                        shape["image_size"], batch_size, distractors)
        tokens = _caption_tokens(tokenizer, categories, templates, rng)
        text = _embed(model.get_text_features(**tokens)).view(len(templates), k1, -1)
        image = _embed(model.get_image_features(pixel_values=pixels))
        # Each crop against the K+1 captions written with its own template.
        logits = model.logit_scale.exp() * torch.einsum("bd,bkd->bk", image, text[choice])
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


def main(argv: list[str] | None = None) -> None:
    """Command line for ``train_clip`` (the world build runs it beside the detector training)."""
    import argparse

    p = argparse.ArgumentParser(description="Train the Foggy-Shapes stand-in CLIP.")
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()  # this process's output is the build's progress log

    train_clip(args.images, args.annotations, args.out, list(FOGGY_SHAPES_CATEGORIES), steps=args.steps,
               batch_size=args.batch_size, seed=args.seed)


if __name__ == "__main__":
    main()
