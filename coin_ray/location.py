"""Where a run lives: one rule, applied once on the driver, for every way of launching it.

``storage`` (and ``cloud.cache``, ``data.world_cache``) may be relative, e.g. the default
``runs``. Relative to what must not depend on who runs the driver:

    python jobs/adapt.py / coin-ray adapt    the current folder: ./runs
    ray job submit (no --working-dir)        the job's current folder (where `ray start` ran)
    ray job submit --working-dir .           NOT the current folder: Ray runs the driver in a
                                             temporary copy of the upload, deleted with the
                                             session. Relative outputs go under $COIN_RAY_HOME
                                             (default ~/coin-ray-runs) instead.
    jobs/tune.py trials                      never re-resolved: Tune moves every trial into a
                                             folder of its own, so trials get absolute paths

The result is an absolute path (or the s3:// prefix as given), printed at the start and the
end of a run together with the answer cache. A local path cannot be right on a multi-node
cluster whose nodes do not share a file system: ``refuse_unshared`` says so in one line
(``coin_ray.ray.cluster`` calls it once it knows the node count).

Paid answers are the exception to "under ``storage``": one answer cache per user, like the
Hugging Face hub cache, at ``<cache home>/answers`` (``$COIN_RAY_CACHE``, default
``~/.cache/coin_ray``; the Foggy-Shapes worlds live beside it in ``<cache home>/world``), so
local runs, ``ray job submit``, sweeps and every ``storage`` find the same answers and never
pay twice. ``cloud.cache`` puts it elsewhere (an s3:// prefix for a cluster). A cache of an
older version at ``<storage>/cache`` is still read (``legacy_cache_location``).

Inputs (``data.target_images``, the CLIP model, ...) are made absolute against the current
folder: under ``--working-dir`` they are read from the upload, which is what was meant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from coin_ray import storage
from coin_ray.config import Config, with_updates
from coin_ray.errors import UserError

CACHE_ENV = "COIN_RAY_CACHE"  # the project's cache home: paid answers and built worlds
DEFAULT_CACHE_HOME = "~/.cache/coin_ray"
ANSWERS_DIR = "answers"  # <cache home>/answers; the worlds are <cache home>/world
HOME_ENV = "COIN_RAY_HOME"  # where relative outputs go when the current folder is temporary
DEFAULT_HOME = "~/coin-ray-runs"
SHARED_ENV = "COIN_RAY_SHARED_STORAGE"  # "1": the local storage path is on every node (NFS, ...)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for the driver only
OUTPUT_KEYS = ("storage", "cloud.cache", "data.world_cache")


def is_uri(path: str) -> bool:
    """True for s3://, gs://, http:// ... (anything with a scheme): left as given."""
    return "://" in str(path)


def job_working_dir(env: dict[str, str] | None = None) -> str:
    """The ``working_dir`` of the ``ray job submit`` that started this driver, or ""."""
    raw = (os.environ if env is None else env).get(JOB_CONFIG_ENV, "")
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {} if raw else {}
    except (ValueError, AttributeError):
        return ""
    return str(runtime_env.get("working_dir") or "")


def cwd_is_temporary(cwd: str | None = None, env: dict[str, str] | None = None) -> bool:
    """Whether the current folder is Ray's temporary copy of an uploaded working dir."""
    cwd = os.getcwd() if cwd is None else cwd
    return bool(job_working_dir(env)) or "runtime_resources" in Path(cwd).parts


def runs_home(env: dict[str, str] | None = None) -> str:
    """The stable folder relative outputs go under when the current folder is temporary."""
    home = (os.environ if env is None else env).get(HOME_ENV) or DEFAULT_HOME
    return os.path.abspath(os.path.expanduser(home))


def cache_home(env: dict[str, str] | None = None) -> str:
    """The project's cache home: ``$COIN_RAY_CACHE``, else ``~/.cache/coin_ray`` (absolute)."""
    home = (os.environ if env is None else env).get(CACHE_ENV) or DEFAULT_CACHE_HOME
    return os.path.abspath(os.path.expanduser(home))


def default_answer_cache(env: dict[str, str] | None = None) -> str:
    """The per-user answer cache: ``<cache home>/answers``."""
    return os.path.join(cache_home(env), ANSWERS_DIR)


def resolve_output(path: str, cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    """Absolute location of an output path (see the module docstring); "" and URIs unchanged."""
    if not path or is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    cwd = os.getcwd() if cwd is None else cwd
    base = runs_home(env) if cwd_is_temporary(cwd, env) else cwd
    return os.path.normpath(os.path.join(base, path))


def resolve_input(path: str) -> str:
    """Absolute local input path against the current folder; "" and URIs unchanged."""
    if not path or is_uri(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _input_keys(cfg: Config) -> dict[str, str]:
    keys = {"data.target_images": cfg.data.target_images, "data.val_annotations": cfg.data.val_annotations}
    if cfg.data.val_format == "coco":  # for VOC it names the split
        keys["data.val_images"] = cfg.data.val_images
    if cfg.clip.model and os.path.exists(os.path.expanduser(cfg.clip.model)):  # else a hub id or s3://
        keys["clip.model"] = cfg.clip.model
    if cfg.cloud.backend == "replay":
        keys["cloud.url"] = cfg.cloud.url
    return keys


def resolve_config(cfg: Config, cwd: str | None = None, env: dict[str, str] | None = None) -> Config:
    """``cfg`` with every local path absolute: outputs by ``resolve_output``, inputs against
    the current folder. Idempotent; call it on the driver before anything is handed to Ray."""
    outputs = {"storage": cfg.storage, "cloud.cache": cfg.cloud.cache, "data.world_cache": cfg.data.world_cache}
    updates = {k: resolve_output(v, cwd, env) for k, v in outputs.items()}
    # Fixed here, on the driver, so every worker and the run's config.yaml name one cache.
    updates["cloud.cache"] = updates["cloud.cache"] or default_answer_cache(env)
    updates.update({k: resolve_input(v) for k, v in _input_keys(cfg).items()})
    changed = {k: v for k, v in updates.items() if v != _get(cfg, k)}
    if not changed:
        return cfg
    return with_updates(cfg, [f"{k}={json.dumps(v)}" for k, v in changed.items()])


def _get(cfg: Config, dotted: str) -> str:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def cache_location(cfg: Config) -> str:
    """The cloud answer cache of ``cfg``'s runs: ``cloud.cache``, else the per-user one."""
    return cfg.cloud.cache or default_answer_cache()


def legacy_cache_location(cfg: Config) -> str:
    """``<storage>/cache``, where older versions kept answers; "" when that is the cache itself.

    Still read (entries found there are hits), never written: nobody pays again after upgrading.
    """
    legacy = storage.join(cfg.storage, "cache")
    return "" if legacy.rstrip("/") == cache_location(cfg).rstrip("/") else legacy


def describe(cfg: Config, run_root: str) -> str:
    """One line naming the run folder and the answer cache (printed at start and end)."""
    return f"[coin-ray] run: {run_root}  answer cache: {cache_location(cfg)}"


def refuse_unshared(storage_uri: str, nodes: int, env: dict[str, str] | None = None,
                    key: str = "storage") -> None:
    """Raise UserError when a local ``storage`` (or the answer cache, ``key="cloud.cache"``)
    is used by a cluster of several nodes, unless ``COIN_RAY_SHARED_STORAGE=1`` says that
    folder is shared by every node."""
    env = os.environ if env is None else env
    if nodes <= 1 or is_uri(storage_uri) or env.get(SHARED_ENV) == "1":
        return
    raise UserError(f"{key} {storage_uri} is a local folder but the Ray cluster has {nodes} nodes: "
                    f"set {key}=s3://<bucket>/<prefix>, or {SHARED_ENV}=1 if that folder is shared by every node")
