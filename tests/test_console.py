"""What a person sees: a tiny run's console has one progress line with an ETA per stage,
Ray Train's raw report lines stay out of it, and a successful run shows no traceback and
no error-level core-worker line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coin_ray.ray.progress_feed import QUIET_LINE

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("collect", "disseminate", "clip_det", "distill", "evaluate", "export")
PROGRESS = re.compile(r"^\[(?P<stage>\w+)\] \w+ \d+/\d+ \(\d+%\)  \S+ \w+/s  ETA \S+", re.M)
ERROR_LINE = re.compile(r"\bE \d+ \d+\] \w+\.cc:\d+")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_runs_console_shows_progress_and_no_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COIN_RAY_VERBOSE")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "jobs/adapt.py", "--num-cpus", "4", f"storage={tmp_path / 'runs'}", "data.world=tiny",
         "train.disseminate.steps=20", "train.distill.steps=20", "train.disseminate.batch_size=2",
         "train.distill.batch_size=2", "train.disseminate.checkpoint_every=20", "train.distill.checkpoint_every=20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    console = proc.stdout + proc.stderr
    (tmp_path / "console.txt").write_text(console)
    assert proc.returncode == 0, console[-3000:]
    with_eta = {m["stage"] for m in PROGRESS.finditer(console)}
    assert set(STAGES) <= with_eta, f"no progress line for {set(STAGES) - with_eta}"
    assert "Traceback" not in console
    assert "TrainingReport(" not in console
    # Known and not yet filtered: the driver's own C++ core worker prints once, at error
    # level, that a Ray Data actor pool's constructor arguments sit in the object store
    # (Ray Data puts them there; any map_batches with fn_constructor_kwargs does it).
    errors = [line for line in console.splitlines()
              if ERROR_LINE.search(line) and not (QUIET_LINE.search(line) and not line.startswith("\x1b"))]
    assert not errors, errors
    assert re.search(r"tensorboard --logdir \S+/tensorboard", console)
