"""Requests per second and requests in flight, as a book of reserved time slots.

``SlotBook`` is the pure bookkeeping (no threads, no Ray, clock passed in) shared by the
in-process ``LocalLimiter`` and the cluster-wide Ray actor (``coin_ray.ray.limiter``).
A caller asks for a slot; the book answers the wall-clock time to send at (slots are
1/rps apart) or that the in-flight cap is full. A caller that wakes up most of a slot
late gives its slot back and asks again, so late callers never bunch up.

Until the first request succeeds only one request is let out at a time ("probing"): a
wrong token then costs one request, not a whole in-flight window of them. After ``stop``
every caller is refused with the stop reason (401/403 end the run that way).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from coin_ray.cloud.errors import AuthError


class Limiter(Protocol):
    """What the retry loop needs from a limiter (local or cluster-wide)."""

    def acquire(self) -> str:
        """Block until a request may be sent; returns a lease id. Raises AuthError when stopped."""
        ...

    def release(self, lease: str, ok: bool) -> None:
        """The request under ``lease`` ended; ``ok`` when the backend answered."""
        ...

    def stop(self, reason: str) -> None:
        """Refuse every later acquire with ``reason``."""
        ...


@dataclass
class SlotBook:
    """Reserve send times at most ``rps`` per second and at most ``max_in_flight`` at once.

    Leases older than ``lease_s`` are reclaimed: a caller killed mid-request must not hold
    its in-flight place forever.
    """

    rps: float
    max_in_flight: int
    lease_s: float = 300.0
    next_slot: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)
    probing: bool = True
    stopped: str = ""
    granted: int = 0

    def reserve(self, now: float) -> tuple[str, float] | None:
        """(lease id, send time on the ``now`` clock), or None when the in-flight cap is full."""
        if self.stopped:
            raise AuthError("stopped", self.stopped)
        self.leases = {k: t for k, t in self.leases.items() if now - t < self.lease_s}
        cap = 1 if self.probing else self.max_in_flight
        if len(self.leases) >= cap:
            return None
        slot = max(now, self.next_slot)
        self.next_slot = slot + 1.0 / self.rps
        lease = uuid.uuid4().hex
        self.leases[lease] = now
        self.granted += 1
        return lease, slot

    def release(self, lease: str, ok: bool) -> None:
        self.leases.pop(lease, None)
        if ok:
            self.probing = False

    def free(self) -> int:
        """In-flight places open now (how many waiting callers are worth waking)."""
        return max(0, (1 if self.probing else self.max_in_flight) - len(self.leases))


def late_tolerance(rps: float) -> float:
    """How late a caller may still use its slot: 0.9 of a slot keeps any 1-second window
    at no more than floor(rps) + 1 requests however unevenly callers wake up, while a busy
    machine (late wake-ups of a few ms) rarely has to give a slot back."""
    return 0.9 / rps


def sleep_until(slot: float, tolerance: float) -> bool:
    """Sleep until wall-clock ``slot``; False if this caller woke up too late to use it.

    A late caller must not send on a stale slot: it would land right before the next
    caller's, a burst the server counts. It reserves a new slot instead.
    """
    time.sleep(max(0.0, slot - time.time()))
    return time.time() - slot <= tolerance


class LocalLimiter:
    """A ``SlotBook`` shared by the threads of one process."""

    def __init__(self, rps: float, max_in_flight: int, lease_s: float = 300.0) -> None:
        self.book = SlotBook(rps, max_in_flight, lease_s)
        self.cond = threading.Condition()

    def acquire(self) -> str:
        while True:
            with self.cond:
                while (got := self.book.reserve(time.time())) is None:
                    self.cond.wait(timeout=0.05)
            lease, slot = got
            if sleep_until(slot, late_tolerance(self.book.rps)):
                return lease
            self.release(lease, ok=False)

    def release(self, lease: str, ok: bool) -> None:
        with self.cond:
            self.book.release(lease, ok)
            self.cond.notify(self.book.free())

    def stop(self, reason: str) -> None:
        with self.cond:
            self.book.stopped = reason
            self.cond.notify_all()
