import json

import numpy as np
import pytest

from coin_ray import storage
from coin_ray.data.datasets import GroundTruth, LabelledSplit
from coin_ray.evaluate import evaluate
from coin_ray.report import detection_grid, plot_ap_bars, plot_losses, write_tables
from coin_ray.run import RunDir
from coin_ray.schema import Detections


def test_manifest_marks_stages_in_order(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert run.first_unfinished() == "collect" and not run.is_done("collect")
    run.mark_done("collect", images=3)
    run.mark_done("disseminate")
    assert run.first_unfinished() == "clip_det"
    assert run.manifest()["stages"]["collect"]["images"] == 3
    run.forget("disseminate")
    assert run.first_unfinished() == "disseminate"
    with pytest.raises(ValueError, match="unknown stage 'colect'"):
        run.mark_done("colect")


def test_manifest_on_s3(s3_bucket):
    run = RunDir(f"s3://{s3_bucket}/runs/r1")
    run.mark_done("collect")
    assert json.loads(storage.read_text(run.manifest_uri))["stages"].keys() == {"collect"}
    assert RunDir(f"s3://{s3_bucket}/runs/r1").is_done("collect")


def test_a_forgotten_stage_loses_its_checkpoints_on_s3(s3_bucket):
    run = RunDir(f"s3://{s3_bucket}/runs/r2")
    storage.write_bytes(run.path("distill", "checkpoint_2026-11-30_17-56-03.656006", "state.pt"), b"old")
    storage.write_text(run.path("distill", "checkpoint_manager_snapshot.json"), "{}")
    storage.write_bytes(run.model("distill"), b"model")
    run.mark_done("distill")
    assert [uri.rsplit("/", 1)[1] for uri in run.checkpoints("distill")] == [
        "checkpoint_2026-11-30_17-56-03.656006", "checkpoint_manager_snapshot.json"]
    assert run.checkpoints("evaluate") == []
    run.forget("distill")
    assert run.checkpoints("distill") == [] and storage.exists(run.model("distill"))
    assert not run.is_done("distill")


def test_report_files(tmp_path):
    cats = ["car", "bus"]
    split = LabelledSplit(cats, [GroundTruth("a", "a", 64, 48, np.array([[2, 2, 20, 20]], np.float32),
                                             np.array([0]), np.zeros(1, bool))])
    cloud = Detections.from_class_only("a", "a", 64, 48, np.array([[2, 2, 20, 20], [30, 5, 50, 40]]),
                                       np.array([0, 1]), np.array([0.9, 0.8]), 2, "cloud")
    clip_det = Detections.from_class_only("a", "a", 64, 48, np.array([[2, 2, 20, 21], [31, 5, 50, 40]]),
                                          np.array([0, 0]), np.array([0.9, 0.8]), 2, "clip_det")
    results = {"Cloud det": evaluate(split, [cloud]), "CLIP det": evaluate(split, [clip_det])}
    md = write_tables(results, cats, str(tmp_path))
    assert "| Cloud det | 100.0 | - | 100.0 |" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["Cloud det"]["map50"] == pytest.approx(100.0)
    plot_ap_bars(results, cats, str(tmp_path / "ap.png"))
    plot_losses({"distill": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)]}, str(tmp_path / "l.png"))
    detection_grid([np.zeros((48, 64, 3), np.uint8)], [cloud], [clip_det], [cloud], cats, str(tmp_path / "g.png"))
    for name in ("ap.png", "l.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
