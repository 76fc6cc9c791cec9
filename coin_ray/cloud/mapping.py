"""Categories <-> what a backend is asked and what it answers.

Several prompts may ask for one category ("person", "pedestrian"), and several vendor labels
may mean one category ("Car", "Automobile"). Every label is normalised (lower-case, trimmed,
trailing '.' and articles removed, spaces collapsed) before lookup. Labels that map to no
category are dropped and counted, never silently turned into a category.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from coin_ray.cloud.base import CloudAnswer
from coin_ray.schema import SOURCE_CLOUD, Detections, class_only_probs

_ARTICLE = re.compile(r"^(a|an|the)\s+")
DEGENERATE_BOX = "<empty box>"  # the dropped-label tag of boxes with no area inside the image


def normalise(label: str) -> str:
    """'  The Traffic  Light. ' -> 'traffic light'."""
    text = " ".join(str(label).lower().replace(".", " ").split())
    return _ARTICLE.sub("", text)


@dataclass
class CategoryMap:
    """The run's K categories, the prompts that ask for each, and the labels that mean each.

    prompts: category -> prompt phrases (defaults to the category name itself)
    labels:  normalised label -> category index in [0, K)
    """

    categories: list[str]
    prompts: dict[str, list[str]]
    labels: dict[str, int]

    @classmethod
    def build(cls, categories: list[str], prompts: dict[str, list[str]] | None = None,
              label_map: dict[str, str] | None = None) -> "CategoryMap":
        """Category names, each prompt phrase and each ``label_map`` key all map to their category."""
        index = {c: i for i, c in enumerate(categories)}
        full = {c: list((prompts or {}).get(c) or [c]) for c in categories}
        labels: dict[str, int] = {}
        for c in categories:
            for phrase in [c, *full[c]]:
                labels.setdefault(normalise(phrase), index[c])
        for vendor, c in (label_map or {}).items():
            if c not in index:
                raise ValueError(f"label map: {vendor!r} -> {c!r}, which is not a category")
            labels[normalise(vendor)] = index[c]
        return cls(list(categories), full, labels)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def prompt_list(self) -> list[str]:
        """Every prompt phrase once, in category order (what a backend is asked for)."""
        out: list[str] = []
        for c in self.categories:
            out.extend(p for p in self.prompts[c] if p not in out)
        return out

    def category_of(self, label: str) -> int | None:
        return self.labels.get(normalise(label))


def answer_to_detections(answer: CloudAnswer, cmap: CategoryMap, image_id: str, uri: str,
                         width: int, height: int) -> tuple[Detections, Counter]:
    """Map a raw answer to a ``source="cloud"`` Detections record plus the dropped labels.

    Boxes are clipped to the image (xyxy pixels); boxes with no area left are dropped under
    the tag ``DEGENERATE_BOX``. Probabilities: the backend's own (N, K+1) when it gave them,
    otherwise the class-only rule of ``schema.class_only_probs``.

    Returns:
        (record with N' <= N boxes, Counter of normalised dropped label -> count)
    """
    k = cmap.num_classes
    boxes = np.asarray(answer.boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    dropped: Counter = Counter()
    keep, labels = [], []
    for i, phrase in enumerate(answer.phrases):
        category = cmap.category_of(phrase)
        if category is None and answer.probs is not None:
            # A phrase naming no category (a compound like "person rider") takes its
            # most probable one; a named phrase keeps its category even when it is the
            # box's second choice (per-class outputs: car 0.8 / truck 0.35 on one box).
            category = int(np.argmax(answer.probs[i][:k]))
        if category is None:
            dropped[normalise(phrase)] += 1
        elif boxes[i, 2] <= boxes[i, 0] or boxes[i, 3] <= boxes[i, 1]:
            dropped[DEGENERATE_BOX] += 1
        else:
            keep.append(i)
            labels.append(category)
    idx = np.asarray(keep, np.int64)
    scores = np.asarray(answer.scores, np.float32).reshape(-1)[idx]
    label_arr = np.asarray(labels, np.int64)
    if answer.probs is not None:
        probs = np.asarray(answer.probs, np.float32).reshape(len(answer.phrases), k + 1)[idx]
    else:
        probs = class_only_probs(label_arr, scores, k)
    record = Detections(image_id, uri, width, height, boxes[idx], label_arr, scores, probs,
                        SOURCE_CLOUD)
    return record, dropped
