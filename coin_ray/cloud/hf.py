"""The ``hf`` backend: a transformers zero-shot detector run locally (Grounding DINO, OWLv2).

Loaded with ``AutoModelForZeroShotObjectDetection.from_pretrained`` from a hub id, a local
folder or an s3:// folder (mirrored locally first), so real weights and tiny test models
go through the same path.

Grounding DINO scores text *tokens*; its own post-processing names boxes by the tokens over
a threshold, which can merge two prompts or name none. Here each box is scored per prompt
instead: the max token probability inside that prompt's span of the merged text
"p1. p2. p3.", and labelled with the best prompt. OWLv2/OWL-ViT score each query directly;
OWLv2 pads images to a square at the bottom/right, so its normalised boxes are scaled by
the longer side and clipped to the image.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from coin_ray import storage
from coin_ray.cloud.base import CloudAnswer

GROUNDING_TYPES = ("grounding-dino", "mm-grounding-dino")
OWL_TYPES = ("owlv2", "owlvit")


def _clean(prompt: str) -> str:
    # '.' separates prompts in Grounding DINO's text; the model was trained lower-case.
    return " ".join(prompt.replace(".", " ").lower().split())


class HfBackend:
    name = "hf"

    def __init__(self, model: str, *, threshold: float = 0.25, device: str = "cpu") -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not model:
            raise ValueError("backend 'hf' needs cloud.model (a hub id, a folder or s3:// folder)")
        path = str(storage.local_copy(model)) if storage.is_s3(model) else model
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.kind = self.model.config.model_type
        if self.kind not in GROUNDING_TYPES + OWL_TYPES:
            raise ValueError(f"hf model type {self.kind!r} is not supported "
                             f"(supported: {', '.join(GROUNDING_TYPES + OWL_TYPES)})")
        self.model_name = model
        self.threshold = threshold
        self.device = device
        self._lock = threading.Lock()  # one forward at a time; threads share the weights

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """Boxes (N, 4) xyxy in pixels of ``image``; phrases are the winning prompts."""
        prompts = [_clean(p) for p in prompts]
        with self._lock, torch.no_grad():
            if self.kind in OWL_TYPES:
                return self._detect_owl(image, prompts)
            return self._detect_grounding(image, prompts)

    def _detect_grounding(self, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        text = ". ".join(prompts) + "."
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        token_probs = outputs.logits[0].sigmoid()  # (Q, T)
        spans = prompt_spans(inputs["input_ids"][0].tolist(), self.processor.tokenizer)
        if len(spans) != len(prompts):
            raise ValueError(f"found {len(spans)} prompt spans for {len(prompts)} prompts "
                             "(text truncated? use fewer or shorter prompts)")
        per_prompt = torch.stack([token_probs[:, s:e].max(dim=1).values for s, e in spans], 1)
        scores, best = per_prompt.max(dim=1)  # (Q,)
        keep = scores >= self.threshold
        h, w = image.shape[:2]
        cx, cy, bw, bh = outputs.pred_boxes[0].unbind(-1)  # normalised to the image
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h,
                             (cx + bw / 2) * w, (cy + bh / 2) * h], dim=-1)
        return CloudAnswer(boxes[keep].float().cpu().numpy(),
                           [prompts[i] for i in best[keep].tolist()],
                           scores[keep].float().cpu().numpy())

    def _detect_owl(self, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        inputs = self.processor(text=[prompts], images=image, return_tensors="pt",
                                padding=True, truncation=True).to(self.device)
        outputs = self.model(**inputs)
        h, w = image.shape[:2]
        side = (max(h, w), max(h, w)) if self.kind == "owlv2" else (h, w)
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=[side], text_labels=[prompts])[0]
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return CloudAnswer(boxes, [prompts[i] for i in result["labels"].tolist()],
                           result["scores"].float().cpu().numpy())


def prompt_spans(input_ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """[start, end) token positions of each '.'-separated prompt in Grounding DINO's text.

    Special tokens ([CLS], [SEP], padding) and the '.' separators belong to no span.
    """
    dot = tokenizer.convert_tokens_to_ids(".")
    special = set(tokenizer.all_special_ids)
    spans, start = [], None
    for pos, tok in enumerate(input_ids):
        if tok == dot or tok in special:
            if start is not None:
                spans.append((start, pos))
                start = None
        elif start is None:
            start = pos
    if start is not None:
        spans.append((start, len(input_ids)))
    return spans
