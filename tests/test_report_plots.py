"""Report figures: one colour per method apart from the separation colours, duplicates, smoothing, titles."""

from __future__ import annotations

import numpy as np
import pytest

from coin_ray.evaluate import EvalResult
from coin_ray.report import (METHOD_COLOURS, SET_COLOURS, detection_grid, duplicates, method_colour, plot_ap_bars,
                             plot_losses, plot_separation, smooth)
from coin_ray.schema import Detections


def _rec(boxes, labels, scores) -> Detections:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    k = 2
    probs = np.zeros((len(boxes), k + 1), np.float32)
    return Detections("a", "a.png", 64, 48, boxes, np.asarray(labels, np.int64), np.asarray(scores, np.float32),
                      probs, "coin")


def test_method_colours_never_reuse_a_separation_colour():
    methods = ["Cloud det", "CLIP", "CLIP det", "COIN", "Oracle", "ground truth", "new method"]
    colours = [method_colour(m, i) for i, m in enumerate(methods)]
    assert len(set(colours)) == len(colours)
    assert not set(colours) & set(SET_COLOURS.values())


def test_duplicates_flag_the_weaker_of_two_same_label_overlapping_boxes():
    rec = _rec([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [30, 30, 40, 40]], [0, 0, 1, 0],
               [0.9, 0.6, 0.8, 0.7])
    assert duplicates(rec) == [False, True, False, False]
    assert duplicates(_rec([], [], [])) == []


def test_smooth_is_a_running_mean():
    assert smooth([1, 3, 5, 7], 2).tolist() == [1, 2, 4, 6]
    assert smooth([1, 2], 1).tolist() == [1, 2]


def test_ap_bars_label_zero_bars_and_name_run_and_split(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr("coin_ray.report._save", lambda fig, uri: seen.update(fig=fig))
    results = {"Cloud det": EvalResult({"car": 50.0, "bus": 0.0}, 25.0, 10.0, 2, 5),
               "COIN": EvalResult({"car": 60.0, "bus": 10.0}, 35.0, 12.0, 2, 5)}
    plot_ap_bars(results, ["car", "bus"], str(tmp_path / "ap.png"), run="run-x", split="val (2 images)")
    ax = seen["fig"].axes[0]
    assert "run-x" in ax.get_title() and "val (2 images)" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == ["0"]
    bars = {p.get_facecolor()[:3] for p in ax.patches}
    from matplotlib.colors import to_rgb

    assert bars == {to_rgb(METHOD_COLOURS["Cloud det"]), to_rgb(METHOD_COLOURS["COIN"])}
    plt.close("all")


def test_curves_mark_burn_up_and_label_axes(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr("coin_ray.report._save", lambda fig, uri: figs.append(fig))
    rows = [{"step": i, "loss": 1.0, "l_inc": 0.0 if i < 6 else 0.1, "sep_consistent": 3, "sep_private": 5}
            for i in range(10)]
    plot_losses({"distill": rows}, str(tmp_path / "l.png"), run="run-x", burn_up=6)
    plot_separation(rows, str(tmp_path / "s.png"), run="run-x", burn_up=6)
    for fig in figs:
        ax = fig.axes[0]
        assert "run-x" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert any(t.get_text().strip() == "burn-up" for t in ax.texts)
    # L_inc is drawn only where it is on (log scale): from the burn-up step.
    inc = [line for line in figs[0].axes[0].lines if line.get_label().startswith("L_inc")]
    assert inc and min(inc[0].get_xdata()) == 6


@pytest.mark.parametrize("with_truth", [True, False])
def test_detection_grid_has_a_ground_truth_column(tmp_path, monkeypatch, with_truth):
    figs = []
    monkeypatch.setattr("coin_ray.report._save", lambda fig, uri: figs.append(fig))
    rec = _rec([[0, 0, 10, 10]], [0], [0.9])
    truth = [{"boxes": np.array([[1, 1, 9, 9]], np.float32), "labels": np.array([1])}] * 2 if with_truth else None
    detection_grid([np.zeros((48, 64, 3), np.uint8)] * 2, [rec] * 2, [rec] * 2, [rec] * 2, ["car", "bus"],
                   str(tmp_path / "g.png"), truth=truth)
    titles = [ax.get_title() for ax in figs[0].axes if ax.get_title()]
    assert titles == (["ground truth"] if with_truth else []) + ["cloud", "CLIP det", "COIN"]


def test_a_short_run_draws_visible_points(tmp_path, monkeypatch):
    """Issue 27, 4.5: a 10-step try logged one value per loss and drew empty axes."""
    figs = []
    monkeypatch.setattr("coin_ray.report._save", lambda fig, uri: figs.append(fig))
    rows = [{"step": 10, "loss": 1.0, "sep_consistent": 3}]
    plot_losses({"distill": rows}, str(tmp_path / "l.png"))
    plot_separation(rows, str(tmp_path / "s.png"))
    for fig in figs:
        solid = [line for line in fig.axes[0].lines if not line.get_label().startswith("_")]
        assert solid and all(line.get_marker() == "o" for line in solid)


def test_training_plots_are_written_without_labels(tmp_path):
    """Issue 27, 4.6: without validation labels there was no report/ folder at all."""
    import json

    from coin_ray.config import load_config
    from coin_ray.report import write_training_plots
    from coin_ray.run import RunDir

    run = RunDir(str(tmp_path / "run"))
    assert write_training_plots(load_config(None, ["train.distill.steps=3"]), run) == []  # nothing trained yet
    (tmp_path / "run" / "distill").mkdir(parents=True)
    (tmp_path / "run" / "distill" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "sep_consistent": s}) for s in (1, 2, 3)))
    written = write_training_plots(load_config(None, ["train.distill.steps=3"]), run)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["losses.png", "separation.png"]
    assert all((tmp_path / "run" / "report" / name).stat().st_size > 0 for name in ("losses.png", "separation.png"))


def test_classes_no_source_pair_confirmed_are_named_under_table_1():
    from coin_ray.report import class_coverage, coverage_warning, unconfirmed_classes

    sets = {"separation": {"by_class": {"consistent": {"0": 5}, "admitted": {"2": 3},
                                        "inconsistent_cloud": {"0": 4}, "inconsistent_clip": {"1": 4}}}}
    coverage = class_coverage(sets, ["person", "rider", "bus", "train"])
    assert coverage["rider"] == {"consistent": 0, "admitted": 0, "inconsistent_cloud": 0, "inconsistent_clip": 4,
                                 "private_cloud": 0, "private_clip": 0, "relabelled": 0}
    assert coverage["bus"]["admitted"] == 3
    assert unconfirmed_classes(coverage) == ["rider", "train"]
    line = coverage_warning(["rider", "train"], "ckg")
    assert line.startswith("Warning: no box of rider, train was confirmed") and "fusion=ds" in line
    assert "fusion=ds" not in coverage_warning(["rider"], "ds")
    assert coverage_warning([], "ckg") == ""
