"""Sweep the distillation hyperparameters (gamma1, gamma2, lambda, eta, pi) of a collected run.

    python jobs/tune.py                                      # demo space on the Foggy-Shapes demo run
    python jobs/tune.py --config my.yaml --space tune_spaces/default.yaml --num-samples 16
    python jobs/tune.py --config my.yaml train.distill.steps=200      # shorter trials
    ray job submit --working-dir . -- python jobs/tune.py --config s3://bucket/my.yaml --gpus-per-trial 1

The run must already be collected (``python jobs/adapt.py`` with the same config and
overrides): a sweep never calls the cloud detector. Re-running the same command resumes an
interrupted sweep. It ends by writing best.yaml (a config for jobs/adapt.py), results.csv
and results.md in the sweep's folder, and printing the table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coin_ray.config import ConfigError, load_config  # noqa: E402

DEFAULT_SPACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tune_spaces", "demo.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config (local or s3://); default: the Foggy-Shapes demo")
    parser.add_argument("--space", default=DEFAULT_SPACE, help="search-space YAML (default: tune_spaces/demo.yaml)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials, the config's own values included")
    parser.add_argument("--storage", default="", help="folder or s3:// prefix for sweeps (default: <run>/tune)")
    parser.add_argument("--name", default="", help="sweep name (default: derived from space and settings)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between metric reports (default: steps/4)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--max-concurrent-trials", type=int, default=0,
                        help="default: as many as the cluster's CPUs / GPUs hold")
    parser.add_argument("--proxy", action="store_true",
                        help="score on held-out cloud detections even when a labelled split exists")
    parser.add_argument("--no-base", action="store_true", help="do not run the config's own values as a trial")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (only without RAY_ADDRESS)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.distill.steps=200")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from coin_ray.ray.sweep import sweep_distill
    from coin_ray.search_space import SpaceError, load_space
    from coin_ray.sweep import SweepInputsMissing, collected_run

    try:
        cfg = load_config(args.config, args.overrides)
        space = load_space(args.space)
        collected_run(cfg)  # before starting Ray: a sweep never collects
    except (ConfigError, SpaceError, SweepInputsMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from coin_ray import storage
    from coin_ray.ray.pipeline import init_ray

    init_ray(args.num_cpus)
    report = sweep_distill(cfg, space, num_samples=args.num_samples, storage_uri=args.storage,
                           name=args.name, eval_every=args.eval_every,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           max_concurrent_trials=args.max_concurrent_trials, proxy=args.proxy,
                           include_base=not args.no_base)

    print(storage.read_text(storage.join(report.path, "results.md")))
    print(f"best {report.metric} = {report.best_value:.4g} with {report.best_params}")
    print(f"best config: {report.best_config}")
    print(f"sweep folder: {report.path} ({report.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
