"""What reaches the console from Ray and transformers: warnings yes, chatter no.

The project prints its own progress (``coin_ray.progress``: rate, ETA, errors), which says
what Ray Data's executor, Ray Train's controller and transformers' "Loading weights" bars
say, in one line per stage. Their INFO lines and bars stay in Ray's session logs
(``/tmp/ray/session_latest/logs``: ``ray-data/``, ``worker-*.out``) and leave the console,
each through its library's own switch:

    Ray Data (runs on the driver)  its ``ray.data`` console handler at WARNING (the file
                                   handler keeps DEBUG); ``DataContext.enable_progress_bars``
                                   off (the "Running Dataset" / "Total Progress" blocks)
    Ray Train controller, workers  forwarded INFO lines of the ``TrainController`` dropped on
                                   the driver (``progress_feed.filter_known_ray_noise``)
    transformers in every worker   ``TRANSFORMERS_VERBOSITY=error`` and
                                   ``HF_HUB_DISABLE_PROGRESS_BARS=1`` through the job's
                                   runtime_env (``worker_env_vars``)

Warnings and errors still reach the console: a disk over 95 %, a worker that died, a Ray
Data operator that failed. ``COIN_RAY_VERBOSE=1`` leaves every switch as Ray sets it.
"""

from __future__ import annotations

import json
import logging
import os

from coin_ray.location import JOB_CONFIG_ENV

VERBOSE_ENV = "COIN_RAY_VERBOSE"
# transformers' own switches, read when it is imported in a worker.
QUIET_WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def verbose(env: dict[str, str] | None = None) -> bool:
    """Whether ``COIN_RAY_VERBOSE`` asks for everything Ray and transformers print."""
    return (os.environ if env is None else env).get(VERBOSE_ENV, "") not in ("", "0")


def worker_env_vars(env: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars to give every Ray worker (``ray.init(runtime_env={"env_vars": ...})``).

    Leaves out a variable the user set (in this environment, or in the ``ray job submit``
    runtime_env: Ray refuses to merge a key set in both), and everything when verbose.
    """
    env = os.environ if env is None else env
    if verbose(env):
        return {}
    taken = set(env) | set(_job_env_vars(env))
    return {k: v for k, v in QUIET_WORKER_ENV.items() if k not in taken}


def _job_env_vars(env: dict[str, str]) -> dict[str, str]:
    """The env_vars of the ``ray job submit`` runtime_env that started this driver."""
    try:
        runtime_env = json.loads(env.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
        return dict(runtime_env.get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def quiet_ray_data() -> None:
    """On the driver (where Ray Data's executor runs): its INFO lines and progress blocks to
    its log file only; its warnings still print."""
    if verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console one(s)
            handler.setLevel(max(handler.level, logging.WARNING))
