"""A spend cap over paid calls: ``cloud.max_calls`` and/or ``cloud.max_spend``.

A paid call is a request that asks the service to do the work (a detect request, a task
creation; not a poll), whatever its answer. The count is kept in a small JSON ledger next to
the collection's outputs and written before each call is sent, so the cap holds across a
killed run, a resume and a re-run after the cap is raised: the cap counts every call made
into that output, not only the calls of the current run.

    book = SpendLedger("runs/r1/collect/spend.json", max_calls=call_cap(100, 0.0, 0.0))
    if not book.charge(): ...   # the next call would exceed the cap: do not send it

The Ray collection wraps one ``SpendLedger`` in an actor so that all callers share it.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Protocol

from coin_ray import storage


class Budget(Protocol):
    """What the retry loop needs: permission for one more paid call."""

    def charge(self) -> bool:
        """Count one paid call about to be sent; False (and nothing counted) when over the cap."""
        ...


class Unlimited:
    """No cap (``cloud.max_calls`` and ``cloud.max_spend`` both 0)."""

    def charge(self) -> bool:
        return True


def call_cap(max_calls: int, max_spend: float, price_per_call: float) -> int:
    """The number of paid calls allowed by both caps; 0 when neither is set.

    ``max_spend`` / ``price_per_call`` is rounded down: a call that would pass the money cap
    is not made (a tiny tolerance absorbs float error, e.g. 0.3 / 0.1).
    """
    caps = [max_calls] if max_calls > 0 else []
    if max_spend > 0 and price_per_call > 0:
        caps.append(int(math.floor(max_spend / price_per_call + 1e-9)))
    return min(caps) if caps else 0


class SpendLedger:
    """Paid calls so far in one output, capped at ``max_calls`` (0 = no cap); thread-safe.

    ``uri`` (local or s3://) holds {"calls": n}; it is read once and rewritten on every
    charge, before the call is sent (a kill may over-count by the calls in flight, never
    under-count).
    """

    def __init__(self, uri: str, max_calls: int = 0) -> None:
        self.uri = uri
        self.max_calls = max_calls
        self.before = read_spent(uri)
        self.calls = 0  # charged by this run
        self.refused = 0
        self._lock = threading.Lock()

    def charge(self) -> bool:
        with self._lock:
            if self.max_calls and self.before + self.calls >= self.max_calls:
                self.refused += 1
                return False
            self.calls += 1
            storage.write_text(self.uri, json.dumps({"calls": self.before + self.calls}))
            return True

    def totals(self) -> dict[str, Any]:
        """{"calls_before", "calls_this_run", "calls_total", "max_calls", "refused"}."""
        with self._lock:
            return {"calls_before": self.before, "calls_this_run": self.calls,
                    "calls_total": self.before + self.calls, "max_calls": self.max_calls,
                    "refused": self.refused}


def read_spent(uri: str) -> int:
    """Paid calls recorded in the ledger at ``uri``; 0 when there is none yet."""
    try:
        return int(json.loads(storage.read_text(uri)).get("calls", 0))
    except FileNotFoundError:
        return 0


def budget_summary(totals: dict[str, Any], price_per_call: float, max_spend: float) -> dict[str, Any]:
    """The summary.json "budget" block: calls and money spent against the caps."""
    out = {**totals, "exhausted": bool(totals["refused"])}
    if price_per_call > 0:
        out["spend_total"] = round(totals["calls_total"] * price_per_call, 6)
        out["max_spend"] = max_spend
    return out


def budget_line(block: dict[str, Any], not_asked: int) -> str:
    """One line for the console: spend against the cap, and what is left to do."""
    money = (f" ({block['spend_total']:g} of {block['max_spend']:g} spent)"
             if block.get("max_spend") else "")
    line = f"[collect] budget: {block['calls_total']} of {block['max_calls']} paid calls used{money}"
    if not_asked:
        line += (f"; {not_asked} images not asked: raise cloud.max_calls / cloud.max_spend "
                 "and run again to finish them")
    return line
