"""Search spaces for sweeps of the distillation stage, and the sweep's result tables (no Ray).

``coin_ray.ray.sweep`` turns a space into Ray Tune samplers and runs the trials.

Search spaces are small YAML files (``tune_spaces/*.yaml``)::

    gamma1: {loguniform: [0.01, 1.0]}
    eta_half_life: {choice: [0.001, 0.026654]}
    pi: {uniform: [0.5, 0.9]}
    steps: 200                     # a fixed value

Keys are ``train.distill`` fields as written in YAML (``lambda``, not ``lambda_``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

import yaml

from coin_ray import storage
from coin_ray.config import Config, ConfigError, DistillConfig, from_dict, to_dict

# The three distribution kinds a space file may name (coin_ray.ray.sweep maps each to ray.tune's).
SAMPLERS = ("uniform", "loguniform", "choice")


class SpaceError(ValueError):
    """A bad search-space file; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Dimension:
    """One swept (or fixed) ``train.distill`` field: ``kind`` in SAMPLERS or "fixed"."""

    key: str  # YAML key, e.g. "lambda"
    kind: str
    values: tuple  # (low, high) for uniform/loguniform, the options for choice, (v,) for fixed


def distill_keys() -> list[str]:
    """The YAML keys of every ``train.distill`` field (``lambda`` for ``lambda_``)."""
    return ["lambda" if f.name == "lambda_" else f.name for f in dataclasses.fields(DistillConfig)]


def _check_value(where: str, key: str, value: Any) -> None:
    """Raise SpaceError when ``value`` is not a valid ``train.distill.<key>``."""
    try:
        apply_params(Config(), {key: value})
    except ConfigError as err:
        raise SpaceError(f"{where}: {err}") from None


def _parse_dimension(where: str, key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict):
        _check_value(where, key, spec)
        return Dimension(key, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise SpaceError(f"{where}: {key}: expected one of {{{', '.join(SAMPLERS)}: ...}} "
                         f"or a fixed value, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: {key}: choice needs a non-empty list, got {values!r}")
    else:
        ok = (isinstance(values, list) and len(values) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))
        if not ok or not values[0] < values[1]:
            raise SpaceError(f"{where}: {key}: {kind} needs [low, high] numbers with low < high, "
                             f"got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise SpaceError(f"{where}: {key}: loguniform needs low > 0, got {values[0]!r}")
    for value in values:
        _check_value(where, key, value)
    return Dimension(key, kind, tuple(values))


def parse_space(data: Any, where: str = "space") -> dict[str, Dimension]:
    """Check a parsed space mapping against ``DistillConfig``; ``where`` names it in errors."""
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{where}: expected a non-empty mapping of train.distill fields")
    allowed = distill_keys()
    for key in data:
        if key not in allowed:
            hint = " (write lambda, not lambda_)" if key == "lambda_" else ""
            raise SpaceError(f"{where}: {key}: not a train.distill field{hint} "
                             f"(allowed: {', '.join(allowed)})")
    space = {key: _parse_dimension(where, key, spec) for key, spec in data.items()}
    if all(d.kind == "fixed" for d in space.values()):
        raise SpaceError(f"{where}: nothing to sweep (every key has a fixed value)")
    return space


def load_space(uri: str) -> dict[str, Dimension]:
    """Read and check a search-space YAML file (local or s3://)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise SpaceError(f"{uri}: no such search-space file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{uri}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_space(data, uri)


def plain(value: Any) -> Any:
    """numpy scalars (what some samplers return) as Python numbers, for YAML and the config."""
    return value.item() if hasattr(value, "item") else value


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with ``train.distill`` fields set from ``params``.

    ``params`` uses YAML keys (``lambda``). Goes through the config's own validation, so a
    sampled value outside a field's range raises ConfigError. A length in ``params``
    (``epochs`` or ``steps``) replaces ``cfg``'s, whichever of the two that one sets.
    """
    tree = to_dict(cfg)
    for key, other in (("epochs", "steps"), ("steps", "epochs")):
        if key in params:
            tree["train"]["distill"][other] = None
    tree["train"]["distill"].update({k: plain(v) for k, v in params.items()})
    return from_dict(tree)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------
# Results: one row per trial (coin_ray.ray.sweep.result_rows), as CSV and Markdown.


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (header from the first row; commas in error text are quoted)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a Markdown table under ``title`` (a line saying what the metric is)."""
    if not rows:
        return f"{title}\n\n(no trials)\n"
    header = list(rows[0])
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[h]).replace("|", "/") for h in header) + " |")
    return "\n".join(lines) + "\n"
