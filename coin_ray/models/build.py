"""Building, saving and loading our detectors, keyed on the saved architecture.

    build_detector(cfg)                  a fresh CLIP detector (stage 1, and a "clip" student)
    build_student(cfg, teacher)          a fresh target detector of ``model.target_backbone``
    save_detector(model, uri, meta)      model.pt: {"state_dict", "meta"} (local or s3://)
    load_detector(uri)                   rebuilt by ``meta["architecture"]`` (default "clip")

A saved CLIP detector is rebuilt from its CLIP checkpoint (``meta["clip_path"]``, which must
still be reachable); a saved LightRCNN from its meta alone (no CLIP needed).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Callable

import torch

from coin_ray import storage
from coin_ray.config import Config, ModelConfig
from coin_ray.models.light_rcnn import ARCHITECTURE as LIGHT, LightRCNN
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.models.rcnn import RegionDetector

CLIP = "clip"  # the architecture of a model.pt whose meta names none


def build_detector(cfg: Config, clip_path: str | None = None) -> OpenVocabularyRCNN:
    """A fresh CLIP detector for ``cfg`` (seeded: every DDP rank builds the same weights)."""
    torch.manual_seed(cfg.seed)
    return OpenVocabularyRCNN.from_clip(clip_path or cfg.clip.model, cfg.data.categories, cfg.model,
                                        cfg.data.style, cfg.clip.templates, seed=cfg.seed)


def build_student(cfg: Config, teacher: OpenVocabularyRCNN) -> RegionDetector:
    """A fresh target detector of ``cfg.model.target_backbone``, seeded by ``cfg.seed``."""
    if cfg.model.target_backbone != "clip":
        return LightRCNN.from_teacher(teacher, cfg.model, seed=cfg.seed)
    return build_detector(cfg, clip_path=teacher.meta["clip_path"])


# Keys saved models may lack, with the value they were built with before the key existed.
KEYS_ADDED_LATER = {"region_features": "pooled"}


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from ``dataclasses.asdict`` output, ignoring keys this version lacks.

    A key the saved model predates takes the value it was built with (``KEYS_ADDED_LATER``),
    not today's default.
    """
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**KEYS_ADDED_LATER, **{k: v for k, v in data.items() if k in names}})


def _clip_from_meta(meta: dict[str, Any], model_cfg: ModelConfig, *, seed: int) -> OpenVocabularyRCNN:
    return OpenVocabularyRCNN.from_clip(meta["clip_path"], meta["categories"], model_cfg, meta["style"],
                                        meta["templates"], seed=seed)


# How to rebuild each saved architecture (random weights; the state dict is loaded next).
REBUILD: dict[str, Callable[..., RegionDetector]] = {CLIP: _clip_from_meta, LIGHT: LightRCNN.from_meta}


def save_detector(model: RegionDetector, uri: str, extra_meta: dict[str, Any] | None = None) -> None:
    """Write ``{"state_dict", "meta"}`` to ``uri`` (local or s3://), the model.pt contract."""
    model = getattr(model, "module", model)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": {**model.meta, **(extra_meta or {})}}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_detector(uri: str | Path, map_location: str | torch.device = "cpu") -> RegionDetector:
    """Rebuild a detector saved by ``save_detector`` (see the module docstring)."""
    blob = torch.load(io.BytesIO(storage.read_bytes(str(uri))), map_location=map_location,
                      weights_only=False)
    meta = blob["meta"]
    architecture = meta.get("architecture", CLIP)
    if architecture not in REBUILD:
        raise ValueError(f"{uri}: unknown detector architecture {architecture!r} (known: {', '.join(REBUILD)})")
    model = REBUILD[architecture](meta, model_config_from_dict(meta["model_cfg"]), seed=meta.get("seed", 0))
    model.load_state_dict(blob["state_dict"])
    model.meta = dict(meta)
    return model.to(map_location)
