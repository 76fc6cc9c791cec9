"""One progress line per stage, readable in a plain log as well as on a terminal.

    progress = ProgressLine("distill", total=400, unit="step")
    progress.update(120, {"loss": 1.2345, "l_con": 0.4567})
    # [distill] step 120/400 (30%)  2.95 step/s  ETA 1m35s  loss 1.23  l_con 0.457

A line is printed (a whole new line, never a carriage-return redraw, so ``tail -f`` and
CI logs read the same as a terminal) at most every ``every_s`` seconds, and always for the
last unit. The rate counts from construction and ``start`` (a resumed stage passes the step it
resumes at); the ETA is what is left at that rate. ``DurationEstimate`` prints a training
stage's whole duration once, timed on its first logged steps. Plain Python: no Ray here.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Callable, Mapping

EVERY_S = 5.0
KEY_LOSSES = ("loss", "l_con", "l_inc", "l_pri", "l_align", "l_ckg", "loss_classifier", "loss_box_reg",
              "loss_objectness")
MAX_LOSSES = 5
MAX_NAMED = 5  # failed files named on the console; the rest are counted


def sig3(value: float) -> str:
    """``value`` to 3 significant digits, e.g. 1.2345 -> "1.23", 0.00012345 -> "0.000123".

    Never "-0": a loss that is 0 up to rounding (-1e-9 after a subtraction) reads as 0.
    """
    text = f"{value:.3g}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def failure_lines(what: str, failures: list[tuple[str, str]], total: int, where: str = "") -> list[str]:
    """Console lines naming the first ``MAX_NAMED`` failed files (file: reason), then a count.

    ``failures`` holds (file, reason) of at least the first ``MAX_NAMED`` of ``total`` failures;
    ``where`` names the file that lists every one of them.
    """
    if total == 0:
        return []
    lines = [f"[{what}] {total} image{'s' if total != 1 else ''} failed:"]
    lines += [f"  {name}: {' '.join(reason.split())[:200]}" for name, reason in failures[:MAX_NAMED]]
    if total > MAX_NAMED:
        lines.append(f"  ... and {total - MAX_NAMED} more{f' (every one in {where})' if where else ''}")
    return lines


def format_duration(seconds: float) -> str:
    """Seconds as "42s", "3m05s" or "1h02m"."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_losses(metrics: Mapping[str, float]) -> str:
    """The key losses present in ``metrics``, in a fixed order, 3 significant digits."""
    keys = [k for k in KEY_LOSSES if isinstance(metrics.get(k), (int, float))][:MAX_LOSSES]
    return "  ".join(f"{k} {sig3(float(metrics[k]))}" for k in keys)


class ProgressLine:
    """Stage, done/total, rate, ETA and key losses, throttled to one line per ``every_s``."""

    def __init__(self, stage: str, total: int, unit: str = "step", *, start: int = 0, every_s: float = EVERY_S,
                 out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.total, self.unit, self.every_s = stage, max(0, int(total)), unit, every_s
        self.out = out
        self.clock = clock
        self.start_time = clock()
        self.start_done = start
        self.last_print = -math.inf
        self.last_done = -1
        self.lines = 0

    def format(self, done: int, metrics: Mapping[str, float] | None = None, extra: str = "") -> str:
        """The line for ``done`` units (no throttling)."""
        now = self.clock()
        elapsed = now - self.start_time
        rate = (done - self.start_done) / elapsed if elapsed > 0 and done > self.start_done else float("nan")
        left = max(0, self.total - done)
        eta = left / rate if math.isfinite(rate) and rate > 0 else (0.0 if left == 0 else float("nan"))
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        rate_s = f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else f"- {self.unit}/s"
        parts = [f"[{self.stage}] {self.unit} {done}/{self.total}{pct}", rate_s, f"ETA {format_duration(eta)}"]
        losses = format_losses(metrics or {})
        return "  ".join(parts + [p for p in (losses, extra) if p])

    def update(self, done: int, metrics: Mapping[str, float] | None = None, *, extra: str = "",
               force: bool = False) -> str | None:
        """Print the line when ``every_s`` has passed (or ``force``, or the last unit); return it."""
        line = self.format(done, metrics, extra)
        now = self.clock()
        finished_again = done >= self.total and self.last_done >= self.total
        if finished_again or not (force or done >= self.total or now - self.last_print >= self.every_s):
            return None
        self.last_print, self.last_done = now, done
        self.lines += 1
        print(line, file=self.out or sys.stderr, flush=True)
        return line


class DurationEstimate:
    """One line with a training stage's expected duration, once, as soon as it is measured.

        estimate = DurationEstimate("distill", total=4875)
        estimate.update(10); estimate.update(20)   # the logged steps, as they arrive
        # [distill] about 12m11s for 4875 steps at the rate of steps 11-20 (0.15 s/step); 12m08s left

    The rate is timed between the first two updates, not from the start: the first update
    carries the start-up (workers, models, data) and the first step's one-off costs, while
    the steps after it are ordinary ones. Nothing is printed when the stage ends first.
    """

    def __init__(self, stage: str, total: int, unit: str = "step", *, out: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.total, self.unit, self.out, self.clock = stage, int(total), unit, out, clock
        self.first: tuple[int, float] | None = None
        self.done = False

    def update(self, done: int) -> str | None:
        """Note that ``done`` units are done; print and return the estimate when it is due."""
        now = self.clock()
        if self.done or done >= self.total:
            self.done = True
            return None
        if self.first is None:
            self.first = (done, now)
            return None
        start, then = self.first
        if done <= start:  # the same step again (a resumed worker): no time to divide yet
            return None
        per_unit = (now - then) / (done - start)
        line = (f"[{self.stage}] about {format_duration(per_unit * self.total)} for {self.total} {self.unit}s "
                f"at the rate of {self.unit}s {start + 1}-{done} ({per_unit:.3g} s/{self.unit}); "
                f"{format_duration(per_unit * (self.total - done))} left")
        self.done = True
        print(line, file=self.out or sys.stderr, flush=True)
        return line
