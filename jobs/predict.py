"""Run the exported target detector over a folder or bucket of images; write COCO results JSON.

    python jobs/predict.py --model runs/<run id>/export --images path/to/images --out results.json
    python jobs/predict.py --model s3://bucket/runs/<id>/export --images s3://bucket/new \\
        --out s3://bucket/out/results.json --num-actors 4
    python jobs/predict.py ... --annotations val.json     # use its ids and print mAP50
    python jobs/predict.py ... --runtime onnx             # model.onnx in onnxruntime

The model is the folder ``jobs/adapt.py`` writes in its export stage (TorchScript, and
ONNX with the ``.[onnx]`` extra; see coin_ray/export.py). Works unchanged under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (local or s3://) with export.json")
    parser.add_argument("--images", required=True, help="folder or s3:// prefix of images (recursive)")
    parser.add_argument("--out", required=True, help="COCO results JSON to write (local or s3://)")
    parser.add_argument("--annotations", default="", help="COCO annotations of these images: their ids, and mAP50")
    parser.add_argument("--runtime", choices=["torchscript", "onnx"], default="torchscript",
                        help="which exported model runs: the TorchScript modules or model.onnx (onnxruntime)")
    parser.add_argument("--batch-size", type=int, default=0, help="images per call (default: the export's largest)")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (only without RAY_ADDRESS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from coin_ray import storage

    model_file = "model.onnx" if args.runtime == "onnx" else "export.json"
    for flag, uri in (("--model", storage.join(args.model, model_file)), ("--images", args.images),
                      ("--annotations", args.annotations)):
        if uri and not storage.exists(uri):
            print(f"error: {flag}: {uri} does not exist", file=sys.stderr)
            return 2
    from coin_ray.ray.pipeline import init_ray
    from coin_ray.ray.predict import predict

    init_ray(args.num_cpus)
    summary = predict(args.model, args.images, args.out, annotations_uri=args.annotations,
                      batch_size=args.batch_size, num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
                      runtime=args.runtime)
    print(f"{summary.images} images ({summary.errors} unreadable), {summary.detections} detections "
          f"in {summary.seconds:.1f} s -> {summary.out}")
    if args.annotations:
        print(f"mAP50 = {coco_map50(args.annotations, summary.out):.1f}")
    return 0


def coco_map50(annotations_uri: str, results_uri: str) -> float:
    """mAP50 (%) of a results file against its annotations, straight from pycocotools."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from coin_ray import storage

    results = json.loads(storage.read_text(results_uri))
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(storage.read_text(annotations_uri))
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1] * 100)


if __name__ == "__main__":
    sys.exit(main())
