"""One function per pipeline stage: ``stage_<name>(cfg, run) -> info for the manifest``.

Each reads its inputs from the run directory (local or s3://) and writes its outputs there;
``coin_ray.ray.pipeline`` decides which stages run and records them in the manifest.
"""

from __future__ import annotations

from typing import Any

from coin_ray import storage
from coin_ray.cloud.clip_score import clip_baseline
from coin_ray.config import Config
from coin_ray.data.images import load_image
from coin_ray.evaluate import EvalResult, evaluate
from coin_ray.run import RunDir
from coin_ray.schema import Detections, table_to_records

# Table 1 rows: method name -> where its detections on the val split come from.
TABLE1_ROWS = {"Cloud det": "collect/cloud.parquet", "CLIP": "collect/clip.parquet",
               "CLIP det": "clip_det/detections.parquet", "COIN": "eval/coin.parquet"}


def stage_collect(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Cloud detections and CLIP scores for the target train images and the val split."""
    from coin_ray.ray.collect import run_collection
    from coin_ray.ray.pipeline import demo_cloud, target_uris, val_split

    uris = target_uris(cfg)
    split = val_split(cfg)
    if split is not None:
        uris = sorted(set(uris) | set(split.uris()))
    with demo_cloud(cfg) as live_cfg:
        summary = run_collection(live_cfg, uris, run.path("collect"))
    return {"images": len(uris), "calls": summary.get("calls"), "errors": summary.get("errors")}


def stage_disseminate(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Pre-train the CLIP detector on the cloud's boxes (CLIP's or the cloud's labels; Ray Train)."""
    from coin_ray.ray.disseminate import run_disseminate

    return {"model": run_disseminate(cfg, run.root)}


def stage_clip_det(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Run the pre-trained CLIP detector on every target image and the val split."""
    from coin_ray.ray.detect import run_detection
    from coin_ray.ray.pipeline import target_uris, val_split

    uris = target_uris(cfg)
    split = val_split(cfg)
    if split is not None:
        uris = sorted(set(uris) | set(split.uris()))
    out = run.path("clip_det", "detections.parquet")
    run_detection(cfg, run.path("disseminate", "model.pt"), uris, out, source="clip_det")
    return {"images": len(uris)}


def stage_distill(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Distil the target detector with the COIN losses and the CKG (Ray Train)."""
    from coin_ray.ray.distill import run_distill

    return {"model": run_distill(cfg, run.root)}


def _records(run: RunDir, rel: str) -> list[Detections] | None:
    uri = run.path(rel)
    if not storage.exists(uri):
        return None
    return [r for r in table_to_records(storage.read_parquet(uri)) if r.ok]


def evaluate_rows(cfg: Config, run: RunDir) -> dict[str, EvalResult]:
    """Table 1 rows for every method whose val detections exist."""
    from coin_ray.ray.pipeline import val_split

    split = val_split(cfg)
    results = {}
    for method, rel in TABLE1_ROWS.items():
        records = _records(run, rel)
        if records is not None and method == "CLIP":  # boxes CLIP calls background are no detections
            records = [clip_baseline(r) for r in records]
        if records is not None:
            results[method] = evaluate(split, records)
    return results


def stage_evaluate(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Detect with the target detector on the val split, then Table 1 and the report."""
    from coin_ray.ray.detect import run_detection
    from coin_ray.ray.pipeline import val_split
    from coin_ray.report import write_report

    split = val_split(cfg)
    if split is None:
        print("[coin-ray] no labelled target split (data.val_annotations): skipping Table 1")
        return {"skipped": "no labelled split"}
    run_detection(cfg, run.path("distill", "model.pt"), split.uris(), run.path("eval", "coin.parquet"),
                  source="coin")
    results = evaluate_rows(cfg, run)
    write_report(cfg, run, split, results)
    return {"map50": {m: round(r.map50, 2) for m, r in results.items()}}


def stage_export(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Export the target detector for deployment (TorchScript) and check it against eager."""
    from coin_ray.export import export_detector

    return export_detector(run.path("distill", "model.pt"), run.path("export"), example_uri=_first_image(cfg))


def _first_image(cfg: Config) -> str:
    from coin_ray.ray.pipeline import target_uris

    for uri in target_uris(cfg):
        try:
            load_image(uri)
            return uri
        except Exception:  # noqa: BLE001 (any unreadable file: try the next one)
            continue
    raise FileNotFoundError(f"no readable image under {cfg.data.target_images}")
