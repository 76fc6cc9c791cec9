"""Label one image end to end (read, decode, ask, map) and add up what a run did.

Pure Python: the Ray collection (``coin_ray.ray.collect``) calls these per row, and so can
any other loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from coin_ray import storage
from coin_ray.cloud.client import BUDGET, SKIPPED, CloudClient
from coin_ray.cloud.mapping import CategoryMap, answer_to_detections
from coin_ray.data.images import ImageDecodeError, decode_image
from coin_ray.progress import MAX_NAMED
from coin_ray.schema import SOURCE_CLOUD, Detections


@dataclass
class Labelled:
    """One image's cloud record plus what it cost (the per-row facts the summary adds up)."""

    record: Detections
    image_bytes: bytes = b""
    calls: int = 0
    cache_hit: bool = False
    reason: str = ""
    dropped: Counter = field(default_factory=Counter)
    unfinished: bool = False  # not answered, and a re-run asks it again (``Outcome.unfinished``)


def label_image(client: CloudClient, cmap: CategoryMap, uri: str, image_id: str) -> Labelled:
    """Read ``uri``, ask the backend (cache first), map labels; failures become error records.

    Raises:
        AuthError: credentials refused; the run must stop.
    """
    try:
        data = storage.read_bytes(uri)
        image = decode_image(data, uri)
    except (ImageDecodeError, OSError) as err:
        record = Detections.empty(image_id, uri, 0, 0, SOURCE_CLOUD, cmap.num_classes,
                                  f"image: {err}")
        return Labelled(record, reason="image")
    h, w = image.shape[:2]
    outcome = client.ask(data, image)
    if outcome.answer is None:
        record = Detections.empty(image_id, uri, w, h, SOURCE_CLOUD, cmap.num_classes, outcome.error)
        return Labelled(record, data, outcome.calls, False, outcome.reason,
                        unfinished=outcome.unfinished)
    record, dropped = answer_to_detections(outcome.answer, cmap, image_id, uri, w, h)
    return Labelled(record, data, outcome.calls, outcome.cache_hit, "", dropped)


@dataclass
class RunTally:
    """Running totals of a collection; ``as_dict`` is the body of summary.json."""

    images: int = 0
    errors: int = 0
    calls: int = 0
    cache_hits: int = 0
    boxes: int = 0
    skipped_failed: int = 0  # failed in an earlier run: not asked again (no retry_failed)
    not_asked_budget: int = 0  # the spend cap was reached before they were asked
    unfinished: int = 0  # not answered and asked again by a re-run (budget, gave up, ...)
    errors_by_reason: Counter = field(default_factory=Counter)
    dropped_labels: Counter = field(default_factory=Counter)
    # (uri, error) of the first failed images, to name on the console; BUDGET ones are not
    # failures of the image (the budget line counts them)
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed: int = 0

    def add(self, record: Detections, calls: int, cache_hit: bool, reason: str,
            dropped: dict[str, int], unfinished: bool = False) -> None:
        self.images += 1
        self.unfinished += int(unfinished)
        self.calls += calls
        self.cache_hits += int(cache_hit)
        self.boxes += len(record)
        if record.error:
            self.errors += 1
            self.errors_by_reason[reason or "unknown"] += 1
            self.skipped_failed += int(reason == SKIPPED)
            self.not_asked_budget += int(reason == BUDGET)
            if reason != BUDGET:
                self.failed += 1
                if len(self.failures) < MAX_NAMED:
                    self.failures.append((record.uri, record.error))
        self.dropped_labels.update(dropped)

    def as_dict(self, price_per_call: float = 0.0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.images, "answered": self.images - self.errors, "errors": self.errors,
            "errors_by_reason": dict(self.errors_by_reason), "calls": self.calls,
            "cache_hits": self.cache_hits, "boxes": self.boxes,
            "skipped_failed": self.skipped_failed, "not_asked_budget": self.not_asked_budget,
            "unfinished": self.unfinished,
            "dropped_labels": dict(self.dropped_labels),
            "dropped_total": sum(self.dropped_labels.values())}
        if price_per_call > 0:
            out["price_per_call"] = price_per_call
            out["money_spent"] = round(self.calls * price_per_call, 6)
        return out

