"""Sweep the distillation hyperparameters of a collected run (= `coin-ray tune`), for `ray job submit`.

    python jobs/tune.py                                      # demo space on the Foggy-Shapes demo run
    python jobs/tune.py --config my.yaml --space tune_spaces/default.yaml --num-samples 16
    ray job submit --working-dir . -- python jobs/tune.py --config s3://bucket/my.yaml --gpus-per-trial 1

Arguments and exit codes: `coin-ray tune --help` (coin_ray/commands.py, coin_ray/cli.py).
"""

from __future__ import annotations

import os
import sys

# Under `ray job submit` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coin_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
