"""One rate limit for the whole cluster: a zero-CPU named actor that hands out time slots.

Ray has no cluster-wide limiter, and per-actor limits multiply with the number of actors.
Here every caller on every node asks one actor for a slot; the actor only does
bookkeeping (``coin_ray.cloud.ratelimit.SlotBook``) and answers with a wall-clock send
time, so callers sleep locally for the rate (clocks of nodes are assumed NTP-synced). Only when the in-flight cap is full does a caller's
request wait inside the (async) actor until a release frees a place.

    limiter = ClusterLimiter.create(run_id, rps=10, max_in_flight=8)   # driver
    lease = limiter.acquire(); ...; limiter.release(lease, ok=True)    # any actor
    limiter.kill()                                                     # driver, at the end
"""

from __future__ import annotations

import asyncio
import time

import ray

from coin_ray.cloud.errors import AuthError
from coin_ray.cloud.ratelimit import SlotBook, late_tolerance, sleep_until

NAMESPACE = "coin_ray"
COLLECTION_OVER = "the collection was stopped; this image was not asked"
_RECHECK_S = 1.0  # waiting callers re-check at least this often (stale leases expire)


@ray.remote(num_cpus=0, max_concurrency=10_000)
class _SlotActor:
    """Async actor around one ``SlotBook``: callers over the in-flight cap wait here, in line.

    All methods run on one event loop, so the book is never touched by two calls at once.
    """

    def __init__(self, rps: float, max_in_flight: int, lease_s: float) -> None:
        self.book = SlotBook(rps, max_in_flight, lease_s)
        self.freed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self.freed is None:  # created lazily: it must belong to the actor's event loop
            self.freed = asyncio.Condition()
        return self.freed

    async def reserve(self) -> tuple[str, float] | str:
        """(lease, wall-clock send time), or the stop reason as a plain string."""
        cond = self._cond()
        async with cond:
            while True:
                try:
                    got = self.book.reserve(time.time())  # wall clock: callers on other nodes
                except AuthError:
                    return self.book.stopped
                if got is not None:
                    return got
                try:  # the timeout lets stale leases of killed callers expire
                    await asyncio.wait_for(cond.wait(), timeout=_RECHECK_S)
                except asyncio.TimeoutError:
                    pass

    async def release(self, lease: str, ok: bool) -> None:
        cond = self._cond()
        async with cond:
            self.book.release(lease, ok)
            # Wake only as many waiters as there are places: waking all of them on every
            # release costs O(waiters) per request and starves a busy machine's CPU.
            cond.notify(self.book.free())

    async def stop(self, reason: str) -> None:
        cond = self._cond()
        async with cond:
            self.book.stopped = self.book.stopped or reason
            cond.notify_all()

    async def stats(self) -> dict:
        return {"granted": self.book.granted, "in_flight": len(self.book.leases),
                "stopped": self.book.stopped}


class ClusterLimiter:
    """Client handle to the named slot actor; picklable, so actors of a Data pool share it."""

    def __init__(self, actor: "ray.actor.ActorHandle", rps: float) -> None:
        self.actor = actor
        self.tolerance = late_tolerance(rps)

    @staticmethod
    def actor_name(run_id: str) -> str:
        return f"coin-ray-cloud-limiter-{run_id}"

    @classmethod
    def create(cls, run_id: str, rps: float, max_in_flight: int,
               lease_s: float = 300.0) -> "ClusterLimiter":
        """Start (or join, if this run's limiter already lives) the named limiter actor.

        A limiter left by a killed driver may still be dying: then wait and start a new one.
        """
        for attempt in range(20):
            actor = _SlotActor.options(name=cls.actor_name(run_id), namespace=NAMESPACE,
                                       get_if_exists=True, lifetime=None).remote(
                rps, max_in_flight, lease_s)
            try:
                ray.get(actor.stats.remote(), timeout=30)
                return cls(actor, rps)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"could not start the limiter actor {cls.actor_name(run_id)}")

    def acquire(self) -> str:
        """Block (sleeping locally) until this caller's slot; raises AuthError after ``stop``,
        and once the limiter is gone (the driver kills it when the collection ends or stops)."""
        while True:
            try:
                got = ray.get(self.actor.reserve.remote())
            except ray.exceptions.RayActorError:
                # Not a backend failure of this image: the collection is over, ask nothing more.
                raise AuthError("stopped", COLLECTION_OVER) from None
            if isinstance(got, str):
                raise AuthError("stopped", got)
            lease, slot = got
            if sleep_until(slot, self.tolerance):
                return lease
            self.release(lease, ok=False)

    def release(self, lease: str, ok: bool) -> None:
        # Fire and forget: the next reserve is queued behind it on the same actor.
        self.actor.release.remote(lease, ok)

    def stop(self, reason: str) -> None:
        ray.get(self.actor.stop.remote(reason))

    def stats(self) -> dict:
        return ray.get(self.actor.stats.remote())

    def kill(self) -> None:
        ray.kill(self.actor)
