"""Is a model the run will load there? Checked on the driver before any stage or paid call.

    check_model("clip.model", "openai/clip-vit-base-patch32", CLIP_TYPES)   # UserError if not

A model is named as ``from_pretrained`` takes it: a local folder, an ``s3://`` folder or a
Hugging Face hub id. The check reads file names and ``config.json`` only, never the weights,
and imports neither torch nor transformers, so it costs well under a second for a folder.

A hub id is looked up in the local Hugging Face cache first (what ``from_pretrained`` falls
back to without a network). Otherwise, with ``HF_HUB_OFFLINE=1`` it fails at once, and else
the hub is asked once with a short timeout: an unreachable hub stops the run here, naming
the key and the value, instead of after the cloud has answered every image.
"""

from __future__ import annotations

import json
import os
import re

from coin_ray import storage
from coin_ray.errors import UserError, one_line

HUB_TIMEOUT_S = 5.0
CLIP_TYPES = ("clip",)
# The zero-shot detectors coin_ray.cloud.hf can drive (its GROUNDING_TYPES + OWL_TYPES).
HF_DETECTOR_TYPES = ("grounding-dino", "mm-grounding-dino", "owlv2", "owlvit")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "org/name"


def check_model(key: str, name: str, model_types: tuple[str, ...]) -> None:
    """UserError (one line naming ``key`` and ``name``) unless ``name`` holds a loadable model.

    Loadable here: a ``config.json`` whose ``model_type`` is one of ``model_types``, a weights
    file (safetensors or .bin, sharded or not) and an image processor config.
    """
    if storage.is_s3(name):
        files, config = _s3_files(key, name)
    elif os.path.isdir(os.path.expanduser(name)):
        files, config = _local_files(key, os.path.expanduser(name))
    elif os.path.exists(os.path.expanduser(name)) or not HUB_ID.match(name):
        raise UserError(f"{key}: {name} is not a model folder (a folder with config.json and weights, "
                        "an s3:// folder, or a Hugging Face hub id)")
    else:
        cached = _hub_cache_files(key, name)
        if cached is not None:
            try:  # complete in the cache: from_pretrained needs no network
                return _check_files(key, name, *cached, model_types)
            except UserError:
                pass  # partly cached (config only): the hub has the rest
        files, config = _hub_files(key, name)
    _check_files(key, name, files, config, model_types)


def _check_files(key: str, name: str, files: set[str], config: dict | None,
                 model_types: tuple[str, ...]) -> None:
    if "config.json" not in files:
        raise UserError(f"{key}: {name} has no config.json: not a saved model (save_pretrained writes one)")
    if not files & set(WEIGHT_FILES):
        raise UserError(f"{key}: {name} has no weights ({' or '.join(WEIGHT_FILES[:2])})")
    if not files & set(PROCESSOR_FILES):
        raise UserError(f"{key}: {name} has no image processor ({PROCESSOR_FILES[0]}): "
                        "save the processor with the model")
    kind = (config or {}).get("model_type")
    if config is not None and kind not in model_types:
        raise UserError(f"{key}: {name} is a {kind!r} model; expected {' or '.join(map(repr, model_types))}")


def _read_config(key: str, name: str, text: str) -> dict:
    try:
        return dict(json.loads(text))
    except (ValueError, TypeError) as err:
        raise UserError(f"{key}: {name}/config.json is not valid JSON ({one_line(err)})") from None


def _local_files(key: str, folder: str) -> tuple[set[str], dict | None]:
    files = set(os.listdir(folder))
    if "config.json" not in files:
        return files, None
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return files, _read_config(key, folder, f.read())


def _s3_files(key: str, uri: str) -> tuple[set[str], dict | None]:
    try:
        uris = storage.list_files(uri)
    except FileNotFoundError:
        uris = []
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot read {uri} ({one_line(err)})") from None
    if not uris:
        raise UserError(f"{key}: {uri} does not exist (or is empty)")
    prefix = uri.rstrip("/") + "/"
    files = {u[len(prefix):] for u in uris if u.startswith(prefix)}
    if "config.json" not in files:
        return files, None
    return files, _read_config(key, uri, storage.read_text(storage.join(uri, "config.json")))


def _hub_cache_files(key: str, repo_id: str) -> tuple[set[str], dict | None] | None:
    """The files of ``repo_id``'s snapshot in the local Hugging Face cache; None if absent."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        return None
    return _local_files(key, os.path.dirname(cached))  # the snapshot from_pretrained will use


def _hub_files(key: str, repo_id: str) -> tuple[set[str], dict | None]:
    """The model's files as the hub lists them, asked once within ``HUB_TIMEOUT_S``."""
    from huggingface_hub import HfApi

    # the environment, not huggingface_hub's constant: that one is read once, at its import
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError(f"{key}: {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        f"download it first, or set {key} to a folder holding it")
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 (no network, DNS, 404, gated: all stop the run here)
        raise UserError(f"{key}: cannot load {repo_id} from the Hugging Face hub ({_hub_reason(err)}): "
                        f"set {key} to a local or s3:// folder holding the model, "
                        "or check the name and the network") from None
    files = {s.rfilename for s in info.siblings or []}
    config = info.config if isinstance(info.config, dict) and "model_type" in info.config else None
    return files, config


def _hub_reason(err: Exception) -> str:
    """What went wrong asking the hub, in a few words."""
    kind = type(err).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"{kind}: no such public model"
    return f"{kind}: {one_line(err)[:160]}"
