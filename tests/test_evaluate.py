import contextlib
import io
import json
import math

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coin_ray.data.datasets import GroundTruth, LabelledSplit
from coin_ray.evaluate import EvalResult, comparison_line, evaluate, table1_json, table1_markdown
from coin_ray.schema import Detections

CATS = ["car", "traffic light", "bus"]


def _split():
    gts = [
        GroundTruth("a", "u/a.png", 100, 100, np.array([[0, 0, 10, 10], [50, 50, 80, 90]], np.float32),
                    np.array([0, 1]), np.zeros(2, bool)),
        GroundTruth("b", "u/b.png", 100, 100, np.array([[20, 20, 40, 40], [60, 0, 90, 30]], np.float32),
                    np.array([0, 0]), np.zeros(2, bool)),
    ]
    return LabelledSplit(CATS, gts)


def _dets():
    a = Detections.from_class_only("a", "u/a.png", 100, 100,
                                   np.array([[0, 0, 10, 11], [52, 50, 80, 90], [30, 30, 40, 40]]),
                                   np.array([0, 1, 0]), np.array([0.9, 0.8, 0.95]), 3, "cloud")
    b = Detections.from_class_only("b", "u/b.png", 100, 100,
                                   np.array([[20, 20, 40, 41], [0, 0, 5, 5]]),
                                   np.array([0, 2]), np.array([0.6, 0.7]), 3, "cloud")
    return [a, b]


def _pycocotools_direct():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CATS)],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 40], "area": 1200, "iscrowd": 0},
              {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 4, "image_id": 2, "category_id": 1, "bbox": [60, 0, 30, 30], "area": 900, "iscrowd": 0}]}
    dts = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 11], "score": 0.9},
           {"image_id": 1, "category_id": 2, "bbox": [52, 50, 28, 40], "score": 0.8},
           {"image_id": 1, "category_id": 1, "bbox": [30, 30, 10, 10], "score": 0.95},
           {"image_id": 2, "category_id": 1, "bbox": [20, 20, 20, 21], "score": 0.6},
           {"image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.7}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dts), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return ev


def test_ap50_matches_pycocotools_called_directly():
    res = evaluate(_split(), _dets())
    ev = _pycocotools_direct()
    p = ev.eval["precision"][0, :, :, 0, -1]
    assert math.isclose(res.ap50["car"], p[:, 0][p[:, 0] > -1].mean() * 100, abs_tol=1e-9)
    assert math.isclose(res.ap50["traffic light"], 100.0, abs_tol=1e-6)
    assert math.isnan(res.ap50["bus"])  # no ground truth: left out of the mean
    assert math.isclose(res.map50, (res.ap50["car"] + 100.0) / 2)
    assert math.isclose(res.map_coco, ev.stats[0] * 100)
    # car: 3 GTs; ranked hits at 0.95 (miss), 0.9 (hit), 0.6 (hit) -> pycocotools' 101-point AP
    assert 40 < res.ap50["car"] < 60


def test_no_detections_gives_zero_not_a_crash():
    res = evaluate(_split(), [])
    assert res.map50 == 0.0 and res.ap50["car"] == 0.0 and math.isnan(res.ap50["bus"])


def test_table1_layout():
    res = evaluate(_split(), _dets())
    md = table1_markdown({"Cloud det": res, "COIN": res}, CATS)
    lines = md.strip().splitlines()
    assert lines[0] == "| Method | Car | Traffic Light | Bus | mAP50 |"
    assert lines[2].startswith("| Cloud det | ") and lines[2].endswith(f"| - | {res.map50:.1f} |")
    data = json.loads(table1_json({"COIN": res}))
    assert data["COIN"]["ap50"]["bus"] is None and data["COIN"]["map50"] == res.map50


def test_records_of_other_images_with_the_same_id_are_not_scored():
    split = _split()
    dets = _dets()
    twin = Detections.from_class_only("a", "train/a.png", 100, 100, np.array([[60, 60, 70, 70]]),
                                      np.array([0]), np.array([0.99]), 3, "cloud")
    alone, mixed = evaluate(split, dets), evaluate(split, dets + [twin])
    assert mixed.map50 == alone.map50 and mixed.unmatched_records == 1


def test_comparison_line_says_where_coin_stands_against_the_cloud():
    def row(map50):
        return EvalResult({"car": map50}, map50, 0.0, 100, 10)

    above = comparison_line({"Cloud det": row(40.6), "COIN": row(43.75)})
    assert above.startswith("Your detector (COIN, 43.8 mAP50) is 3.1 mAP50 above the cloud detector it learnt "
                            "from (40.6) on the 100 labelled target images")
    assert "can replace the cloud calls" in above
    below = comparison_line({"Cloud det": row(40.6), "COIN": row(12.2)})
    assert "is 28.4 mAP50 below the cloud detector" in below and "train longer" in below
    assert comparison_line({"COIN": row(1.0)}) == ""
