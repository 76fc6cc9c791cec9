"""CLIP on cloud boxes: the paper's "CLIP" row and the CLIP side of every later stage.

Each cloud box is cropped from the image and classified zero-shot among the K categories
plus background: the text side of category k is the mean of the normalised CLIP text
embeddings of "<template>" filled with "<name> in a <style>" for every template of the
prompt ensemble (``cfg.clip.templates``) and every prompt name of the category
(``cfg.cloud.prompts``), with the dataset's style phrase (``cfg.data.style``, e.g. "foggy
street scene"). The background row (index K) is built the same way from its own ensemble,
``BACKGROUND_TEMPLATES`` x ``BACKGROUND_NAMES`` ("a photo of background in a foggy street
scene.", "a photo of nothing in particular in a foggy street scene.", ...), so CLIP can say
that a box holds no object at all, as the reference's collector does.

Output: the same boxes (aligned one to one with the cloud record), probs (N, K+1) = softmax
over the K+1 rows of logit_scale * cos(crop, text); labels / scores are the argmax / max over
the K foreground columns (the schema wants labels in [0, K)). A box whose argmax over all
K+1 columns is K is one CLIP calls background: ``clip_foreground`` tells them apart, and
``clip_baseline`` drops them for the "CLIP" row of Table 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from coin_ray import storage
from coin_ray.schema import SOURCE_CLIP, Detections


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def category_texts(categories: list[str], templates: list[str], style: str,
                   prompts: dict[str, list[str]] | None = None) -> list[list[str]]:
    """Per category, every text of its ensemble (templates x prompt names, style appended)."""
    out = []
    for c in categories:
        names = (prompts or {}).get(c) or [c]
        subjects = [f"{n} in a {style}" if style else n for n in names]
        out.append([t.format(s) for t in templates for s in subjects])
    return out


# The background class's own ensemble (the style phrase is appended as for the categories).
BACKGROUND_TEMPLATES = ["a photo of {}.", "a blurry photo of {}."]
BACKGROUND_NAMES = ["background", "nothing in particular"]


def background_texts(style: str) -> list[str]:
    """Every text of the background ensemble (``BACKGROUND_TEMPLATES`` x ``BACKGROUND_NAMES``)."""
    subjects = [f"{n} in a {style}" if style else n for n in BACKGROUND_NAMES]
    return [t.format(s) for t in BACKGROUND_TEMPLATES for s in subjects]


def clip_foreground(probs: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of (N, K+1) ``probs`` whose argmax is not background (index K).

    Ties go to the foreground (argmax takes the first maximum), so a record collected before
    the background class existed (column K all 0) keeps every box.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] < 2:
        return np.ones(len(probs), bool)
    return probs.argmax(1) != probs.shape[1] - 1


def clip_baseline(record: Detections) -> Detections:
    """The paper's "CLIP" row for one CLIP record: the boxes CLIP calls background dropped."""
    keep = clip_foreground(record.probs)
    return Detections(record.image_id, record.uri, record.width, record.height, record.boxes[keep],
                      record.labels[keep], record.scores[keep], record.probs[keep], record.source,
                      record.error)


def crop_pixels(processor: object, crops: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, S, S) float32 CLIP pixel values of (h, w, 3) uint8 ``crops`` (S: the processor's size).

    The layout is stated, not inferred: transformers guesses channels-first when the first
    axis is 1, 3 or 4 long, so a crop 1, 3 or 4 pixels high would be read as a (h, w, 3)
    image with h channels and scored as noise.
    """
    return processor(images=crops, return_tensors="pt", input_data_format="channels_last")["pixel_values"]


def crop_boxes(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Crops (h, w, 3) uint8 of xyxy pixel boxes; each at least 1x1 and inside the image."""
    h, w = image.shape[:2]
    crops = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        left = min(max(int(math.floor(x1)), 0), w - 1)
        top = min(max(int(math.floor(y1)), 0), h - 1)
        right = max(min(int(math.ceil(x2)), w), left + 1)
        bottom = max(min(int(math.ceil(y2)), h), top + 1)
        crops.append(image[top:bottom, left:right])
    return crops


class ClipBoxScorer:
    """Loads a ``CLIPModel`` (hub id, folder or s3:// folder) and scores boxes of images."""

    def __init__(self, model: str, categories: list[str], *, templates: list[str], style: str = "",
                 prompts: dict[str, list[str]] | None = None, batch_size: int = 64,
                 device: str = "cpu") -> None:
        from transformers import AutoProcessor, CLIPModel

        if not model:
            raise ValueError("CLIP scoring needs clip.model (a hub id, a folder or s3:// folder)")
        path = str(storage.local_copy(model)) if storage.is_s3(model) else model
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.categories = list(categories)
        self.batch_size = batch_size
        self.device = device
        texts = category_texts(categories, templates, style, prompts) + [background_texts(style)]
        self.text = self._text_embeddings(texts)

    @torch.no_grad()
    def _text_embeddings(self, texts: list[list[str]]) -> torch.Tensor:
        """(K+1, D) float32: the normalised mean of each class's normalised text embeddings."""
        rows = []
        for ensemble in texts:
            tok = self.processor.tokenizer(ensemble, padding=True, truncation=True,
                                           return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(**tok))
            rows.append(torch.nn.functional.normalize(emb, dim=-1).mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    @torch.no_grad()
    def probs(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, K+1) float32 for xyxy pixel ``boxes`` of (H, W, 3) uint8 ``image``; column K: background."""
        crops = crop_boxes(image, boxes)
        out = np.zeros((len(crops), len(self.categories) + 1), np.float32)
        scale = self.model.logit_scale.exp()
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start:start + self.batch_size]
            pixels = crop_pixels(self.processor, batch).to(self.device)
            emb = torch.nn.functional.normalize(
                _features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
            out[start:start + len(batch)] = (scale * emb @ self.text.T).softmax(-1).cpu().numpy()
        return out

    def score(self, cloud: Detections, image: np.ndarray | None) -> Detections:
        """The ``source="clip"`` record for one cloud record (error records stay errors)."""
        k = len(self.categories)
        if cloud.error or image is None or len(cloud) == 0:
            return Detections.empty(cloud.image_id, cloud.uri, cloud.width, cloud.height,
                                    SOURCE_CLIP, k, cloud.error)
        probs = self.probs(image, cloud.boxes)
        return Detections(cloud.image_id, cloud.uri, cloud.width, cloud.height, cloud.boxes,
                          probs[:, :k].argmax(1), probs[:, :k].max(1), probs, SOURCE_CLIP)
