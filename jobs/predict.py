"""Run an exported target detector over a folder or bucket of images (= `coin-ray predict`).

    python jobs/predict.py --model runs/<run id>/export --images path/to/images --out results.json
    ray job submit --working-dir . -- python jobs/predict.py --model s3://b/runs/<id>/export --images s3://b/new --out s3://b/out.json
    python jobs/predict.py ... --runtime onnx             # model.onnx in onnxruntime (.[onnx] extra)

Arguments and exit codes: `coin-ray predict --help` (coin_ray/commands.py, coin_ray/cli.py).
"""

from __future__ import annotations

import os
import sys

# Under `ray job submit` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coin_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
