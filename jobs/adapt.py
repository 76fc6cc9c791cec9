"""Adapt a cloud detector to your domain (= `coin-ray adapt`): the entry point for `ray job submit`.

    python jobs/adapt.py                                   # the built-in Foggy-Shapes demo
    python jobs/adapt.py --config my.yaml train.distill.gamma1=0.2
    ray job submit --working-dir . -- python jobs/adapt.py --config my.yaml

Arguments and exit codes: `coin-ray adapt --help` (coin_ray/commands.py, coin_ray/cli.py).
"""

from __future__ import annotations

import os
import sys

# Under `ray job submit` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coin_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["adapt", *sys.argv[1:]]))
