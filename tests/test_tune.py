"""Sweeps: search-space files, the Tune runner (ASHA, resources, resume) and result tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from coin_ray.config import Config, load_config, to_yaml
from coin_ray.ray import tune as sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER_FIVE = {"gamma1", "gamma2", "lambda", "eta", "pi"}


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_spaces_cover_the_paper_five_and_hold_its_defaults(name):
    space = sweep.load_space(str(ROOT / "tune_spaces" / name))
    assert set(space) == PAPER_FIVE
    kinds = {k: d.kind for k, d in space.items()}
    assert kinds["gamma1"] == kinds["gamma2"] == kinds["lambda"] == "loguniform"
    assert kinds["eta"] == "choice" and kinds["pi"] == "uniform"
    defaults = Config().train.distill
    for key, dim in space.items():
        value = getattr(defaults, "lambda_" if key == "lambda" else key)
        inside = value in dim.values if dim.kind == "choice" else dim.values[0] <= value <= dim.values[1]
        assert inside, f"{name}: the paper's {key}={value} is outside {dim.values}"


def test_space_becomes_ray_tune_samplers():
    from ray.tune.search.sample import Categorical, Float

    domains = sweep.param_space(sweep.parse_space(
        {"gamma1": {"loguniform": [0.01, 1.0]}, "eta": {"choice": [0.99, 0.9996]}, "steps": 5}))
    assert isinstance(domains["gamma1"], Float) and isinstance(domains["eta"], Categorical)
    assert domains["steps"] == 5
    samples = [domains["gamma1"].sample() for _ in range(50)]
    assert all(0.01 <= s <= 1.0 for s in samples)


@pytest.mark.parametrize("data, needle", [
    ({"lambda_": {"uniform": [1, 2]}}, "write lambda, not lambda_"),
    ({"gamma3": {"uniform": [1, 2]}}, "gamma3: not a train.distill field"),
    ({"gamma1": {"loguniform": [0.0, 1.0]}}, "loguniform needs low > 0"),
    ({"gamma1": {"uniform": [1.0, 0.5]}}, "low < high"),
    ({"pi": {"uniform": [0.5, 1.5]}}, "train.distill.pi: 1.5 is out of range"),
    ({"eta": {"choice": []}}, "choice needs a non-empty list"),
    ({"gamma1": {"normal": [0, 1]}}, "expected one of {uniform, loguniform, choice"),
    ({"steps": 10}, "nothing to sweep"),
    ([1, 2], "expected a non-empty mapping"),
])
def test_bad_space_is_a_one_line_error(data, needle):
    with pytest.raises(sweep.SpaceError) as err:
        sweep.parse_space(data, "bad.yaml")
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("bad.yaml: ")


def test_missing_or_broken_space_file(tmp_path):
    with pytest.raises(sweep.SpaceError, match="no such search-space file"):
        sweep.load_space(str(tmp_path / "nope.yaml"))
    (tmp_path / "broken.yaml").write_text("gamma1: {loguniform: [0.1, \n")
    with pytest.raises(sweep.SpaceError, match="not valid YAML"):
        sweep.load_space(str(tmp_path / "broken.yaml"))


def test_params_map_lambda_to_its_field_and_the_config_reloads(tmp_path):
    import numpy as np

    cfg = sweep.apply_params(Config(), {"lambda": np.float64(3.5), "gamma1": 0.2, "eta": 0.99})
    assert cfg.train.distill.lambda_ == 3.5 and cfg.train.distill.gamma1 == 0.2
    (tmp_path / "best.yaml").write_text(to_yaml(cfg))
    assert load_config(str(tmp_path / "best.yaml")).train.distill.lambda_ == 3.5


@pytest.mark.parametrize("resources, cpus, gpus, expected", [
    ({"CPU": 4.0}, 1.0, 0.0, 4), ({"CPU": 4.0}, 3.0, 0.0, 1), ({"CPU": 2.0}, 4.0, 0.0, 1),
    ({"CPU": 32.0, "GPU": 2.0}, 4.0, 1.0, 2), ({"CPU": 32.0, "GPU": 4.0}, 4.0, 0.5, 8),
])
def test_max_concurrent_from_cluster_resources(resources, cpus, gpus, expected):
    assert sweep.max_concurrent(resources, cpus, gpus) == expected


def test_tables_sort_by_metric_with_nan_last():
    rows = [{"trial_id": "a", "val_map50": math.nan}, {"trial_id": "b", "val_map50": 0.2},
            {"trial_id": "c", "val_map50": 0.7}]
    ordered = sorted(rows, key=lambda r: (math.isnan(r["val_map50"]), -r["val_map50"]
                                         if not math.isnan(r["val_map50"]) else 0))
    md = sweep.rows_to_markdown(ordered, "metric: val_map50")
    assert md.index("| c |") < md.index("| b |") < md.index("| a |")
    csv_text = sweep.rows_to_csv(ordered)
    assert csv_text.splitlines()[0] == "trial_id,val_map50" and csv_text.splitlines()[1].startswith("c,")


def _quadratic_trainable(fail_marker: Path):
    """A trainable with a known optimum (gamma1 = 0.1) for the runner's own tests; it errors
    while ``fail_marker`` exists, to leave a sweep needing a resume."""
    from ray import tune

    def trainable(config):
        for step in range(1, 5):
            if fail_marker.exists():
                raise RuntimeError("interrupted on purpose")
            tune.report({"step": step, "score": -abs(math.log10(config["gamma1"]) + 1) * (1 + 1 / step)})

    return trainable


def _cpus_come_back(ray, total: float, deadline_s: float = 20.0) -> bool:
    """Tune removes trial placement groups asynchronously, a moment after fit() returns."""
    import time

    end = time.monotonic() + deadline_s
    while ray.available_resources().get("CPU", 0.0) != total:
        if time.monotonic() > end:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture
def local_ray():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(180)
def test_runner_asha_resources_and_resume_after_errors(local_ray, tmp_path):
    marker = tmp_path / "fail"
    marker.touch()
    opts = sweep.SweepOptions(name="unit", storage=str(tmp_path / "sweeps"), metric="score",
                              max_steps=4, num_samples=4, grace_steps=1, seed=3,
                              points_to_evaluate=[{"gamma1": 0.1}])
    space = sweep.param_space(sweep.parse_space({"gamma1": {"loguniform": [0.001, 10.0]}}))
    first = sweep.run_tuner(_quadratic_trainable(marker), space, opts)
    assert first.num_errors == 4
    marker.unlink()
    grid = sweep.run_tuner(_quadratic_trainable(marker), space, opts)  # same name: restores
    assert grid.num_errors == 0 and len(grid) == 4
    rows = sweep.result_rows(grid, "score", ["gamma1"])
    assert all(not math.isnan(r["score"]) for r in rows)
    assert rows[0]["gamma1"] == pytest.approx(0.1) and rows[0]["step"] == 4
    assert any(r["step"] < 4 for r in rows), "ASHA stopped no trial early"
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert _cpus_come_back(local_ray, 4.0)
