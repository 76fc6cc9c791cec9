"""One rate limit for the whole cluster: a zero-CPU named actor that hands out time slots.

Ray has no cluster-wide limiter, and per-actor limits multiply with the number of actors.
Here every caller on every node asks one actor for a slot; the actor only does
bookkeeping (``coin_ray.cloud.ratelimit.SlotBook``) and answers at once with how long to
wait, so callers sleep locally and the actor never blocks. When the in-flight cap is full
the actor says so and the caller polls again shortly.

    limiter = ClusterLimiter.create(run_id, rps=10, max_in_flight=8)   # driver
    lease = limiter.acquire(); ...; limiter.release(lease, ok=True)    # any actor
    limiter.kill()                                                     # driver, at the end
"""

from __future__ import annotations

import time

import ray

from coin_ray.cloud.errors import AuthError
from coin_ray.cloud.ratelimit import SlotBook

NAMESPACE = "coin_ray"
_POLL_S = 0.01  # first re-ask delay while the in-flight cap is full ...
_MAX_POLL_S = 0.1  # ... growing to this


@ray.remote(num_cpus=0, max_concurrency=1)
class _SlotActor:
    """Serialises every reservation through one ``SlotBook`` (one call at a time)."""

    def __init__(self, rps: float, max_in_flight: int, lease_s: float) -> None:
        self.book = SlotBook(rps, max_in_flight, lease_s)

    def reserve(self) -> tuple[str, float] | None | str:
        """(lease, wait seconds), None when full, or the stop reason as a plain string."""
        try:
            return self.book.reserve(time.monotonic())
        except AuthError:
            return self.book.stopped

    def release(self, lease: str, ok: bool) -> None:
        self.book.release(lease, ok)

    def stop(self, reason: str) -> None:
        self.book.stopped = self.book.stopped or reason

    def stats(self) -> dict:
        return {"granted": self.book.granted, "in_flight": len(self.book.leases),
                "stopped": self.book.stopped}


class ClusterLimiter:
    """Client handle to the named slot actor; picklable, so actors of a Data pool share it."""

    def __init__(self, actor: "ray.actor.ActorHandle") -> None:
        self.actor = actor

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
                return cls(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"could not start the limiter actor {cls.actor_name(run_id)}")

    def acquire(self) -> str:
        """Block (sleeping locally) until this caller's slot; raises AuthError after ``stop``."""
        poll = _POLL_S
        while True:
            got = ray.get(self.actor.reserve.remote())
            if isinstance(got, str):
                raise AuthError("stopped", got)
            if got is not None:
                lease, wait = got
                time.sleep(wait)
                return lease
            time.sleep(poll)
            poll = min(poll * 1.5, _MAX_POLL_S)  # many waiting callers must not flood the actor

    def release(self, lease: str, ok: bool) -> None:
        # Fire and forget: the next reserve is queued behind it on the same actor.
        self.actor.release.remote(lease, ok)

    def stop(self, reason: str) -> None:
        ray.get(self.actor.stop.remote(reason))

    def stats(self) -> dict:
        return ray.get(self.actor.stats.remote())

    def kill(self) -> None:
        ray.kill(self.actor)
