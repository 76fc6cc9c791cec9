"""Stage 1 targets: CLIP's relabelling of the cloud boxes (train.disseminate.labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coin_ray.config import ConfigError, from_dict
from coin_ray.run import RunDir
from coin_ray.schema import SOURCE_CLIP, SOURCE_CLOUD, Detections, records_to_table
from coin_ray.storage import write_parquet
from coin_ray.train.data import (DetectionDataset, clip_relabelled, detection_target, dissemination_targets,
                                 load_dissemination_records)

K = 3
BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 0, 40, 12], [1, 2, 3, 4]], np.float32)


def _cloud(uri: str = "a.png") -> Detections:
    return Detections.from_class_only(uri[0], uri, 50, 50, BOXES, [0, 1, 2, 0], [0.9, 0.6, 0.2, 0.5], K,
                                      SOURCE_CLOUD)


def _clip(uri: str = "a.png") -> Detections:
    probs = np.array([[0.1, 0.7, 0.1, 0.1],    # CLIP: class 1 (cloud said 0)
                      [0.1, 0.2, 0.1, 0.6],    # background: dropped
                      [0.05, 0.05, 0.8, 0.1],  # class 2, agrees with the cloud
                      [0.5, 0.1, 0.1, 0.3]], np.float32)
    return Detections(uri[0], uri, 50, 50, BOXES, probs[:, :K].argmax(1), probs[:, :K].max(1), probs, SOURCE_CLIP)


def test_clip_labels_are_hard_background_dropped_cloud_scores_kept():
    out = clip_relabelled(_cloud(), _clip())
    assert out.ok and out.source == SOURCE_CLIP
    np.testing.assert_array_equal(out.boxes, BOXES[[0, 2, 3]])
    assert out.labels.tolist() == [1, 2, 0]
    np.testing.assert_allclose(out.scores, [0.9, 0.2, 0.5])  # the cloud's scores
    np.testing.assert_array_equal(out.probs, [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    target = detection_target(out, K, min_score=0.3)  # min_score filters on the cloud score, as before
    assert target["labels"].tolist() == [1, 0]
    assert target["probs"].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_cloud_labels_are_todays_targets():
    cloud = [_cloud()]
    assert dissemination_targets(cloud, [_clip()], "cloud") == cloud
    with pytest.raises(ValueError, match="train.disseminate.labels"):
        dissemination_targets(cloud, None, "gdino")


def test_missing_or_mismatched_clip_records_become_error_records():
    other = _clip("b.png")
    moved = Detections("a", "a.png", 50, 50, BOXES + 1, other.labels, other.scores, other.probs, SOURCE_CLIP)
    failed = Detections.empty("a", "a.png", 50, 50, SOURCE_CLIP, K, error="image unreadable")
    out = [dissemination_targets([_cloud()], clip, "clip")[0] for clip in ([other], [moved], [failed])]
    assert [r.error for r in out] == ["no CLIP record for this image",
                                      "CLIP record has 4 boxes that differ from the cloud record's 4",
                                      "image unreadable"]
    assert all(len(r) == 0 for r in out)
    assert len(DetectionDataset(out, K)) == 0
    empty = Detections.empty("a", "a.png", 50, 50, SOURCE_CLOUD, K)
    assert len(clip_relabelled(empty, Detections.empty("a", "a.png", 50, 50, SOURCE_CLIP, K))) == 0


def test_load_from_a_run_folder(tmp_path, caplog):
    run = RunDir(str(tmp_path))
    write_parquet(records_to_table([_cloud("a.png"), _cloud("b.png")]), run.cloud_detections)
    write_parquet(records_to_table([_clip("a.png")]), run.clip_scores)
    with caplog.at_level("WARNING"):
        clip = load_dissemination_records(run, "clip")
    assert [r.uri for r in clip] == ["a.png"] and clip[0].labels.tolist() == [1, 2, 0]
    assert "1 of 2 images have no clip targets (e.g. b.png: no CLIP record for this image)" in caplog.text
    Path(run.clip_scores).unlink()
    with pytest.raises(FileNotFoundError, match="train.disseminate.labels=clip needs .*clip.parquet"):
        load_dissemination_records(run, "clip")
    cloud = load_dissemination_records(run, "cloud", uris=["b.png"])
    assert [r.uri for r in cloud] == ["b.png"] and cloud[0].labels.tolist() == [0, 1, 2, 0]


def test_config_key():
    assert from_dict({}).train.disseminate.labels == "clip"
    assert from_dict({}, ["train.disseminate.labels=cloud"]).train.disseminate.labels == "cloud"
    with pytest.raises(ConfigError, match="train.disseminate.labels"):
        from_dict({}, ["train.disseminate.labels=gdino"])
