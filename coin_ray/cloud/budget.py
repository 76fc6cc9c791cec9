"""A spend cap over paid calls: ``cloud.max_calls`` and/or ``cloud.max_spend``.

A paid call is a request that asks the service to do the work (a detect request, a task
creation; not a poll), whatever its answer. The ledger lives with the answer cache
(``<cache>/<backend>/spend/``), so the cap bounds what that cache has paid over every run,
entry point and ``storage`` that uses it, not one run folder. Each ledger writer (one per
collection) keeps its own small JSON file, ``<writer>.json`` = {"calls": n, ...}, written
before each call is sent; the total is the sum of the files. Runs sharing the cache at once
therefore never lose each other's counts, on S3 too; on local disk the check and the charge
happen under one lock (``storage.locked``), so concurrent runs never pass the cap together.
On S3 (no lock) they may pass it by the calls they send at the same moment.

    book = SpendLedger(spend_folder("~/.cache/coin_ray/answers", "dds"), max_calls=call_cap(100, 0.0, 0.0))
    if not book.charge(): ...   # the next call would exceed the cap: do not send it

The Ray collection wraps one ``SpendLedger`` in an actor so that all callers share it.
"""

from __future__ import annotations

import json
import math
import posixpath
import threading
import time
import uuid
from typing import Any, Protocol

from coin_ray import storage

LOCK_NAME = ".lock"  # hidden: ``storage.list_files`` skips it


class Budget(Protocol):
    """What the retry loop needs: permission for one more paid call."""

    def charge(self) -> bool:
        """Count one paid call about to be sent; False (and nothing counted) when over the cap."""
        ...


class Unlimited:
    """No cap and no ledger (a client used outside a collection)."""

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


def spend_folder(cache_root: str, backend: str) -> str:
    """The ledger of ``backend``'s paid calls in the answer cache at ``cache_root``."""
    return storage.join(cache_root, backend, "spend")


class SpendLedger:
    """Paid calls into one ledger folder, capped at ``max_calls`` (0 = no cap); thread-safe.

    Every charge is written before the call is sent (a kill may over-count by the calls in
    flight, never under-count). ``writer`` names this ledger's file (a run id, for people).
    """

    def __init__(self, folder: str, max_calls: int = 0, writer: str = "run") -> None:
        self.folder = folder
        self.max_calls = max_calls
        self.writer = writer
        self.uri = storage.join(folder, f"{writer}-{uuid.uuid4().hex[:8]}.json")
        self.before = read_spent(folder)  # every other writer's calls when this one started
        self.calls = 0  # charged by this writer
        self.refused = 0
        self._lock = threading.Lock()

    def charge(self) -> bool:
        with self._lock, storage.locked(storage.join(self.folder, LOCK_NAME)):
            if self.max_calls and read_spent(self.folder, but=self.uri) + self.calls >= self.max_calls:
                self.refused += 1
                return False
            self.calls += 1
            storage.write_text(self.uri, json.dumps({"calls": self.calls, "writer": self.writer,
                                                     "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
            return True

    def totals(self) -> dict[str, Any]:
        """{"calls_before", "calls_this_run", "calls_total", "max_calls", "refused"}; the
        total includes what other runs paid meanwhile."""
        with self._lock:
            total = read_spent(self.folder, but=self.uri) + self.calls
            return {"calls_before": self.before, "calls_this_run": self.calls,
                    "calls_total": total, "max_calls": self.max_calls, "refused": self.refused}


def read_spent(folder: str, but: str = "") -> int:
    """Paid calls recorded in the ledger ``folder`` (every writer but the file ``but``); 0
    when there is none yet."""
    try:
        files = storage.list_files(folder, (".json",))
    except FileNotFoundError:
        return 0
    skip = posixpath.basename(but) if but else ""
    return sum(_calls(uri) for uri in files if posixpath.basename(uri) != skip)


def _calls(uri: str) -> int:
    try:
        return int(json.loads(storage.read_text(uri)).get("calls", 0))
    except (FileNotFoundError, ValueError, AttributeError):
        return 0  # removed meanwhile, or not a ledger file


def adopt_run_ledger(run_ledger: str, folder: str, name: str) -> None:
    """Count the calls an older version recorded in a run folder (``<run>/collect/spend.json``)
    in the cache's ledger, once (as ``<folder>/<name>.json``)."""
    target = storage.join(folder, f"{name}.json")
    if storage.exists(run_ledger) and not storage.exists(target):
        storage.write_text(target, json.dumps({"calls": _calls(run_ledger), "writer": run_ledger}))


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
