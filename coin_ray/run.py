"""A run's storage: where each stage writes, and the manifest of finished stages.

The cloud answer cache lives beside the runs, at ``<storage>/cache`` (unless
``cloud.cache`` says otherwise), so no run ever pays twice for the same image.

Layout under ``<storage>/<run_id>`` (local folder or s3:// prefix):

    config.yaml                    the run's config (token env-var names only, never values)
    manifest.json                  {"stages": {stage: {"finished_at": ..., **info}}}
    collect/cloud.parquet          cloud detections (Detections, source="cloud")
    collect/clip.parquet           CLIP scores of the cloud boxes (source="clip")
    collect/summary.json           calls, cache hits, errors, cost
    disseminate/model.pt           the CLIP detector (stage 1)
    clip_det/detections.parquet    CLIP-detector detections (source="clip_det")
    distill/model.pt               the target detector (stage 3)
    eval/<method>.parquet          detections on the labelled target split
    report/                        metrics.json, table1.md, plots
    export/                        the deployable model

A stage counts as done only once its manifest entry is written, which happens after all
its outputs are: a killed stage re-runs from its own checkpoints, never half-used.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from coin_ray import storage

STAGES = ("collect", "disseminate", "clip_det", "distill", "evaluate", "export")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; ``root`` is a local folder or an s3:// prefix."""

    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def manifest_uri(self) -> str:
        return self.path("manifest.json")

    def manifest(self) -> dict:
        """The manifest, or an empty one when the run has not started."""
        if not storage.exists(self.manifest_uri):
            return {"stages": {}}
        return json.loads(storage.read_text(self.manifest_uri))

    def is_done(self, stage: str) -> bool:
        return stage in self.manifest()["stages"]

    def mark_done(self, stage: str, **info: object) -> None:
        """Record ``stage`` as finished (call after every output of it is written)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        manifest = self.manifest()
        manifest["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        storage.write_text(self.manifest_uri, json.dumps(manifest, indent=2, default=str))

    def forget(self, stage: str) -> None:
        """Mark ``stage`` as not done (used by ``--stages`` to force a re-run)."""
        manifest = self.manifest()
        if manifest["stages"].pop(stage, None) is not None:
            storage.write_text(self.manifest_uri, json.dumps(manifest, indent=2, default=str))

    def first_unfinished(self) -> str | None:
        done = self.manifest()["stages"]
        return next((s for s in STAGES if s not in done), None)
