"""Ask a backend about one image: cache first, then the limiter, retries and backoff.

    client = CloudClient(backend, prompts=cmap.prompt_list(), model="...", threshold=0.25,
                         cache=AnswerCache(root, "http"), limiter=LocalLimiter(10, 8))
    outcome = client.ask(image_bytes, image)   # never raises, except AuthError

Every attempt (first try or retry) passes the limiter, so retries count against the
requests-per-second budget. 429s wait at least their Retry-After; other transient errors
back off exponentially with jitter. After ``max_retries`` retries the image gets an error
outcome with the last reason. 401/403 stop the limiter (every other caller in the run is
then refused too) and raise ``AuthError`` naming the backend and the token's env var.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import numpy as np

from coin_ray.cloud.base import CloudAnswer, DetectorBackend
from coin_ray.cloud.cache import AnswerCache, cache_key
from coin_ray.cloud.errors import AuthError, PermanentError, TransientError, auth_message
from coin_ray.cloud.ratelimit import Limiter

log = logging.getLogger(__name__)


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: base_s * 2**(attempt-1), capped, times U(0.5, 1.5)."""

    max_retries: int = 5
    base_s: float = 0.25
    max_backoff_s: float = 10.0


@dataclass
class Outcome:
    """The result of asking about one image.

    calls: requests actually sent (0 on a cache hit); reason: short error tag or "".
    """

    answer: CloudAnswer | None
    calls: int
    cache_hit: bool
    error: str = ""
    reason: str = ""


class CloudClient:
    """Thread-safe: one client may serve many threads of one actor."""

    def __init__(self, backend: DetectorBackend, *, prompts: list[str], model: str,
                 threshold: float, cache: AnswerCache | None, limiter: Limiter,
                 policy: RetryPolicy | None = None, token_env: str = "", seed: int = 0) -> None:
        self.backend = backend
        self.prompts = list(prompts)
        self.model = model
        self.threshold = threshold
        self.cache = cache
        self.limiter = limiter
        self.policy = policy or RetryPolicy()
        self.token_env = token_env
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def key(self, image_bytes: bytes) -> str:
        return cache_key(image_bytes, self.backend.name, self.model, self.prompts, self.threshold)

    def ask(self, image_bytes: bytes, image: np.ndarray) -> Outcome:
        """The answer for one image (from the cache when present; stored there before return).

        Raises:
            AuthError: credentials refused (here or by another caller of the same limiter).
        """
        key = self.key(image_bytes)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return Outcome(hit, 0, True)
        attempts = 0
        while True:
            lease = self.limiter.acquire()
            attempts += 1
            try:
                answer = self.backend.detect(image_bytes, image, self.prompts)
            except TransientError as err:
                self.limiter.release(lease, ok=False)
                if attempts > self.policy.max_retries:
                    return Outcome(None, attempts, False,
                                   f"{err.reason}: gave up after {attempts} attempts ({err})",
                                   err.reason)
                time.sleep(self._backoff(attempts, err.retry_after))
                continue
            except AuthError as err:
                self.limiter.release(lease, ok=False)
                message = auth_message(self.backend.name, self.token_env)
                self.limiter.stop(message)
                raise AuthError(err.reason, message) from None
            except PermanentError as err:
                self.limiter.release(lease, ok=False)
                return Outcome(None, attempts, False, str(err), err.reason)
            except Exception as err:  # a backend bug on one image must not end the run
                self.limiter.release(lease, ok=False)
                log.warning("backend %s failed on one image: %s", self.backend.name,
                            type(err).__name__)
                return Outcome(None, attempts, False, f"backend error: {type(err).__name__}",
                               "backend error")
            self.limiter.release(lease, ok=True)
            if self.cache is not None:
                self.cache.put(key, answer, self.model)
            return Outcome(answer, attempts, False)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        p = self.policy
        with self._rng_lock:
            jitter = self._rng.uniform(0.5, 1.5)
        delay = min(p.max_backoff_s, p.base_s * 2 ** (attempt - 1)) * jitter
        if retry_after is not None:
            # The server said when: wait that long, plus a little jitter so callers spread.
            delay = retry_after + p.base_s * (jitter - 0.5)
        return delay
