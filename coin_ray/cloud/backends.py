"""Build the configured backend: the one place that knows every backend by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from coin_ray.cloud.base import DetectorBackend
from coin_ray.cloud.client import CloudClient, RetryPolicy
from coin_ray.cloud.dds import DdsBackend
from coin_ray.cloud.errors import CloudError, Secret, read_token
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.cloud.replay import ReplayBackend
from coin_ray.config import CloudConfig

if TYPE_CHECKING:
    from coin_ray.cloud.budget import Budget
    from coin_ray.cloud.cache import AnswerCache
    from coin_ray.cloud.ratelimit import Limiter

# Backends that cannot work without a token; the others use one only when given.
NEEDS_TOKEN = {"dds"}


def _http(c: CloudConfig, categories: list[str] | None, token: Secret, root: str) -> DetectorBackend:
    return HttpBackend(c.url, threshold=c.threshold, timeout_s=c.timeout_s, token=token,
                       categories=categories)


def _dds(c: CloudConfig, categories: list[str] | None, token: Secret, root: str) -> DetectorBackend:
    return DdsBackend(token=token, model=c.model, endpoint=c.url, threshold=c.threshold,
                      timeout_s=c.timeout_s, poll_deadline_s=c.poll_deadline_s)


def _rekognition(c: CloudConfig, categories: list[str] | None, token: Secret,
                 root: str) -> DetectorBackend:
    # boto3 is imported only by runs that call AWS.
    from coin_ray.cloud.rekognition import RekognitionBackend

    return RekognitionBackend(threshold=c.threshold)


def _hf(c: CloudConfig, categories: list[str] | None, token: Secret, root: str) -> DetectorBackend:
    # transformers' detectors load only for runs that host one.
    from coin_ray.cloud.hf import HfBackend

    return HfBackend(c.model, threshold=c.threshold)


def _replay(c: CloudConfig, categories: list[str] | None, token: Secret,
            root: str) -> DetectorBackend:
    # cloud.model names the COCO annotations JSON when cloud.url is a COCO results list.
    return ReplayBackend(c.url, categories=categories, images_root=root, annotations=c.model)


BACKENDS: dict[str, Callable[..., DetectorBackend]] = {
    "http": _http, "dds": _dds, "rekognition": _rekognition, "hf": _hf, "replay": _replay}


def build_backend(cloud: CloudConfig, categories: list[str] | None, token: Secret | None = None,
                  images_root: str = "") -> DetectorBackend:
    """The backend named by ``cloud.backend``.

    Args:
        categories: the run's K category names (used to order full probability answers).
        token: the API token; None reads the variable named by ``cloud.token_env``.
        images_root: folder that relative image names of replay sources live under.
    """
    if cloud.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cloud.backend!r} (known: {', '.join(BACKENDS)})")
    if token is None:
        token = read_token(cloud.token_env, cloud.backend, cloud.backend in NEEDS_TOKEN)
    return BACKENDS[cloud.backend](cloud, categories, token, images_root)


def model_id(cloud: CloudConfig, backend: DetectorBackend) -> str:
    """What identifies the model in cache keys: ``cloud.model``, else what the backend runs.

    For ``http`` that is the model the server reports, not its URL: the same detector served
    on another port (a restarted demo server) must hit the same cache entries.
    """
    if cloud.model:
        return cloud.model
    if isinstance(backend, HttpBackend):
        try:
            return backend.server_model() or cloud.url
        except CloudError:  # a server without /v1/health (or down): its URL must do
            return cloud.url
    return str(getattr(backend, "model_name", "") or cloud.url)


def client_for(cloud: CloudConfig, backend: DetectorBackend, prompts: list[str], *,
               cache: "AnswerCache | None", limiter: "Limiter", budget: "Budget | None" = None,
               seed: int = 0) -> CloudClient:
    """The ``CloudClient`` the ``cloud`` section describes (retries, Retry-After cap, failures)."""
    policy = RetryPolicy(max_retries=cloud.max_retries, max_wait_s=cloud.max_retry_after_s)
    return CloudClient(backend, prompts=prompts, model=model_id(cloud, backend),
                       threshold=cloud.threshold, cache=cache, limiter=limiter, policy=policy,
                       token_env=cloud.token_env, seed=seed, budget=budget,
                       retry_failed=cloud.retry_failed)
