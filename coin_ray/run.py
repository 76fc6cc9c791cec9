"""A run's storage: where each stage writes, and the manifest of finished stages.

The cloud answer cache and its spend ledger are not here: one per user, shared by every run
(``coin_ray.location.cache_location``), so no run ever pays twice for the same image.

Layout under ``<storage>/<run_id>`` (local folder or s3:// prefix); ``RunDir`` names every
one of these, and no other module spells them:

    config.yaml                    the run's config (token env-var names only, never values)
    manifest.json                  {"stages": {stage: {"finished_at": ..., **info}}}
    collect/cloud.parquet          cloud detections (Detections, source="cloud")
    collect/clip.parquet           CLIP scores of the cloud boxes (source="clip")
    collect/summary.json           calls, cache hits, errors, cost
    collect/spend.json             (older versions) the run's spend ledger, now counted in the cache's
    collect/cloud_coco*.json       the cloud labels as COCO (+ as COCO results)
    disseminate/model.pt           the CLIP detector (stage 1)
    disseminate/metrics.jsonl      its per-step losses
    clip_det/detections.parquet    CLIP-detector detections (source="clip_det")
    distill/model.pt               the target detector (stage 3)
    distill/metrics.jsonl, tb/     its per-step losses, as JSON lines and for TensorBoard
    distill/sets.json              boxes per set and class, the fusion's statistics, the estimated
                                   source confusions (fusion ds)
    eval/<method>.parquet          detections on the labelled target split
    eval/cloud_label_student.json  the cloud-label student's cut s and mAP50 per cut (report.cloud_label_student)
    report/                        metrics.json, table1.md, plots
    export/                        the deployable model
    tune/                          sweeps of the distillation stage

A stage counts as done only once its manifest entry is written, which happens after all
its outputs are: a killed stage re-runs from its own checkpoints, never half-used. A
collection that left images unasked (the spend cap) or unanswered is recorded with
``"unfinished": n`` and is not done: the next run asks the rest first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from coin_ray import storage
from coin_ray.config import DEFAULT_EPOCHS, Config, to_dict, with_updates

# The stages in run order; coin_ray.ray.pipeline.STAGES maps each to its function.
STAGE_NAMES = ("collect", "disseminate", "clip_det", "distill", "evaluate", "export")

MODEL_FILE = "model.pt"  # what each training stage writes in its folder
# What Ray Train writes beside it (RunConfig(name=<stage>, storage_path=<run>)).
CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_INDEX = "checkpoint_manager_snapshot.json"


def _artefact(*parts: str) -> property:
    """A ``RunDir`` attribute giving the uri of ``<root>/<parts>``."""
    return property(lambda run: run.path(*parts), doc=f"<run>/{'/'.join(parts)}")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; ``root`` is a local folder or an s3:// prefix."""

    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # -- the artefacts, stage by stage (each a uri under the root) ----------------------

    config = _artefact("config.yaml")
    collect_dir = _artefact("collect")
    cloud_detections = _artefact("collect", "cloud.parquet")  # DETECTION_SCHEMA, source "cloud"
    clip_scores = _artefact("collect", "clip.parquet")  # CLIP's zero-shot scores of the cloud boxes
    collect_summary = _artefact("collect", "summary.json")
    collect_spend = _artefact("collect", "spend.json")  # older versions' ledger (read once, into the cache's)
    cloud_coco = _artefact("collect", "cloud_coco.json")
    clip_detector = _artefact("disseminate", MODEL_FILE)  # the disseminated CLIP detector
    clip_detections = _artefact("clip_det", "detections.parquet")  # source "clip_det", every image
    target_detector = _artefact("distill", MODEL_FILE)  # the distilled target detector
    distill_sets = _artefact("distill", "sets.json")  # coin_ray.train.distill.distill_meta, as JSON
    tensorboard = _artefact("tensorboard")  # every stage's events: tensorboard --logdir <this>
    cloud_label_choice = _artefact("eval", "cloud_label_student.json")  # its s, chosen on the val split
    report_dir = _artefact("report")
    table1 = _artefact("report", "table1.md")
    report_metrics = _artefact("report", "metrics.json")  # Table 1 as JSON (COIN's val mAP50)
    export_dir = _artefact("export")
    tune_dir = _artefact("tune")

    def model(self, stage: str) -> str:
        """The detector a training stage writes: ``disseminate`` or ``distill``."""
        return self.path(stage, MODEL_FILE)

    def tensorboard_dir(self, stage: str) -> str:
        """``<run>/tensorboard/<stage>``: one stage's (or the evaluation's) TensorBoard events."""
        return self.path("tensorboard", stage)

    def metrics(self, stage: str) -> str:
        """Per-step metrics of a training stage (JSON lines)."""
        return self.path(stage, "metrics.jsonl")

    def eval(self, method: str) -> str:
        """Detections of ``method`` on the labelled target split."""
        return self.path("eval", f"{method}.parquet")

    def relative(self, uri: str) -> str:
        """``uri`` (one of the paths above) relative to the root, for messages."""
        return uri[len(self.path()):].lstrip("/")

    # -- the manifest --------------------------------------------------------------------

    @property
    def manifest_uri(self) -> str:
        return self.path("manifest.json")

    def manifest(self) -> dict:
        """The manifest, or an empty one when the run has not started."""
        if not storage.exists(self.manifest_uri):
            return {"stages": {}}
        return json.loads(storage.read_text(self.manifest_uri))

    def is_done(self, stage: str) -> bool:
        return _finished(self.manifest()["stages"].get(stage))

    def mark_done(self, stage: str, **info: object) -> None:
        """Record ``stage`` as finished (call after every output of it is written)."""
        if stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_NAMES)})")
        manifest = self.manifest()
        manifest["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        storage.write_text(self.manifest_uri, json.dumps(manifest, indent=2, default=str))

    def recorded_settings(self, stage: str) -> dict[str, object] | None:
        """The settings a finished ``stage`` ran with (``stage_settings``); None when the
        stage is not done or was recorded before settings were."""
        return self.manifest()["stages"].get(stage, {}).get("settings")

    def forget(self, stage: str) -> None:
        """Mark ``stage`` as not done, so that it runs again from scratch (``--stages``, or
        changed settings): a training stage's checkpoints go too, or Ray Train would resume
        the old training (at its last step: nothing would be trained again)."""
        manifest = self.manifest()
        if manifest["stages"].pop(stage, None) is not None:
            storage.write_text(self.manifest_uri, json.dumps(manifest, indent=2, default=str))
        for uri in self.checkpoints(stage):
            storage.delete(uri)

    def checkpoints(self, stage: str) -> list[str]:
        """Ray Train's checkpoint folders and their index under ``<run>/<stage>`` (sorted)."""
        fs, path = storage.resolve(self.path(stage))
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(e.base_name for e in entries)
        return [self.path(stage, n) for n in names
                if n.startswith(CHECKPOINT_PREFIX) or n == CHECKPOINT_INDEX]

    def first_unfinished(self) -> str | None:
        done = self.manifest()["stages"]
        return next((s for s in STAGE_NAMES if not _finished(done.get(s))), None)


def _finished(entry: dict | None) -> bool:
    """Whether a manifest entry records a finished stage (not one that left work undone)."""
    return entry is not None and not entry.get("unfinished")


def run_dir(cfg: Config) -> RunDir:
    """The run ``cfg`` describes: ``<storage>/<run_id>``."""
    return RunDir(storage.join(cfg.storage, cfg.resolved_run_id()))


# -- which settings each stage's outputs depend on -------------------------------------------

# What a finished stage was computed from, beyond the run id (which already hashes data,
# cloud and seed, i.e. everything collection depends on). Bookkeeping keys (logging,
# checkpoint cadence) are left out: changing them changes no output.
_LATER_ONLY = ("model.target_backbone",)
_BOOKKEEPING = ("checkpoint_every", "log_every", "eval_every")
# Switches that are off by default are recorded only when on: a run evaluated before the
# switch existed is not evaluated again for it.
_OFF_BY_DEFAULT = ("report.cloud_label_student",)
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "collect": (),
    "disseminate": ("clip", "model", "train.disseminate"),
    "clip_det": ("clip", "model", "train.disseminate"),
    "distill": ("clip", "model", "train.disseminate", "train.distill"),
    "evaluate": ("clip", "model", "train.disseminate", "train.distill", "report"),
    "export": ("clip", "model", "train.disseminate", "train.distill"),
}


def stage_settings(cfg: Config, stage: str) -> dict[str, object]:
    """The flat dotted settings ``stage``'s outputs depend on, e.g. {"model.roi_size": 4, ...}.

    A training length is recorded as written (``epochs``, or ``steps``; the default epochs
    when neither is set), not as the steps it resolves to from the run's images: a change
    of epochs (or of the default) runs the stage again, and so does a switch between
    epochs and steps, even to the same number of steps. Other keys left unset (None) are
    left out, so a stage recorded before such a key existed is not re-run for it.
    """
    flat: dict[str, object] = {}
    tree = to_dict(cfg)
    for section in STAGE_SETTINGS[stage]:
        node: object = tree
        for part in section.split("."):
            node = node[part]  # type: ignore[index]
        for key, value in node.items():  # type: ignore[union-attr]
            name = f"{section}.{key}"
            if key in _BOOKKEEPING or value is None or (name in _LATER_ONLY and stage in ("disseminate", "clip_det")):
                continue
            if name in _OFF_BY_DEFAULT and value is False:
                continue
            flat[name] = list(value) if isinstance(value, tuple) else value
    for name, epochs in DEFAULT_EPOCHS.items():
        section = f"train.{name}"
        if section in STAGE_SETTINGS[stage] and f"{section}.steps" not in flat and f"{section}.epochs" not in flat:
            flat[f"{section}.epochs"] = epochs
    return flat


def changed_settings(recorded: dict[str, object], current: dict[str, object]) -> list[str]:
    """``"key: old -> new"`` for every setting that differs (keys on one side only included)."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k, '(unset)')} -> {current.get(k, '(unset)')}"
            for k in keys if recorded.get(k, "(unset)") != current.get(k, "(unset)")]
