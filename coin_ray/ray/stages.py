"""One function per pipeline stage: ``stage_<name>(cfg, run) -> info for the manifest``.

Each reads its inputs from the run directory (local or s3://) and writes its outputs there;
``coin_ray.ray.pipeline.STAGES`` lists them in order and records them in the manifest.
"""

from __future__ import annotations

from typing import Any

from coin_ray import storage
from coin_ray.cloud.clip_score import clip_baseline
from coin_ray.config import Config
from coin_ray.data.datasets import target_uris, val_split
from coin_ray.data.images import load_image
from coin_ray.data_check import (MIN_BOXES_PER_CATEGORY, MIN_CONSISTENT_PAIRS, category_counts,
                                 consistent_counts, too_few)
from coin_ray.demo import PLUMBING_NOTE, demo_cloud, is_plumbing_check
from coin_ray.evaluate import EvalResult, evaluate
from coin_ray.export import export_detector
from coin_ray.ray.collect import run_collection
from coin_ray.ray.detect import run_detection
from coin_ray.ray.disseminate import run_disseminate
from coin_ray.ray.distill import distill_images, run_distill
from coin_ray.ray.train import stage_uris
from coin_ray.report import write_report, write_training_plots
from coin_ray.run import RunDir
from coin_ray.schema import Detections, table_to_records
from coin_ray.train.data import clip_det_records, cloud_records
from coin_ray.train.schedule import resolve_length


def table1_rows(run: RunDir) -> dict[str, str]:
    """Table 1 rows: method name -> the uri of its detections on the val split."""
    return {"Cloud det": run.cloud_detections, "CLIP": run.clip_scores,
            "CLIP det": run.clip_detections, "COIN": run.eval("coin")}


def detection_uris(cfg: Config) -> list[str]:
    """The target training images and, when there is one, the labelled split's images."""
    uris = target_uris(cfg)
    split = val_split(cfg)
    if split is not None:
        uris = sorted(set(uris) | set(split.uris()))
    return uris


def stage_collect(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Cloud detections and CLIP scores for the target train images and the val split."""
    uris = detection_uris(cfg)
    with demo_cloud(cfg) as live_cfg:
        summary = run_collection(live_cfg, uris, run)
    info = {"images": len(uris), "calls": summary.get("calls"), "errors": summary.get("errors")}
    if summary.get("unfinished"):  # not done: the next run asks these first (RunDir.is_done)
        info["unfinished"] = summary["unfinished"]
    return info


def stage_disseminate(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Pre-train the CLIP detector on the cloud's boxes (CLIP's or the cloud's labels; Ray Train),
    after one warning line when a category has few boxes above ``min_cloud_score`` (or none has any)."""
    counts = check_cloud_boxes(cfg, run)
    return {"model": run_disseminate(cfg, run), "boxes": counts}


def check_cloud_boxes(cfg: Config, run: RunDir) -> dict[str, int]:
    """Cloud boxes per category on the training images (above ``min_cloud_score``); prints one
    warning line when some category has few (``coin_ray.data_check.too_few``)."""
    records = cloud_records(run, target_uris(cfg) if cfg.data.target_images else None)
    counts = category_counts(records, cfg.data.categories, cfg.train.disseminate.min_cloud_score)
    _warn(too_few(f"cloud boxes to train on ({len(records)} images, score >= "
                  f"{cfg.train.disseminate.min_cloud_score:g})", counts, MIN_BOXES_PER_CATEGORY))
    return counts


def stage_clip_det(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Run the pre-trained CLIP detector on every target image and the val split."""
    uris = detection_uris(cfg)
    run_detection(cfg, run.clip_detector, uris, run.clip_detections, source="clip_det")
    return {"images": len(uris)}


def stage_distill(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Distil the target detector with the COIN losses and the CKG (Ray Train); warns first
    when the consistent set (cloud and CLIP detector agree) is small in some category."""
    d = cfg.train.distill
    teacher = clip_det_records(run)  # [] when clip_det is older than the CLIP detector: not counted
    counts = consistent_counts(cloud_records(run, target_uris(cfg) if cfg.data.target_images else None),
                               teacher, cfg.data.categories, min_score=d.min_score,
                               min_clip_score=d.min_clip_score, iou=d.match_iou) if teacher else None
    if counts is not None:
        _warn(too_few("consistent boxes (cloud and CLIP detector agree)", counts, MIN_CONSISTENT_PAIRS,
                      if_none="the distillation learns from the inconsistent and private boxes only"))
    return {"model": run_distill(cfg, run), **({"consistent_at_start": counts} if counts else {})}


def _warn(line: str | None) -> None:
    if line:
        print(line, flush=True)


def _records(uri: str) -> list[Detections] | None:
    if not storage.exists(uri):
        return None
    return [r for r in table_to_records(storage.read_parquet(uri)) if r.ok]


def evaluate_rows(cfg: Config, run: RunDir) -> dict[str, EvalResult]:
    """Table 1 rows for every method whose val detections exist."""
    split = val_split(cfg)
    wanted = set(split.uris())  # collect/*.parquet also holds the training images
    results = {}
    for method, uri in table1_rows(run).items():
        records = _records(uri)
        if records is not None and method == "CLIP":  # boxes CLIP calls background are no detections
            records = [clip_baseline(r) for r in records]
        if records is not None:
            results[method] = evaluate(split, [r for r in records if r.uri in wanted])
    return results


def stage_evaluate(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Detect with the target detector on the val split, then Table 1 and the report."""
    # The report marks burn-up on the loss curves: at the step the distill stage resolved.
    trained, _ = resolve_length(cfg, "distill", distill_images(run, stage_uris(cfg)), cfg.ray.num_workers)
    split = val_split(cfg)
    if split is None:
        plots = write_training_plots(trained, run)  # the training curves need no labels
        print("[coin-ray] no labelled target split (data.val_annotations): skipping Table 1"
              + (f"; training plots in {run.report_dir}" if plots else ""))
        return {"skipped": "no labelled split", "plots": len(plots)}
    run_detection(cfg, run.target_detector, split.uris(), run.eval("coin"), source="coin")
    results = evaluate_rows(cfg, run)
    write_report(trained, run, split, results, note=PLUMBING_NOTE if is_plumbing_check(cfg) else "")
    return {"map50": {m: round(r.map50, 2) for m, r in results.items()}}


def stage_export(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Export the target detector (TorchScript, and ONNX with the extra); check both against
    eager on the labelled val images when there are some."""
    split = val_split(cfg)
    return export_detector(run.target_detector, run.export_dir, example_uri=_first_image(cfg),
                           check_uris=split.uris() if split is not None else None)


def _first_image(cfg: Config) -> str:
    for uri in target_uris(cfg):
        try:
            load_image(uri)
            return uri
        except Exception:  # noqa: BLE001 (any unreadable file: try the next one)
            continue
    raise FileNotFoundError(f"no readable image under {cfg.data.target_images}")
