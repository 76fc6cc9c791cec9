"""Ask a backend about one image: cache first, then the budget, the limiter, retries, backoff.

    client = CloudClient(backend, prompts=cmap.prompt_list(), model="...", threshold=0.25,
                         cache=AnswerCache(root, "http"), limiter=LocalLimiter(10, 8))
    outcome = client.ask(image_bytes, image)   # never raises, except AuthError, UnknownCategories

Every attempt (first try or retry) passes the limiter, so retries count against the
requests-per-second budget; every paid call (a detect request, a task creation) is first
charged to the spend cap, and is not sent when the cap is reached. 429s wait their
Retry-After (at most ``RetryPolicy.max_wait_s``); other transient errors back off
exponentially with jitter. After ``max_retries`` retries the image gets an error outcome
with the last reason. 401/403 stop the limiter (every other caller in the run is then
refused too) and raise ``AuthError`` naming the backend and the token's env var; prompts
the detector cannot answer (``UnknownCategories``) stop the limiter the same way.

Task backends (``base.TaskBackend``, e.g. dds) are paid once per question: the created
task's handle is stored in the cache as "pending" before polling, and a poll timeout, a
retry or a resumed run polls that task again; a new task is created only when the service
says the old one is gone (or, with ``retry_failed``, failed). Creation retries send the
same Idempotency-Key. Refused images and failed tasks are remembered in the cache and
skipped by later runs unless ``retry_failed`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from coin_ray.cloud.base import CloudAnswer, DetectorBackend, is_task_backend
from coin_ray.cloud.budget import Budget, Unlimited
from coin_ray.cloud.cache import AnswerCache, cache_key, idempotency_key
from coin_ray.cloud.errors import (AuthError, PermanentError, TaskGone, TransientError,
                                   UnknownCategories, auth_message)
from coin_ray.cloud.ratelimit import Limiter

log = logging.getLogger(__name__)

SKIPPED = "failed before"  # reason of an image skipped because an earlier run failed on it
BUDGET = "budget"  # reason of an image not asked because the spend cap was reached
PENDING = "pending"
FAILED = "failed"


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: base_s * 2**(attempt-1), capped, times U(0.5, 1.5).

    A server's Retry-After replaces the backoff, but is waited at most ``max_wait_s``.
    """

    max_retries: int = 5
    base_s: float = 0.25
    max_backoff_s: float = 10.0
    max_wait_s: float = 120.0


@dataclass
class Outcome:
    """The result of asking about one image.

    calls: paid calls actually sent (0 on a cache hit or a skip); reason: short error tag or "".
    unfinished: no answer, and none is ruled out: the budget stopped it or transient errors
    outlasted the retries, so a re-run asks again (a refused image is remembered, not this).
    """

    answer: CloudAnswer | None
    calls: int
    cache_hit: bool
    error: str = ""
    reason: str = ""
    unfinished: bool = False


class _OverBudget(Exception):
    """The spend cap refused the next paid call."""


class _GaveUp(Exception):
    """Transient errors outlasted the retries; ``reason`` is the last error's tag."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason, self.error = reason, error


@dataclass
class _Tally:
    """One ``ask``: paid calls sent, transient failures so far, the task generation."""

    calls: int = 0
    tries: int = 0
    generation: int = 0


class CloudClient:
    """Thread-safe: one client may serve many threads of one actor."""

    def __init__(self, backend: DetectorBackend, *, prompts: list[str], model: str,
                 threshold: float, cache: AnswerCache | None, limiter: Limiter,
                 policy: RetryPolicy | None = None, token_env: str = "", seed: int = 0,
                 budget: Budget | None = None, retry_failed: bool = False) -> None:
        self.backend = backend
        self.prompts = list(prompts)
        self.model = model
        self.threshold = threshold
        self.cache = cache
        self.limiter = limiter
        self.policy = policy or RetryPolicy()
        self.token_env = token_env
        self.budget = budget or Unlimited()
        self.retry_failed = retry_failed
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def key(self, image_bytes: bytes) -> str:
        return cache_key(image_bytes, self.backend.name, self.model, self.prompts, self.threshold)

    def ask(self, image_bytes: bytes, image: np.ndarray) -> Outcome:
        """The answer for one image (from the cache when present; stored there before return).

        Raises:
            AuthError: credentials refused (here or by another caller of the same limiter),
                or the limiter was stopped by another caller.
            UnknownCategories: the detector cannot answer some of the prompts.
        """
        key = self.key(image_bytes)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return Outcome(hit, 0, True)
        # One caller per question at a time, across threads and runs sharing the cache: a
        # second one waits here, then finds the first one's answer instead of paying again.
        with self.cache.claimed(key) if self.cache is not None else contextlib.nullcontext():
            if self.cache is not None and (hit := self.cache.get(key)) is not None:
                return Outcome(hit, 0, True)
            return self._ask_claimed(key, image_bytes, image)

    def _ask_claimed(self, key: str, image_bytes: bytes, image: np.ndarray) -> Outcome:
        """``ask`` for a question not in the cache, its claim held."""
        failed = self._state(key, FAILED)
        if failed is not None and not self.retry_failed:
            return Outcome(None, 0, False, f"{SKIPPED}: {failed.get('error', '')} (not asked "
                           "again; cloud.retry_failed or --retry-failed asks)", SKIPPED)
        tally = _Tally()
        try:
            if is_task_backend(self.backend):
                answer = self._ask_task(key, image_bytes, image, failed, tally)
            else:
                answer = self._retrying(tally, lambda: self._paid(
                    tally, lambda: self.backend.detect(image_bytes, image, self.prompts)))
        except _OverBudget:
            return Outcome(None, tally.calls, False, "not asked: the spend cap is reached "
                           "(raise cloud.max_calls / cloud.max_spend and run again)", BUDGET, True)
        except _GaveUp as err:
            return Outcome(None, tally.calls, False, err.error, err.reason, True)
        except UnknownCategories:
            raise  # about the run's prompts, not this image: not remembered as its failure
        except PermanentError as err:
            self._remember_failure(key, err, tally.generation)
            return Outcome(None, tally.calls, False, str(err), err.reason)
        except AuthError:
            raise
        except Exception as err:  # a backend bug on one image must not end the run
            log.warning("backend %s failed on one image: %s", self.backend.name,
                        type(err).__name__)
            return Outcome(None, tally.calls, False, f"backend error: {type(err).__name__}",
                           "backend error", True)
        if self.cache is not None:
            self.cache.put(key, answer, self.model)
            if failed is not None:
                self.cache.drop_state(key, FAILED)
        return Outcome(answer, tally.calls, False)

    def _ask_task(self, key: str, image_bytes: bytes, image: np.ndarray, failed: dict | None,
                  tally: _Tally) -> CloudAnswer:
        """Poll the pending task of ``key`` if there is one, else create one; see the module doc."""
        pending = self._state(key, PENDING)
        if pending is not None:
            handle, tally.generation = pending["handle"], int(pending.get("generation", 0))
        else:
            handle, tally.generation = None, int(failed.get("generation", -1)) + 1 if failed else 0
        while True:
            if handle is None:
                idem = idempotency_key(key, tally.generation)
                handle = self._retrying(tally, lambda: self._paid(
                    tally, lambda: self.backend.create_task(image_bytes, image, self.prompts, idem)))
                self._put_state(key, PENDING, {"handle": handle, "generation": tally.generation})
            try:
                answer = self._retrying(tally, lambda: self._leased(
                    lambda: self.backend.poll_task(handle, image)), still_pending=True)
            except TaskGone as err:
                self._drop_state(key, PENDING)
                tally.tries += 1
                if tally.tries > self.policy.max_retries:
                    raise _GaveUp(err.reason, f"{err}: gave up after {tally.tries} attempts") from None
                log.info("backend %s lost a task; creating it again", self.backend.name)
                handle, tally.generation = None, tally.generation + 1
                continue
            except PermanentError:
                self._drop_state(key, PENDING)
                raise
            self._drop_state(key, PENDING)
            return answer

    def _retrying(self, tally: _Tally, send: Callable[[], Any], still_pending: bool = False) -> Any:
        """Call ``send`` until it returns, retrying transient errors (``tally`` counts tries)."""
        while True:
            try:
                return send()
            except TransientError as err:
                tally.tries += 1
                if tally.tries > self.policy.max_retries:
                    suffix = "; the task is kept and polled again by the next run" \
                        if still_pending else ""
                    raise _GaveUp(err.reason, f"{err.reason}: gave up after {tally.tries} "
                                  f"attempts ({err}){suffix}") from None
                time.sleep(self._backoff(tally.tries, err.retry_after))

    def _paid(self, tally: _Tally, call: Callable[[], Any]) -> Any:
        """``call`` as a paid request: charged to the spend cap first, then under a lease."""
        if not self.budget.charge():
            raise _OverBudget()
        tally.calls += 1
        return self._leased(call)

    def _leased(self, call: Callable[[], Any]) -> Any:
        """``call`` under a limiter lease; a refused token stops every caller of the limiter."""
        lease = self.limiter.acquire()
        try:
            result = call()
        except AuthError as err:
            message = auth_message(self.backend.name, self.token_env)
            # Stop before releasing: a released probe slot would let one more request out.
            self.limiter.stop(message)
            self.limiter.release(lease, ok=False)
            raise AuthError(err.reason, message) from None
        except UnknownCategories as err:
            # Every image would get the same answer: stop the others before they pay for it.
            self.limiter.stop(str(err))
            self.limiter.release(lease, ok=False)
            raise
        except BaseException:
            self.limiter.release(lease, ok=False)
            raise
        self.limiter.release(lease, ok=True)
        return result

    def _remember_failure(self, key: str, err: PermanentError, generation: int) -> None:
        self._put_state(key, FAILED, {"reason": err.reason, "error": str(err)[:300],
                                      "generation": generation})

    def _state(self, key: str, kind: str) -> dict | None:
        return self.cache.state(key, kind) if self.cache is not None else None

    def _put_state(self, key: str, kind: str, state: dict) -> None:
        if self.cache is not None:
            self.cache.put_state(key, kind, state)

    def _drop_state(self, key: str, kind: str) -> None:
        if self.cache is not None:
            self.cache.drop_state(key, kind)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        p = self.policy
        with self._rng_lock:
            jitter = self._rng.uniform(0.5, 1.5)
        delay = min(p.max_backoff_s, p.base_s * 2 ** (attempt - 1)) * jitter
        if retry_after is not None:
            # The server said when: wait that long (within our cap), plus a little jitter so
            # callers spread, never less.
            delay = min(retry_after, p.max_wait_s) + p.base_s * (jitter - 0.5)
        return delay
