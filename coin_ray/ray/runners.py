"""The Ray (and torch) side of ``coin-ray adapt | tune | predict | serve --model | world``, in one module that
``coin_ray.commands`` imports only once the arguments, the config and the inputs are checked: importing it loads
Ray, torch and transformers (tens of seconds on a busy machine), which `--help` and a
one-line config error must not wait for.
"""

from __future__ import annotations

from coin_ray.demo import describe_world
from coin_ray.ray.cluster import check_storage
from coin_ray.ray.pipeline import run_adaptation
from coin_ray.ray.predict import predict
from coin_ray.ray.serve_model import serve_detector
from coin_ray.ray.sweep import sweep_distill
from coin_ray.sweep import collected_run

__all__ = ["check_storage", "collected_run", "describe_world", "predict", "run_adaptation", "serve_detector", "sweep_distill"]
