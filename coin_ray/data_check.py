"""Is there enough to train on? Checked on the driver before each training stage.

    counts = category_counts(records, categories, min_score=0.3)   # {"car": 12, "person": 0}
    line = too_few("cloud boxes to train on", counts, MIN_BOXES_PER_CATEGORY)

A run once trained and exported from a single cloud box, with nothing on the console to say
so. ``too_few`` gives one warning line with the counts per category, and says "nothing to
train on" when every count is 0. A warning, not a stop: a small category can still be what the
user wants to try, and the built-in tiny world (a plumbing check) has an untrained stand-in
cloud whose boxes all score under ``train.disseminate.min_cloud_score``, yet must run every
stage. An empty consistent set is only small, too: the distillation still learns from the
inconsistent and private boxes.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from coin_ray.schema import Detections
from coin_ray.separate import as_source, separate

MIN_BOXES_PER_CATEGORY = 5  # fewer training boxes than this for a category: warn
MIN_CONSISTENT_PAIRS = 5  # the consistent set is the distillation's most trusted signal


def category_counts(records: Iterable[Detections], categories: list[str],
                    min_score: float = 0.0) -> dict[str, int]:
    """Boxes per category over ``records`` (labels in [0, K)), counting scores >= ``min_score``."""
    counts = np.zeros(len(categories), dtype=np.int64)
    for r in records:
        labels = r.labels[r.scores >= min_score]
        counts += np.bincount(labels, minlength=len(categories))[:len(categories)]
    return dict(zip(categories, (int(n) for n in counts)))


def consistent_counts(cloud: list[Detections], clip_det: list[Detections], categories: list[str], *,
                      min_score: float, min_clip_score: float, iou: float) -> dict[str, int]:
    """Consistent pairs per category when the teacher is the CLIP detector of the clip_det
    stage, as the distillation's first step separates them (``coin_ray.separate``)."""
    k = len(categories)
    by_uri = {r.uri: r for r in clip_det if r.ok}
    counts = np.zeros(k, dtype=np.int64)
    for record in cloud:
        det = by_uri.get(record.uri)
        if det is None:
            continue
        c = as_source(record, min_score, k)
        sep = separate(c, as_source(det, min_clip_score, k), iou_threshold=iou)
        counts += np.bincount(sep.consistent.cloud_labels.numpy(), minlength=k)[:k]
    return dict(zip(categories, (int(n) for n in counts)))


NOTHING_TO_TRAIN_ON = ("nothing to train on; check cloud.prompts, cloud.label_map and cloud.threshold, "
                      "or add images")


def too_few(what: str, counts: dict[str, int], minimum: int, if_none: str = NOTHING_TO_TRAIN_ON) -> str | None:
    """One warning line naming every category under ``minimum``; None when all have enough.

    When every count is 0 the line ends with ``if_none`` (what it means, what to change)."""
    low = [name for name, n in counts.items() if n < minimum]
    if not low:
        return None
    if sum(counts.values()) == 0:
        return f"[coin-ray] warning: 0 {what} ({_shown(counts)}): {if_none}"
    return (f"[coin-ray] warning: few {what}: {_shown(counts)} ({len(low)} of {len(counts)} "
            f"categories under {minimum}); the detector will learn little of {', '.join(low)}")


def _shown(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())
