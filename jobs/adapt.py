"""Adapt a cloud detector to your domain: collect -> disseminate -> CLIP det -> distill -> evaluate -> export.

    python jobs/adapt.py                                   # the built-in Foggy-Shapes demo
    python jobs/adapt.py --config my.yaml train.distill.gamma1=0.2
    python jobs/adapt.py --config my.yaml --stages distill,evaluate
    ray job submit --working-dir . -- python jobs/adapt.py --config my.yaml

Re-running the same command resumes at the first unfinished stage.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coin_ray.config import ConfigError, load_config  # noqa: E402
from coin_ray.run import STAGE_NAMES  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (local or s3://); default: the Foggy-Shapes demo")
    parser.add_argument("--stages", help=f"comma-separated stages to (re-)run, from: {', '.join(STAGE_NAMES)}")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (only without RAY_ADDRESS)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="ask the cloud again about images whose task failed or that it refused "
                             "(same as cloud.retry_failed=true)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.distill.gamma1=0.2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = args.overrides + (["cloud.retry_failed=true"] if args.retry_failed else [])
        cfg = load_config(args.config, overrides)
        stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
        unknown = [s for s in stages or [] if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError(f"--stages: unknown stage {unknown[0]!r} (allowed: {', '.join(STAGE_NAMES)})")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from coin_ray.ray.pipeline import run_adaptation

    result = run_adaptation(cfg, stages=stages, num_cpus=args.num_cpus)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
