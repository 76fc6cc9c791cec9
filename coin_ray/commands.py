"""What ``coin-ray adapt | tune | predict | serve --model`` do, behind ``coin_ray.cli`` and the thin ``jobs/*.py``.

Each ``add_<name>_args`` fills an argparse parser; each ``<name>(args)`` runs the command and
returns its exit code, raising ``coin_ray.errors.UserError`` (or a ConfigError) for what the
user must fix. Nothing here starts or joins Ray before the inputs are checked.
"""

from __future__ import annotations

import argparse
import os
import time

from coin_ray import storage
from coin_ray.config import ConfigError, load_config
from coin_ray.deploy import ServeSettings, model_card, port_free, token_digest
from coin_ray.errors import EXIT_FAILED, EXIT_OK, CredentialError, UserError
from coin_ray.location import resolve_config, resolve_input, resolve_output
from coin_ray.preflight import check_adapt, check_exists, count_images
from coin_ray.progress import failure_lines
from coin_ray.run import STAGE_NAMES, RunDir
from coin_ray.search_space import load_space

# Ray, torch and transformers are imported inside the functions that need them, after the
# arguments and the config are checked: `coin-ray --help` and a config error take well under
# a second instead of the tens of seconds those imports cost on a busy machine.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SPACE = os.path.join(ROOT, "tune_spaces", "demo.yaml")

ADAPT_HELP = """Adapt a cloud detector to your domain: collect -> disseminate -> CLIP det -> distill -> evaluate -> export.

    coin-ray adapt                                   # the built-in Foggy-Shapes demo
    coin-ray adapt --config my.yaml train.distill.gamma1=0.2
    coin-ray adapt --config my.yaml --stages distill,evaluate
    ray job submit --working-dir . -- python jobs/adapt.py --config my.yaml

Re-running the same command resumes at the first unfinished stage."""

TUNE_HELP = """Sweep the distillation hyperparameters (gamma1, gamma2, lambda, eta, pi) of a collected run.

    coin-ray tune                                      # demo space on the Foggy-Shapes demo run
    coin-ray tune --config my.yaml --space tune_spaces/default.yaml --num-samples 16
    coin-ray tune --config my.yaml train.distill.steps=200      # shorter trials
    ray job submit --working-dir . -- python jobs/tune.py --config s3://bucket/my.yaml --gpus-per-trial 1

The run must already be collected (``coin-ray adapt`` with the same config and overrides):
a sweep never calls the cloud detector. Re-running the same command resumes an interrupted
sweep. It ends by writing best.yaml (a config for ``coin-ray adapt``), results.csv and
results.md in the sweep's folder, and printing the table."""

PREDICT_HELP = """Run the exported target detector over a folder or bucket of images; write COCO results JSON.

    coin-ray predict --model runs/<run id>/export --images path/to/images --out results.json
    coin-ray predict --model s3://bucket/runs/<id>/export --images s3://bucket/new \\
        --out s3://bucket/out/results.json --num-actors 4
    coin-ray predict ... --annotations val.json     # use its ids and print mAP50
    coin-ray predict ... --runtime onnx             # model.onnx in onnxruntime (.[onnx] extra)

Without --annotations, image ids are 1..N in sorted file order and category ids label + 1;
<out>.images.json (results.json -> results.images.json) maps them back: COCO "images" (id,
file_name, width, height) and "categories" (id, name).

The model is the folder ``coin-ray adapt`` writes in its export stage (TorchScript, and ONNX
with the ``.[onnx]`` extra; see coin_ray/export.py). Works unchanged under ``ray job submit`` (jobs/predict.py)."""


def add_adapt_args(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--config", help="YAML config (local or s3://); default: the Foggy-Shapes demo")
    parser.add_argument("--stages", help=f"comma-separated stages to (re-)run, from: {', '.join(STAGE_NAMES)}")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (only without RAY_ADDRESS)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="ask the cloud again about images whose task failed or that it refused "
                             "(same as cloud.retry_failed=true)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.distill.gamma1=0.2")


def _stages(text: str | None) -> list[str] | None:

    stages = [s.strip() for s in text.split(",")] if text else None
    unknown = [s for s in stages or [] if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r} (allowed: {', '.join(STAGE_NAMES)})")
    return stages


def _collect_pending(cfg, stages: list[str] | None) -> bool:
    """Whether this run will call the cloud (so its URL and token must be checked first)."""

    if stages is not None:
        return "collect" in stages
    if not cfg.data.target_images:  # the built-in world: its run id is known once it is built
        return True
    return not RunDir(storage.join(cfg.storage, cfg.resolved_run_id())).is_done("collect")


def adapt(args: argparse.Namespace) -> int:
    """Check the inputs, then run (or resume) the adaptation; 0 when every stage finished."""

    overrides = [*args.overrides, *(["cloud.retry_failed=true"] if args.retry_failed else [])]
    cfg = resolve_config(load_config(args.config, overrides))
    stages = _stages(args.stages)
    check_adapt(cfg, collect=_collect_pending(cfg, stages))

    result = run_adaptation(cfg, stages=stages, num_cpus=args.num_cpus)
    return EXIT_OK if result.ok else EXIT_FAILED


def run_adaptation(cfg, **kwargs):
    """``coin_ray.ray.pipeline.run_adaptation`` (see ``ray_side``)."""
    return ray_side().run_adaptation(cfg, **kwargs)


def ray_side():
    """``coin_ray.ray.runners``: Ray, torch and transformers, loaded once the inputs are checked."""
    # Imported here, not at the top: `coin-ray --help` and a config error must not load them.
    from coin_ray.ray import runners

    return runners


def init_ray(num_cpus: int | None) -> None:
    """``coin_ray.ray.cluster.init_ray``: Ray only, none of the model code."""
    # Imported here: a dead or hung RAY_ADDRESS is reported before torch loads (ray_side).
    from coin_ray.ray.cluster import init_ray as init

    init(num_cpus)


def add_tune_args(parser: argparse.ArgumentParser) -> None:
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


def tune(args: argparse.Namespace) -> int:
    """Sweep the distillation of a collected run; prints the table and where best.yaml is."""

    cfg = resolve_config(load_config(args.config, args.overrides))
    space = load_space(args.space)
    side = ray_side()
    _, run = side.collected_run(cfg)  # before starting Ray: a sweep never collects
    sweeps = resolve_output(args.storage) or run.path("tune")
    print(f"[coin-ray] run: {run.root}  sweeps: {sweeps}", flush=True)

    init_ray(args.num_cpus)
    side.check_storage(sweeps)
    report = side.sweep_distill(cfg, space, num_samples=args.num_samples, storage_uri=sweeps,
                           name=args.name, eval_every=args.eval_every,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           max_concurrent_trials=args.max_concurrent_trials, proxy=args.proxy,
                           include_base=not args.no_base)
    print(storage.read_text(storage.join(report.path, "results.md")))
    print(f"best {report.metric} = {report.best_value:.4g} with {report.best_params}")
    print(f"best config: {report.best_config}")
    print(f"sweep folder: {report.path} ({report.seconds:.0f} s)")
    return EXIT_OK


def add_predict_args(parser: argparse.ArgumentParser) -> None:
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


def predict(args: argparse.Namespace) -> int:
    """Detect on every image under ``--images``; write COCO results JSON to ``--out``."""

    model, images = resolve_input(args.model), resolve_input(args.images)
    annotations, out = resolve_input(args.annotations), resolve_output(args.out)
    check_exists("--model", storage.join(model, "model.onnx" if args.runtime == "onnx" else "export.json"))
    count_images("--images", images)
    if annotations:
        check_exists("--annotations", annotations)

    init_ray(args.num_cpus)  # before importing the model code: a dead cluster fails fast

    summary = ray_side().predict(model, images, out, annotations_uri=annotations, batch_size=args.batch_size,
                          num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor, runtime=args.runtime)
    for line in failure_lines("predict", summary.failures, summary.errors):
        print(line)
    print(f"{summary.images} images ({summary.errors} unreadable), {summary.detections} detections "
          f"in {summary.seconds:.1f} s -> {summary.out}")
    if summary.index:
        print(f"image and category ids -> files and names: {summary.index}")
    if annotations:
        print(f"mAP50 = {coco_map50(annotations, summary.out):.1f}")
    return EXIT_OK


def coco_map50(annotations_uri: str, results_uri: str) -> float:
    """mAP50 (%) of a results file against its annotations, straight from pycocotools."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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



SERVE_HELP = """Serve a run's exported detector on Ray Serve, in the protocols the cloud speaks.

    coin-ray serve --run runs/<run id>                   # = --model runs/<run id>/export
    coin-ray serve --model s3://bucket/runs/<id>/export --port 8000 --token-env SERVE_TOKEN
    coin-ray serve --run runs/<id> --protocol dds        # the DDS V2 task + poll shapes as well
    coin-ray serve --run runs/<id> --min-replicas 1 --max-replicas 4   # autoscaling

Routes: POST /v1/detect (the project's http protocol: point cloud.backend=http at it),
GET /v1/health and /v1/model (run id, categories, export hash, val mAP50). Binds
127.0.0.1 unless --host says otherwise. The cloud-side servers (hf, dds, rekognition,
the Foggy-Shapes stand-in) are served with --backend: coin-ray serve --backend NAME --help."""


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="export folder (local or s3://) with export.json")
    what.add_argument("--run", help="run folder (local or s3://): serves its export/")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runtime", choices=["auto", "onnx", "torchscript"], default="auto",
                        help="auto: model.onnx when exported and onnxruntime is installed, else TorchScript")
    parser.add_argument("--protocol", choices=["http", "dds"], default="http",
                        help="dds: also the DDS V2 task + poll routes")
    parser.add_argument("--token-env", default="", help="NAME of an env var holding the bearer token clients must send")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests detected in one call (1: no batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1, help="above --min-replicas: autoscaling")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--threads-per-replica", type=int, default=1, help="intra-op threads of each replica")
    parser.add_argument("--max-request-mb", type=float, default=16.0, help="request body cap (413 above)")
    parser.add_argument("--max-pixels", type=int, default=ServeSettings.max_pixels, help="image cap, width x height")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (only without RAY_ADDRESS)")


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The ``ServeSettings`` of ``coin-ray serve --model``; UserError for a bad value,
    CredentialError when --token-env names an unset variable."""
    token = ""
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise CredentialError(f"--token-env {args.token_env}: the variable is not set (export {args.token_env}=...)")
    settings = ServeSettings(runtime=args.runtime, max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000.0, min_replicas=args.min_replicas,
                             max_replicas=max(args.max_replicas, args.min_replicas),
                             cpus_per_replica=args.cpus_per_replica, threads_per_replica=args.threads_per_replica,
                             max_request_bytes=int(args.max_request_mb * 2**20), max_pixels=args.max_pixels,
                             dds=args.protocol == "dds", token_sha256=token_digest(token))
    try:
        settings.check()
    except ValueError as err:
        raise UserError(str(err)) from None
    return settings


def serve_model(args: argparse.Namespace) -> int:
    """Serve the export until interrupted (Ctrl-C), after checking the inputs and the port."""
    export = resolve_input(args.model) if args.model else RunDir(resolve_input(args.run)).export_dir
    check_exists("--run" if args.run else "--model", storage.join(export, "export.json"))
    settings = serve_settings(args)
    try:
        card = model_card(export, settings.runtime)
    except ValueError as err:  # --runtime onnx on an export without model.onnx
        raise UserError(f"--runtime: {err}") from None
    if not port_free(args.host, args.port):
        raise UserError(f"--port {args.port}: {args.host}:{args.port} is in use; pick another port")

    init_ray(args.num_cpus)
    url = ray_side().serve_detector(export, settings, host=args.host, port=args.port)
    score = "no report" if card.val_map50 is None else f"val mAP50 {card.val_map50:.1f}"
    print(f"serving {card.model_name} ({card.runtime}, {score}; {', '.join(card.categories)}) at {url}")
    print(f"  curl {url}/v1/health      # cloud.backend=http cloud.url={url} collects from it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    return EXIT_OK
