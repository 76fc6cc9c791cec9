"""Ray Tune machinery for sweeps: search-space files, the Tuner (ASHA, resources, resume),
result tables. ``coin_ray.ray.sweep`` applies it to the distillation stage.

Trials report an explicit ``step`` that ASHA uses as its time unit (ASHA's rung state is
not kept across ``Tuner.restore``, the step is). A sweep's experiment folder is
``<storage>/<name>``; running the same sweep again restores it and runs only what is
unfinished or errored.

Search spaces are small YAML files (``tune_spaces/*.yaml``)::

    gamma1: {loguniform: [0.01, 1.0]}
    eta_half_life: {choice: [0.001, 0.026654]}
    pi: {uniform: [0.5, 0.9]}
    steps: 200                     # a fixed value

Keys are ``train.distill`` fields as written in YAML (``lambda``, not ``lambda_``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import yaml
from ray import tune

from coin_ray import storage
from coin_ray.config import Config, ConfigError, DistillConfig, from_dict, to_dict

# The three distribution kinds a space file may name; each maps to its ray.tune sampler.
SAMPLERS = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice}


class SpaceError(ValueError):
    """A bad search-space file; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Dimension:
    """One swept (or fixed) ``train.distill`` field: ``kind`` in SAMPLERS or "fixed"."""

    key: str  # YAML key, e.g. "lambda"
    kind: str
    values: tuple  # (low, high) for uniform/loguniform, the options for choice, (v,) for fixed

    def domain(self) -> Any:
        """The ray.tune sampler (or the plain value when fixed)."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return SAMPLERS["choice"](list(self.values))
        return SAMPLERS[self.kind](*self.values)


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


def param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """The Tuner's ``param_space``: YAML key -> ray.tune sampler (or fixed value)."""
    return {key: dim.domain() for key, dim in space.items()}


def _plain(value: Any) -> Any:
    """numpy scalars (what some samplers return) as Python numbers, for YAML and the config."""
    return value.item() if hasattr(value, "item") else value


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with ``train.distill`` fields set from ``params``.

    ``params`` uses YAML keys (``lambda``). Goes through the config's own validation, so a
    sampled value outside a field's range raises ConfigError.
    """
    tree = to_dict(cfg)
    tree["train"]["distill"].update({k: _plain(v) for k, v in params.items()})
    return from_dict(tree)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------
# Running a sweep: resources, storage, ASHA, resume.


@dataclass
class SweepOptions:
    """How a sweep runs; ``storage`` is a local folder or s3:// prefix holding sweeps."""

    name: str
    storage: str
    metric: str  # the reported key ASHA ranks on, e.g. "val_map50" or "proxy_map50"
    max_steps: int  # training steps of a full trial (ASHA's max_t, in the ``step`` unit)
    num_samples: int = 8
    grace_steps: int = 0  # ASHA grace period; 0 = a quarter of max_steps
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs / GPUs hold
    seed: int = 0  # seeds the random search
    max_failures: int = 1  # retries of a failing trial (from its last checkpoint)
    points_to_evaluate: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def max_concurrent(resources: dict[str, float], cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit at once in ``resources`` (``ray.cluster_resources()``), at least 1."""
    fits = [math.inf]
    if cpus_per_trial > 0:
        fits.append(resources.get("CPU", 0.0) // cpus_per_trial)
    if gpus_per_trial > 0:
        fits.append(resources.get("GPU", 0.0) // gpus_per_trial)
    n = min(fits)
    return 1 if math.isinf(n) else max(1, int(n))


def _storage(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Tune's ``storage_path``: s3:// goes through
    ``coin_ray.storage`` so AWS_ENDPOINT_URL is honoured."""
    if storage.is_s3(uri):
        return storage.resolve(uri)
    return None, storage.resolve(uri)[1]


def _scheduler(opts: SweepOptions) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    grace = opts.grace_steps or max(1, opts.max_steps // 4)
    return ASHAScheduler(time_attr="step", max_t=max(opts.max_steps, 1), grace_period=min(grace, opts.max_steps or 1),
                         reduction_factor=opts.reduction_factor)


def run_tuner(trainable: Any, space: dict[str, Any], opts: SweepOptions) -> Any:
    """Fit (or resume) a sweep of ``trainable`` over ``space``; returns the ResultGrid.

    The experiment lives at ``<opts.storage>/<opts.name>``: when Tune's state is already
    there (an interrupted or errored sweep) it is restored with ``resume_errored=True`` and
    only unfinished trials run. Trials report ``step`` and ``opts.metric``.
    """
    import ray
    from ray.tune.search import BasicVariantGenerator

    fs, root = _storage(opts.storage)
    wrapped = tune.with_resources(trainable, {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial})
    path = storage.join(root, opts.name) if fs is None else f"{root}/{opts.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_errored=True, storage_filesystem=fs)
        return tuner.fit()
    concurrent = opts.max_concurrent_trials or max_concurrent(
        ray.cluster_resources(), opts.cpus_per_trial, opts.gpus_per_trial)
    # The random search's own cap: Tune ignores TuneConfig.max_concurrent_trials when given
    # a BasicVariantGenerator instance (which we need for the seed and the base point).
    search = BasicVariantGenerator(points_to_evaluate=opts.points_to_evaluate or None,
                                   max_concurrent=concurrent, random_state=opts.seed)
    tune_config = tune.TuneConfig(metric=opts.metric, mode="max", scheduler=_scheduler(opts),
                                  search_alg=search, num_samples=opts.num_samples)
    run_config = tune.RunConfig(name=opts.name, storage_path=root, storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=opts.max_failures), verbose=0)
    return tune.Tuner(wrapped, param_space=space, tune_config=tune_config, run_config=run_config).fit()


# ---------------------------------------------------------------------------------------
# Results: one row per trial, sorted by the metric; CSV and Markdown.


def result_rows(grid: Any, metric: str, keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial: trial id, its ``keys`` params, last ``step``, last and best value
    of ``metric`` (NaN when it never reported), error text.

    Sorted best first: by the step reached, then by the last reported value. A trial ASHA
    stopped early was behind others at a rung, and its value at an earlier step is not
    comparable with a finished trial's, so finished trials rank first. NaN last.
    """
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = history[metric].dropna() if history is not None and metric in history else []
        last = result.metrics or {}
        rows.append({
            "trial_id": last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
            **{k: _plain(result.config.get(k)) for k in keys},
            "step": int(last["step"]) if is_finite_number(last.get("step")) else 0,
            metric: float(values.iloc[-1]) if len(values) else math.nan,
            f"best_{metric}": float(values.max()) if len(values) else math.nan,
            "error": str(result.error).splitlines()[0] if result.error else "",
        })
    return sorted(rows, key=lambda r: (math.isnan(r[metric]), -r["step"],
                                       0.0 if math.isnan(r[metric]) else -r[metric]))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (header from the first row; commas in error text are quoted)."""
    import csv
    import io

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
