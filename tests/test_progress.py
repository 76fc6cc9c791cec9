"""The progress line: format, rate, ETA, 3 significant digits, throttling."""

from __future__ import annotations

import io

from coin_ray.progress import DurationEstimate, ProgressLine, format_duration, format_losses, sig3


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_line_has_stage_counts_rate_eta_and_losses():
    clock, out = Clock(), io.StringIO()
    progress = ProgressLine("distill", total=400, out=out, clock=clock)
    clock.t += 40.0
    line = progress.update(120, {"loss": 1.23456, "l_con": 0.000456789, "sep_private": 7, "lr": 0.01})
    assert line == "[distill] step 120/400 (30%)  3 step/s  ETA 1m33s  loss 1.23  l_con 0.000457"
    assert out.getvalue() == line + "\n"


def test_lines_are_throttled_but_the_last_one_always_shows():
    clock, out = Clock(), io.StringIO()
    progress = ProgressLine("collect", total=10, unit="image", every_s=5.0, out=out, clock=clock)
    printed = []
    for done in range(1, 11):
        clock.t += 1.0
        printed.append(progress.update(done) is not None)
    assert printed == [True, False, False, False, False, True, False, False, False, True]
    assert out.getvalue().splitlines()[-1].startswith("[collect] image 10/10 (100%)  1 image/s  ETA 0s")


def test_a_resumed_stage_counts_its_rate_from_where_it_resumed():
    clock = Clock()
    progress = ProgressLine("disseminate", total=300, start=200, out=io.StringIO(), clock=clock)
    clock.t += 10.0
    assert "1 step/s  ETA 1m30s" in progress.format(210)


def test_number_formats():
    assert [sig3(x) for x in (1.23456, 0.000123456, 123456.0, 0.0)] == ["1.23", "0.000123", "1.23e+05", "0"]
    assert [format_duration(s) for s in (4.2, 185, 3725, float("nan"))] == ["4s", "3m05s", "1h02m", "?"]
    assert [sig3(x) for x in (-0.0, -0.0 * 3.5, -0.5)] == ["0", "0", "-0.5"]  # issue 27: "l_inc -0"
    assert "l_inc 0 " in format_losses({"l_inc": -0.0, "l_pri": 1.0}) + " "


def test_known_ray_noise_is_dropped_and_everything_else_kept():
    from coin_ray.ray.progress_feed import _keep

    controller = {"actor_name": "TrainController", "pid": 1, "is_err": True, "lines": [
        "Started training worker group of size 1:",
        "Failed to stop PlacementGroupCleaner gracefully.",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "    ray.get(x)",
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        "[2026-11-30 14:42:59,904 E 26431 26650] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: '4d' has constructor arguments in the object store and max_restarts > 0.",
        "Traceback (most recent call last):",
        "ValueError: a real error"]}
    assert _keep(controller)["lines"] == ["Started training worker group of size 1:",
                                          "Traceback (most recent call last):", "ValueError: a real error"]
    assert _keep({"actor_name": "PlacementGroupCleaner", "lines": ["Traceback (most recent call last):"]}) is None
    registered = {"actor_name": "TrainController", "lines": [
        "Failed to register placement group with cleaner: The actor died unexpectedly before finishing this task.",
        "\tclass_name: PlacementGroupCleaner", "\tpid: 31252",
        "The actor is dead because its worker process has died. Worker exit type: INTENDED_USER_EXIT",
        "Worker group of size 1 died"]}
    assert _keep(registered)["lines"] == ["Worker group of size 1 died"]
    shutdown = {"actor_name": "TrainController", "lines": [
        "Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
        "Traceback (most recent call last):",
        '  File "ray/train/torch/config.py", line 333, in on_shutdown',
        "    ray.get(futures, timeout=timeout_s)",
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
        "\tclass_name: RayTrainWorker", "\tpid: 11935",
        "The actor is dead because its worker process has died. Worker exit type: INTENDED_SYSTEM_EXIT Worker "
        "exit detail: Destroying worker since its placement group was removed.",
        "Worker group of size 1 shut down",
        "\tan indented line of another message",
        "ray.exceptions.RayTaskError: a real failure"]}
    assert _keep(shutdown)["lines"] == ["Worker group of size 1 shut down", "\tan indented line of another message",
                                        "ray.exceptions.RayTaskError: a real failure"]


class CountingTraining:
    """A ``Training`` whose steps only count (loss = the step), resumable from ``step``."""

    def __init__(self, steps: int) -> None:
        self.step, self.steps = 0, steps

    def run_steps(self, on_step=None) -> None:
        while self.step < self.steps:
            self.step += 1
            on_step(self.step, {"loss": float(self.step)})

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, blob: dict) -> None:
        self.step = blob["step"]


def test_every_logged_step_feeds_the_progress_line_and_checkpoints_keep_their_schedule():
    # The feed is the only per-step channel to the driver (Ray Train sees checkpoints alone),
    # so it must also carry the checkpointed and the last steps.
    from coin_ray.ray.train import Checkpoints, run_training

    fed, saved = [], []
    checkpoints = Checkpoints(load=lambda where: {"step": 20},
                              save=lambda state, metrics: saved.append((state["step"], metrics["step"])))
    run_training(CountingTraining(55), steps=55, checkpoint_every=20, log_every=10,
                 feed=lambda step, metrics: fed.append((step, metrics["loss"])), checkpoints=checkpoints)
    assert fed == [(30, 30.0), (40, 40.0), (50, 50.0), (55, 55.0)]  # resumed at 20
    assert saved == [(40, 40), (55, 55)]


def test_the_duration_estimate_is_timed_between_the_first_two_logged_steps_and_printed_once():
    clock, out = Clock(), io.StringIO()
    estimate = DurationEstimate("distill", total=4875, out=out, clock=clock)
    clock.t += 60.0  # start-up and the first steps' one-off costs: not in the rate
    assert estimate.update(10) is None
    clock.t += 1.5
    line = estimate.update(20)
    assert line == ("[distill] about 12m11s for 4875 steps at the rate of steps 11-20 (0.15 s/step); "
                    "12m08s left")
    clock.t += 1.5
    assert estimate.update(30) is None and out.getvalue() == line + "\n"


def test_no_estimate_for_a_stage_that_ends_before_it_is_measured():
    clock, out = Clock(), io.StringIO()
    estimate = DurationEstimate("disseminate", total=20, out=out, clock=clock)
    assert estimate.update(10) is None
    clock.t += 1.0
    assert estimate.update(20) is None and out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ray_colour_codes_only_on_a_terminal():
    """Issue 27, 4.9: ANSI colour codes reached files when output was redirected."""
    from coin_ray.ray.cluster import plain_log_prefixes

    env: dict[str, str] = {}
    plain_log_prefixes(io.StringIO(), env)
    assert env == {"RAY_COLOR_PREFIX": "0"}
    env = {}
    plain_log_prefixes(_Terminal(), env)
    assert env == {}
    env = {"NO_COLOR": "1"}
    plain_log_prefixes(_Terminal(), env)
    assert env["RAY_COLOR_PREFIX"] == "0"
    env = {"RAY_COLOR_PREFIX": "1"}  # the user's choice stands
    plain_log_prefixes(io.StringIO(), env)
    assert env == {"RAY_COLOR_PREFIX": "1"}
