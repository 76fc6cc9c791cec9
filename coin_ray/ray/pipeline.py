"""The whole adaptation as one resumable run: the glue behind ``jobs/adapt.py``.

``STAGES`` lists the stages in order (the names are ``coin_ray.run.STAGE_NAMES``), each
writing under the run directory (``coin_ray.run.RunDir``) and recorded in its manifest only
once all of its outputs exist:

    collect      cloud detections + CLIP scores of their boxes, train and val images
    disseminate  pre-train the CLIP detector on the cloud detections (Ray Train)
    clip_det     the CLIP detector on every target image (Ray Data)
    distill      train the target detector with the COIN losses and the CKG (Ray Train)
    evaluate     Table 1 on the labelled target split, report folder
    export       the target detector as TorchScript

With an empty ``data.target_images`` the run uses the built-in Foggy-Shapes world
(``coin_ray.demo``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from coin_ray import storage
from coin_ray.config import Config, to_yaml
from coin_ray.demo import PLUMBING_NOTE, is_plumbing_check, with_demo_world
from coin_ray.deploy import serve_command
from coin_ray.location import cache_location, describe, resolve_config
from coin_ray.ray.cluster import check_storage, init_ray
from coin_ray.ray.stages import (stage_clip_det, stage_collect, stage_disseminate, stage_distill,
                                 stage_evaluate, stage_export)
from coin_ray.run import STAGE_NAMES, RunDir, changed_settings, run_dir, stage_settings

log = logging.getLogger("coin_ray.pipeline")

# The adaptation, in run order: stage name -> stage(cfg, run) -> info for the manifest.
STAGES: dict[str, Callable[[Config, RunDir], dict[str, Any]]] = {
    "collect": stage_collect,
    "disseminate": stage_disseminate,
    "clip_det": stage_clip_det,
    "distill": stage_distill,
    "evaluate": stage_evaluate,
    "export": stage_export,
}
if tuple(STAGES) != STAGE_NAMES:  # the manifest's names and this table must not drift apart
    raise RuntimeError(f"pipeline stages {tuple(STAGES)} differ from coin_ray.run.STAGE_NAMES")


@dataclass
class AdaptationResult:
    run_dir: str
    stages_run: list[str] = field(default_factory=list)
    table_markdown: str = ""
    ok: bool = True


def stages_to_run(run: RunDir, requested: list[str] | None, cfg: Config | None = None) -> list[str]:
    """Requested stages are forced to re-run; otherwise the first unfinished stage and every
    stage after it (they depend on it: a collection finished by this run retrains them).

    With ``cfg``, the first finished stage whose recorded settings differ from ``cfg``'s
    (``coin_ray.run.stage_settings``) runs again, and so does every stage after it: a
    changed model or schedule never reuses a detector trained with the old one.
    """
    if requested:
        for stage in requested:
            run.forget(stage)
        return [s for s in STAGES if s in requested]
    if cfg is not None:
        forget_from_changed_stage(run, cfg)
    first = run.first_unfinished()
    if first is None:
        return []
    todo = list(STAGES)[list(STAGES).index(first):]
    stale = [later for later in todo[1:] if run.is_done(later)]
    if stale:
        print(f"[coin-ray] {first} is not finished: running it, then {', '.join(stale)} again", flush=True)
    for later in stale:
        run.forget(later)
    return todo


def forget_from_changed_stage(run: RunDir, cfg: Config) -> str | None:
    """Forget the first done stage that ran with other settings and every later stage; its name."""
    for i, stage in enumerate(STAGES):
        recorded = run.recorded_settings(stage)
        changes = changed_settings(recorded, stage_settings(cfg, stage)) if recorded is not None else []
        if changes:
            print(f"[coin-ray] {stage} ran with other settings ({'; '.join(changes[:3])}"
                  f"{'; ...' if len(changes) > 3 else ''}): running it and every later stage again",
                  flush=True)
            for later in list(STAGES)[i:]:
                run.forget(later)
            return stage
    return None


def run_adaptation(cfg: Config, stages: list[str] | None = None, num_cpus: int | None = None) -> AdaptationResult:
    """Run (or resume) every unfinished stage of the adaptation described by ``cfg``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = with_demo_world(resolve_config(cfg))
    run = run_dir(cfg)
    print(describe(cfg, run.root), flush=True)
    result = AdaptationResult(run.root)
    todo = stages_to_run(run, stages, cfg)
    if todo:
        init_ray(num_cpus or cfg.ray.num_cpus or None)
        check_storage(cfg.storage)
        if "collect" in todo:
            check_storage(cache_location(cfg), key="cloud.cache")
    else:
        print(f"[coin-ray] every stage of {run.root} is done: nothing to run "
              "(--stages names stages to run again)", flush=True)
    storage.write_text(run.config, to_yaml(cfg))
    for stage in todo:
        start = time.monotonic()
        print(f"[coin-ray] stage {stage} ...", flush=True)
        info = STAGES[stage](cfg, run)
        run.mark_done(stage, seconds=round(time.monotonic() - start, 1),
                      settings=stage_settings(cfg, stage), **(info or {}))
        result.stages_run.append(stage)
        print(f"[coin-ray] stage {stage} done in {time.monotonic() - start:.0f} s", flush=True)
        if not run.is_done(stage):
            print(f"[coin-ray] {stage} left {info['unfinished']} images unasked or unanswered: "
                  "the next run asks them first, then runs every later stage again", flush=True)
    result.table_markdown = storage.read_text(run.table1) if storage.exists(run.table1) else ""
    print("\n".join(closing_lines(cfg, run, result.table_markdown)), flush=True)
    return result


def closing_lines(cfg: Config, run: RunDir, table: str) -> list[str]:
    """What a run prints at its end: Table 1 (when there is one), the report and TensorBoard
    folders (only those that exist), and where the run and its answer cache live."""
    lines = []
    if table:
        lines.append("\n" + table)
        if is_plumbing_check(cfg) and PLUMBING_NOTE not in table:  # a table from before the note
            lines.append(f"[coin-ray] {PLUMBING_NOTE}")
    if storage.exists(run.report_dir):
        lines.append(f"report: {run.report_dir}")
    if storage.exists(run.tensorboard):  # a collect-only run has written none
        lines.append(f"TensorBoard (every stage and the evaluation): tensorboard --logdir {run.tensorboard}")
    if run.is_done("export"):  # the run's promise is an endpoint: say how to get it
        lines.append(f"serve this detector (Ray Serve, http protocol on 127.0.0.1:8000): {serve_command(run.root)}")
    return lines + [describe(cfg, run.root)]
