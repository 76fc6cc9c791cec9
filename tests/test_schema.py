import numpy as np
import pyarrow.parquet as pq

from coin_ray import storage
from coin_ray.schema import DETECTION_SCHEMA, Detections, class_only_probs, records_to_table, table_to_records


def test_class_only_probs_rule():
    probs = class_only_probs(np.array([0, 2]), np.array([0.7, 0.4]), num_classes=3)
    expected = np.array([[0.7, 0.15, 0.15, 0.0], [0.3, 0.3, 0.4, 0.0]], np.float32)
    np.testing.assert_allclose(probs, expected, atol=1e-7)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(class_only_probs(np.array([0]), np.array([0.9]), 1), [[0.9, 0.0]])
    assert class_only_probs(np.zeros(0), np.zeros(0), 4).shape == (0, 5)


def _records():
    a = Detections.from_class_only("img/0001", "s3://b/img/0001.jpg", 640, 480,
                                   np.array([[1.5, 2.25, 30.125, 40.0], [0, 0, 5, 5]]),
                                   np.array([1, 0]), np.array([0.875, 0.5]), 3, "cloud")
    b = Detections.empty("img/0002", "/data/0002.png", 10, 20, "cloud", 3, error="corrupt image")
    return [a, b]


def test_parquet_round_trip_is_lossless(tmp_path):
    records = _records()
    uri = str(tmp_path / "dets.parquet")
    storage.write_parquet(records_to_table(records), uri)
    table = pq.read_table(uri)
    assert table.schema.equals(DETECTION_SCHEMA)
    back = table_to_records(table)
    for r, b in zip(records, back):
        assert (b.image_id, b.uri, b.width, b.height, b.source, b.error) == \
               (r.image_id, r.uri, r.width, r.height, r.source, r.error)
        for name in ("boxes", "labels", "scores", "probs"):
            got, want = getattr(b, name), getattr(r, name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_mismatched_lengths_are_rejected():
    import pytest
    with pytest.raises(ValueError, match="disagree on N"):
        Detections("x", "x", 1, 1, np.zeros((2, 4)), np.zeros(1), np.zeros(2), np.zeros((2, 3)), "cloud")
