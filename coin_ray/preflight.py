"""Checks run on the driver before any stage, so a user's mistake costs one line, not a run.

    check_adapt(cfg, collect=True)   # raises UserError / CredentialError

Each check names the key to change. Nothing here calls a paid API: the cloud URL is only
probed with a TCP connect (an unreachable host then stops before Ray starts); a token is
only checked for presence (whether it is accepted shows on the first request, and
``coin_ray.ray.collect`` stops the run then).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from coin_ray import storage
from coin_ray.cloud.backends import NEEDS_TOKEN
from coin_ray.config import Config
from coin_ray.errors import CredentialError, Unreachable, UserError, one_line
from coin_ray.model_check import CLIP_TYPES, HF_DETECTOR_TYPES, check_model

PROBE_TIMEOUT_S = 5.0


def check_exists(key: str, uri: str) -> None:
    """Raise UserError when the file, folder, bucket or prefix ``uri`` (named by ``key``) is absent."""
    try:
        found = storage.exists(uri)
    except OSError as err:  # a missing or forbidden bucket, a bad endpoint
        raise UserError(f"{key}: cannot read {uri} ({one_line(err)})") from None
    if not found:
        raise UserError(f"{key}: {uri} does not exist")


def count_images(key: str, uri: str) -> int:
    """Files under ``uri`` (recursive, hidden ones skipped); UserError when missing or empty."""
    check_exists(key, uri)
    try:
        n = len(storage.list_files(uri))
    except OSError as err:
        raise UserError(f"{key}: cannot list {uri} ({one_line(err)})") from None
    if n == 0:
        raise UserError(f"0 images found under {uri} ({key})")
    return n


def check_token(cfg: Config) -> None:
    """CredentialError when the backend needs a token and its environment variable is unset."""
    c = cfg.cloud
    if c.backend not in NEEDS_TOKEN and not c.token_env:
        return
    if not c.token_env:
        raise CredentialError(f"cloud.backend {c.backend} needs an API token: set cloud.token_env "
                              "to the NAME of the environment variable that holds it")
    if not os.environ.get(c.token_env):
        raise CredentialError(f"cloud.token_env names {c.token_env}, which is not set: "
                              f"export {c.token_env}=<your API token>")


def probe_url(key: str, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Unreachable when nothing accepts a TCP connection at ``url``'s host and port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{key}: {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return
    except OSError as err:
        raise Unreachable(f"{key}: nothing answers at {url} ({one_line(err)})") from None


def check_models(cfg: Config, collect: bool) -> None:
    """Every model the run will load is there (``coin_ray.model_check``): the CLIP model
    (every stage uses it; "" is the Foggy-Shapes stand-in, built later) and, with ``collect``,
    a local cloud backend's weights. A finished stage's saved detector is rebuilt from the
    same ``clip.model`` (a changed one runs those stages again), so checking it covers resumes."""
    if cfg.clip.model:
        check_model("clip.model", cfg.clip.model, CLIP_TYPES)
    elif cfg.data.target_images:  # the stand-in CLIP knows only the built-in world
        raise UserError("clip.model: empty, and the Foggy-Shapes stand-in CLIP is for the built-in world only: "
                        "name a CLIP model for your images (a hub id such as openai/clip-vit-base-patch16, "
                        "a folder or an s3:// folder)")
    if collect and cfg.cloud.backend == "hf":
        if not cfg.cloud.model:
            raise UserError("cloud.model: backend hf needs a model (a hub id, a folder or an s3:// folder)")
        check_model("cloud.model", cfg.cloud.model, HF_DETECTOR_TYPES)


def check_adapt(cfg: Config, collect: bool) -> None:
    """Every input of an adaptation run exists and every model it loads is there; with
    ``collect``, the cloud can be asked.

    ``cfg`` has absolute paths (``coin_ray.location.resolve_config``); an empty
    ``data.target_images`` is the built-in world, built later, and not checked here.
    """
    d = cfg.data
    if d.target_images:
        count_images("data.target_images", d.target_images)
    if d.val_annotations:
        check_exists("data.val_annotations", d.val_annotations)
        if d.val_format == "coco" and d.val_images:
            check_exists("data.val_images", d.val_images)
    if collect:
        check_token(cfg)
        if cfg.cloud.backend == "http" and cfg.cloud.url:
            probe_url("cloud.url", cfg.cloud.url)
    check_models(cfg, collect)


def stop_if_unreachable(reasons: list[str], url: str) -> None:
    """After the first batch of cloud calls: Unreachable when every one failed to connect.

    A run where nothing answers would otherwise "succeed" with nothing labelled. One image
    that got through (or failed otherwise) means the cloud is there: errors stay per image.
    """
    # Timeouts are left out: a slow cloud is there (a host that drops packets is caught by
    # the start-up probe's connect timeout instead).
    if reasons and all(r == "connection" for r in reasons):
        raise Unreachable(f"cloud.url: nothing answers at {url or '(no URL)'}: every request of the "
                          f"first {len(reasons)} images failed to connect")


def probe_ray_address(address: str, hostport: str = "", timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Unreachable unless something listens at the Ray cluster ``address`` (RAY_ADDRESS).

    ``hostport`` is where ``address`` points (given for ``auto``, which needs Ray to look up);
    without it a literal ``host:port`` or ``ray://host:port`` is probed and ``auto`` skipped.
    Runs before Ray is imported, so a dead address costs seconds, not the import of Ray.
    """
    if address.startswith(("http://", "https://")):
        raise Unreachable(f"RAY_ADDRESS={address} is a dashboard URL (it is for `ray job submit --address`); "
                          "set RAY_ADDRESS to the cluster's host:6379 or to auto")
    hostport = hostport or (address[len("ray://"):] if address.startswith("ray://") else address)
    if hostport in ("", "auto", "local"):
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        shown = address if address == hostport else f"{address} ({hostport})"
        raise Unreachable(f"cannot reach the Ray cluster at RAY_ADDRESS={shown}: {one_line(err)}; "
                          "start it with `ray start --head` or unset RAY_ADDRESS") from None
