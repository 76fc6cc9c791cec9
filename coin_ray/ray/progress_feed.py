"""Training metrics, shown on the driver as ``coin_ray.progress`` lines.

    with training_progress("distill", total_steps=400) as feed:
        TorchTrainer(loop, train_loop_config={..., "progress": feed}, ...).fit()
    # in the loop, on rank 0, every log_every steps:
    feed(step, metrics)

Rank 0 puts its metrics straight on a ``ray.util.queue.Queue`` (an actor) that a driver
thread turns into one throttled progress line. They do not go through
``ray.train.report``: Ray Train 2.60 keeps one unconsumed report per worker, and its
controller takes it only at its health-check poll (every 2 s), so reporting every 10 steps
capped training at 5 steps a second (measured: the demo's distillation ran at 4.5 step/s
under Ray Train and 9 step/s in-process). Only checkpoints are reported to Ray Train.

Ray Train's own per-report INFO lines ("Reporting training result N: TrainingReport(...)",
"Checkpoint successfully created at ...") stay in Ray's log files unless COIN_RAY_VERBOSE=1.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import ray.exceptions
from ray.util.queue import Empty, Queue

from coin_ray.progress import DurationEstimate, ProgressLine
from coin_ray.ray.console import verbose

POLL_S = 0.5


class ProgressFeed:
    """Rank 0's metrics to the driver's progress line; picklable, so it travels in the
    loop config. Never fails the training: once the driver's queue is gone it goes quiet."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.closed = False

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait({"step": step, **metrics})
        except ray.exceptions.RayError:  # the driver is gone or shutting down
            self.closed = True


def _show(queue: Queue, progress: ProgressLine, stop: threading.Event,
          estimate: DurationEstimate | None = None) -> None:
    last: dict[str, Any] = {}
    while not stop.is_set() or not queue.empty():
        try:
            last = queue.get(timeout=POLL_S)
        except Empty:
            continue
        except Exception:  # the queue actor is gone (cluster shutting down): nothing left to show
            return
        if "step" in last:
            if estimate is not None:
                estimate.update(int(last["step"]))
            progress.update(int(last["step"]), last)


@contextmanager
def training_progress(stage: str, total_steps: int) -> Iterator[ProgressFeed]:
    """A feed for rank 0 of a training loop whose metrics print progress on the driver,
    with one estimate of the stage's duration once its first logged steps are timed."""
    queue = Queue(actor_options={"num_cpus": 0})
    progress = ProgressLine(stage, total_steps)
    stop = threading.Event()
    thread = threading.Thread(target=_show, args=(queue, progress, stop, DurationEstimate(stage, total_steps)),
                              daemon=True)
    thread.start()
    try:
        yield ProgressFeed(queue)
    finally:
        stop.set()
        thread.join(timeout=5)
        queue.shutdown()


def quiet_train_reports() -> None:
    """On a worker: Ray Train's per-report INFO lines to its log file only (not the console)."""
    if verbose():
        return
    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)
        logging.getLogger(module.__name__).setLevel(logging.WARNING)


# Known-harmless lines that Ray forwards from its own processes to the driver's console.
# They stay in Ray's session logs (/tmp/ray/session_latest/logs); COIN_RAY_VERBOSE=1 shows them.
#  - Ray Train's PlacementGroupCleaner looks the cluster up by address; on a machine that
#    runs several Ray instances it may pick another one and print a GCS-timeout traceback,
#    and the TrainController one about failing to stop it (QUIET_STOP) or to register its
#    placement group with it once it died (QUIET_REGISTER: a warning, with the dead actor's
#    description on tab-indented lines).
#  - Ray warns at error level that an actor whose constructor arguments sit in the object
#    store cannot be restarted once their owner dies; Ray Data and Ray Train create such
#    actors themselves (actor pools, PreemptionWatcher).
QUIET_ACTORS = ("PlacementGroupCleaner",)
QUIET_LINE = re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store")


# The controller then reports, with a traceback, that stopping that cleaner timed out.
QUIET_STOP = "Failed to stop PlacementGroupCleaner gracefully"
QUIET_REGISTER = "Failed to register placement group with cleaner"
# After a stage's last step, Ray Train 2.60 can remove the worker group's placement group
# while the torch backend is still shutting down on it; the controller then reports the
# worker's exit ("Destroying worker since its placement group was removed") with a traceback,
# and says itself that this is expected. The stage has finished by then: a worker that died
# during training fails the stage with its own error, which is never filtered.
QUIET_BACKEND_SHUTDOWN = "Graceful shutdown of backend failed"
_ACTOR_DEATH = ("\t", "The actor is dead because")  # how a dead actor's description goes on
_QUIET_MESSAGES = (QUIET_STOP, QUIET_REGISTER, QUIET_BACKEND_SHUTDOWN)


def _without_quiet_messages(lines: list[str]) -> list[str]:
    """``lines`` less the ``_QUIET_MESSAGES`` and what follows them (a traceback to its
    exception line, the dead actor's description)."""
    kept, skipping, described = [], False, False
    for line in lines:
        if any(message in line for message in _QUIET_MESSAGES):
            skipping, described = True, False
        elif skipping and not described and (line.startswith((" ", "Traceback", *_ACTOR_DEATH)) or not line.strip()):
            pass
        elif skipping and line.startswith("ray.exceptions."):
            described = "ActorDiedError" in line  # its description follows, tab-indented
            skipping = described
        elif described and line.startswith(_ACTOR_DEATH):
            pass
        else:
            skipping = described = False
            kept.append(line)
    return kept


def _keep(data: dict[str, Any]) -> dict[str, Any] | None:
    if str(data.get("actor_name") or "").startswith(QUIET_ACTORS):
        return None
    lines = [line for line in _without_quiet_messages(data.get("lines", [])) if not QUIET_LINE.search(line)]
    return {**data, "lines": lines} if lines else None


def filter_known_ray_noise() -> None:
    """On the driver, after ray.init: drop the known-harmless forwarded lines (see above)."""
    if verbose():
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        handlers = []
        for name, handler in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handler, "coin_ray_filtered", False):
                handler = _filtered(handler)
            handlers.append((name, handler))
        dispatcher.handlers = handlers


def _filtered(handler: Any) -> Any:
    def emit(data: dict[str, Any]) -> None:
        kept = _keep(data)
        if kept is not None:
            handler(kept)

    emit.coin_ray_filtered = True
    return emit
