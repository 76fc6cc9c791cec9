"""Beyond the paper: each source's confusions, estimated from the sources alone (Dawid-Skene).

The paper's CKG learns to arbitrate a disagreement from the consistent set only, so a class
that one source systematically calls by another name (the cloud's "rider" -> "person") is
never confirmed and never taught. Dawid and Skene (1979) estimate, by EM over the items
several annotators labelled, each annotator's confusion matrix and every item's posterior
over the true class, from the annotators' agreements alone. Here an item is a cloud box and
there are three annotators (``SOURCES``):

    cloud     the cloud detector's label
    clip      CLIP's zero-shot label of the cloud box's crop (the collection's "clip" record)
    clip_det  the label of the CLIP-detector box matched to it (one to one, as in separation)

Labels and classes run over K+1 values: index K is "background" (CLIP calls the crop
background; the CLIP detector has no box there; the box holds no object). The cloud never
says K. Ground truth is never read here; benchmarks compare the estimate with it.

``cloud_annotations`` gathers the three labels of every box, ``estimate_source_confusions``
runs the EM on them, and ``corrected_cloud`` turns the estimate into what distillation learns
from (fusion ``ds``): each cloud box carries its posterior over the true class given all
three labels as its probs, and takes the posterior's class as its label where that class is
an object and at least ``threshold`` sure. A rider the cloud calls person, but CLIP's crop and the CLIP
detector call rider, is then a rider: agreed with the detector, it reaches the consistent set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from coin_ray.boxes import match_one_to_one
from coin_ray.schema import Detections

SOURCES = ("cloud", "clip", "clip_det")
MISSING = -1  # an annotator that did not label an item


@dataclass(frozen=True)
class SourceConfusions:
    """The Dawid-Skene estimate over L = K+1 classes (index K: background).

    ``prior`` (L,): p(true class); ``confusion`` (J, L, L): row z of source j is
    p(source j says l | true class z), each row sums to 1; ``items`` the boxes it was
    estimated on; ``iterations`` the EM iterations run.
    """

    prior: np.ndarray
    confusion: np.ndarray
    items: int
    iterations: int
    sources: tuple[str, ...] = SOURCES

    def source(self, name: str) -> np.ndarray:
        """(L, L) confusion of the named source."""
        return self.confusion[self.sources.index(name)]

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready: prior and per-source confusion as nested lists (rows: true class)."""
        names = list(class_names) + ["background"] if class_names is not None else None
        return {"sources": list(self.sources), "classes": names, "items": self.items,
                "iterations": self.iterations, "prior": self.prior.round(6).tolist(),
                "confusion": {s: self.confusion[j].round(6).tolist() for j, s in enumerate(self.sources)}}

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> "SourceConfusions":
        """Inverse of ``to_dict``."""
        sources = tuple(blob["sources"])
        return cls(np.asarray(blob["prior"], np.float64),
                   np.stack([np.asarray(blob["confusion"][s], np.float64) for s in sources]),
                   int(blob["items"]), int(blob["iterations"]), sources)


def majority_posterior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, L): each item's share of votes per class (the EM's start); an item nobody
    labelled gets a uniform row. labels (N, J) int in [0, L) or MISSING."""
    votes = np.zeros((len(labels), num_classes))
    for column in labels.T:
        seen = column != MISSING
        votes[np.flatnonzero(seen), column[seen]] += 1.0
    total = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, total, out=np.full_like(votes, 1.0 / num_classes), where=total > 0)


def m_step(labels: np.ndarray, posterior: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """(prior (L,), confusion (J, L, L)) maximising the expected likelihood under
    ``posterior`` (N, L), with ``smoothing`` pseudo-counts in every confusion cell."""
    n, num_classes = posterior.shape
    prior = posterior.sum(axis=0) / max(n, 1)
    confusion = np.full((labels.shape[1], num_classes, num_classes), smoothing)
    for j, column in enumerate(labels.T):
        seen = column != MISSING
        for label in range(num_classes):
            confusion[j, :, label] += posterior[seen & (column == label)].sum(axis=0)
    rows = confusion.sum(axis=2, keepdims=True)
    confusion = np.divide(confusion, rows, out=np.full_like(confusion, 1.0 / num_classes), where=rows > 0)
    return prior, confusion


def e_step(labels: np.ndarray, prior: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """(N, L) p(true class | the item's labels) under (prior, confusion); MISSING labels skipped."""
    with np.errstate(divide="ignore"):
        log_post = np.tile(np.log(prior), (len(labels), 1))
        log_conf = np.log(confusion)
    for j, column in enumerate(labels.T):
        seen = column != MISSING
        log_post[seen] += log_conf[j][:, column[seen]].T
    log_post -= log_post.max(axis=1, keepdims=True)
    post = np.exp(log_post)
    return post / post.sum(axis=1, keepdims=True)


def dawid_skene(labels: np.ndarray, num_classes: int, *, sources: Sequence[str] = SOURCES,
                smoothing: float = 0.01, max_iterations: int = 100, tolerance: float = 1e-7) -> SourceConfusions:
    """Estimate each annotator's confusion matrix by EM (Dawid and Skene, 1979).

    Args:
        labels: (N, J) int, annotator j's label of item n in [0, num_classes), or MISSING.
        num_classes: L, the number of classes (K+1 here).
        smoothing: pseudo-count added to every confusion cell (0 for the exact estimate).
    Returns:
        ``SourceConfusions``; EM starts from the majority vote and stops when no posterior
        entry moves by more than ``tolerance``.
    """
    labels = np.asarray(labels, np.int64)
    if labels.ndim != 2 or labels.shape[1] != len(sources):
        raise ValueError(f"labels of shape {labels.shape} for {len(sources)} annotators ({', '.join(sources)})")
    posterior = majority_posterior(labels, num_classes)
    prior, confusion = m_step(labels, posterior, smoothing)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        updated = e_step(labels, prior, confusion)
        prior, confusion = m_step(labels, updated, smoothing)
        moved = float(np.abs(updated - posterior).max()) if len(updated) else 0.0
        posterior = updated
        if moved <= tolerance:
            break
    return SourceConfusions(prior, confusion, len(labels), iterations, tuple(sources))


def box_annotations(cloud: Detections, clip: Detections | None, clip_det: Detections | None, *,
                    min_score: float, min_clip_score: float, match_iou: float) -> np.ndarray:
    """(N, 3) labels of one image's cloud boxes scoring >= ``min_score`` (``SOURCES`` order).

    clip: the collection's CLIP record of the same boxes (argmax over K+1), or None (MISSING);
    clip_det: the CLIP detector's record, its boxes scoring >= ``min_clip_score`` matched one
    to one as in separation (an unmatched cloud box gets K), or None (MISSING).
    """
    k = cloud.probs.shape[1] - 1 if cloud.probs.ndim == 2 and cloud.probs.shape[1] else None
    keep = np.asarray(cloud.scores) >= min_score
    n = int(keep.sum())
    out = np.full((n, 3), MISSING, np.int64)
    out[:, 0] = np.asarray(cloud.labels)[keep]
    if clip is not None and len(clip) == len(cloud) and len(cloud):
        out[:, 1] = np.asarray(clip.probs).argmax(axis=1)[keep]
    if clip_det is not None and clip_det.ok and k is not None:
        det_keep = np.asarray(clip_det.scores) >= min_clip_score
        det_boxes = torch.as_tensor(np.asarray(clip_det.boxes, np.float32).reshape(-1, 4)[det_keep])
        det_labels = torch.as_tensor(np.asarray(clip_det.labels, np.int64)[det_keep])
        pairs = match_one_to_one(torch.as_tensor(np.asarray(cloud.boxes, np.float32).reshape(-1, 4)[keep]),
                                 det_boxes, match_iou, labels_a=torch.as_tensor(out[:, 0]), labels_b=det_labels)
        out[:, 2] = k
        out[pairs[:, 0].numpy(), 2] = det_labels[pairs[:, 1]].numpy()
    return out


def box_posteriors(labels: np.ndarray, confusions: SourceConfusions) -> np.ndarray:
    """(N, L) p(true class | the box's labels (N, J), as ``box_annotations`` gives them)."""
    return e_step(np.asarray(labels, np.int64).reshape(-1, len(confusions.sources)), confusions.prior,
                  confusions.confusion)


def corrected_record(cloud: Detections, posterior: np.ndarray, min_score: float, threshold: float) -> Detections:
    """``cloud`` with its boxes scoring >= ``min_score`` (in order) corrected by ``posterior``
    (their (n, K+1) posteriors): probs become the posterior; the label becomes the posterior's
    class where that is an object class (< K) with probability >= ``threshold``."""
    keep = np.flatnonzero(np.asarray(cloud.scores) >= min_score)
    labels, probs = np.array(cloud.labels, np.int64), np.array(cloud.probs, np.float32)
    if len(keep) == 0:
        return cloud
    best, sure = posterior.argmax(axis=1), posterior.max(axis=1) >= threshold
    relabel = sure & (best < posterior.shape[1] - 1)
    labels[keep[relabel]] = best[relabel]
    probs[keep] = posterior
    return replace(cloud, labels=labels, probs=probs)


def cloud_annotations(cloud: list[Detections], clip: list[Detections], clip_det: list[Detections], *,
                      min_score: float, min_clip_score: float, match_iou: float) -> list[np.ndarray | None]:
    """Per record of ``cloud``: its boxes' labels by ``SOURCES`` (``box_annotations``; the
    other sources' records matched by uri), or None for an error record or one with no box."""
    clip_by_uri = {r.uri: r for r in clip if r.ok}
    det_by_uri = {r.uri: r for r in clip_det if r.ok}
    return [box_annotations(r, clip_by_uri.get(r.uri), det_by_uri.get(r.uri), min_score=min_score,
                            min_clip_score=min_clip_score, match_iou=match_iou) if r.ok and len(r) else None
            for r in cloud]


def estimate_source_confusions(annotations: list[np.ndarray | None], num_classes: int) -> SourceConfusions:
    """Dawid-Skene over every annotated box (``cloud_annotations``); num_classes: K, the
    estimate is over K+1 classes."""
    rows = [a for a in annotations if a is not None]
    labels = np.concatenate(rows) if rows else np.zeros((0, len(SOURCES)), np.int64)
    return dawid_skene(labels, num_classes + 1)


def corrected_cloud(cloud: list[Detections], annotations: list[np.ndarray | None], confusions: SourceConfusions, *,
                    min_score: float, threshold: float) -> list[Detections]:
    """The cloud's records corrected by the sources' estimated confusions: each record with
    its ``annotations`` (``cloud_annotations``) through ``corrected_record``; records without
    annotations pass as they are."""
    return [r if a is None else corrected_record(r, box_posteriors(a, confusions), min_score, threshold)
            for r, a in zip(cloud, annotations)]
