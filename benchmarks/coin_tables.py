"""The paper's Tables 1, 5 and 6 on a Foggy-Shapes world, over several distillation seeds.

    .venv/bin/python benchmarks/coin_tables.py --world bench --seeds 0 1 2
    .venv/bin/python benchmarks/coin_tables.py --world demo --seeds 0 --steps 200 --tables 1,6

Stages 0-2 (collection, dissemination, CLIP detection) run once through the pipeline
(``coin_ray.ray.pipeline.run_adaptation``, resumed when already done); every distillation
variant then runs in-process (``coin_ray.train.distill.distill``) from the same stored
cloud detections and CLIP detector, is evaluated on the labelled target val split
(pycocotools AP50) and cached as JSON under ``<storage>/tables/<world>/<settings>/``, so a re-run only trains
what is missing.

    Table 1   Cloud det, CLIP, CLIP det (stored detections) and COIN: AP50 per class, mAP50
    Table 5   loss ablations: L_align, L_con, L_inc, L_pri switched off (COIN rows)
    Table 6   fusion of inconsistent detections: cloud probs, CLIP-det probs, avg, s-avg, CKG

COIN rows give the mean over seeds (mAP50 also with its standard deviation). Before the
tables, the separation statistics on the target train images (CLIP det vs cloud det, the
teacher before burn-up) with the fraction of right labels per set against ground truth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from coin_ray import storage  # noqa: E402
from coin_ray.config import Config, load_config, with_updates  # noqa: E402
from coin_ray.data.datasets import LabelledSplit, load_coco, target_uris, val_split  # noqa: E402
from coin_ray.data.images import read_image_record  # noqa: E402
from coin_ray.evaluate import EvalResult, evaluate, table1_markdown  # noqa: E402
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN  # noqa: E402
from coin_ray.demo import demo_world, with_demo_world  # noqa: E402
from coin_ray.ray.pipeline import run_adaptation  # noqa: E402
from coin_ray.ray.stages import evaluate_rows  # noqa: E402
from coin_ray.run import RunDir, run_dir  # noqa: E402
from coin_ray.train.distill import distill  # noqa: E402
from coin_ray.schema import SOURCE_COIN, Detections, table_to_records  # noqa: E402
from coin_ray.separate import SeparationStats, as_source, separate  # noqa: E402
from coin_ray.train.data import image_tensor  # noqa: E402

PREPARE = ("collect", "disseminate", "clip_det")
FULL = "COIN"
# Table 5 rows (paper order): which losses are on. The full method is shared with Table 6.
TABLE5 = {
    "L_con": ["train.distill.use_align=false", "train.distill.use_inc=false", "train.distill.use_pri=false"],
    "L_align + L_con": ["train.distill.use_inc=false", "train.distill.use_pri=false"],
    "L_align + L_con + L_pri": ["train.distill.use_inc=false"],
    "L_align + L_con + L_inc": ["train.distill.use_pri=false"],
    FULL: [],
}
TABLE6 = {
    "COIN w/ cloud det probs": ["train.distill.fusion=cloud"],
    "COIN w/ CLIP det probs": ["train.distill.fusion=clip"],
    "COIN w/ avg": ["train.distill.fusion=avg"],
    "COIN w/ s-avg": ["train.distill.fusion=score_avg"],
    "COIN w/ CKG": [],
}


def prepare_run(cfg: Config, from_run: str = "") -> tuple[Config, RunDir]:
    """Stages 0-2 through the pipeline (skipped when done); the config with world paths.

    ``from_run``: an existing run directory whose stages 0-2 are done, only read.
    """
    cfg = with_demo_world(cfg)
    run = RunDir(from_run) if from_run else run_dir(cfg)
    missing = [s for s in PREPARE if not run.is_done(s)]
    if missing and from_run:
        raise SystemExit(f"{from_run}: stages {missing} are not done")
    if missing:
        run_adaptation(cfg, stages=missing)
    return cfg, run


def records_at(uri: str) -> list[Detections]:
    return [r for r in table_to_records(storage.read_parquet(uri)) if r.ok]


def separation_summary(cfg: Config, run: RunDir, train_gt: LabelledSplit) -> dict:
    """Sets of CLIP det vs cloud det on the target train images, judged against ground truth."""
    d = cfg.train.distill
    clip_det = {r.uri: r for r in records_at(run.clip_detections)}
    stats = SeparationStats()
    cloud = {r.uri: r for r in records_at(run.cloud_detections)}
    for gt in train_gt.items:
        if gt.uri in cloud and gt.uri in clip_det:
            k = cfg.num_classes
            sep = separate(as_source(cloud[gt.uri], d.min_score, k), as_source(clip_det[gt.uri], d.min_clip_score, k),
                           iou_threshold=d.match_iou)
            stats.add(sep, torch.as_tensor(gt.boxes), torch.as_tensor(gt.labels))
    return stats.summary()


@torch.no_grad()
def detect_split(model: OpenVocabularyRCNN, split: LabelledSplit, batch_size: int = 8) -> list[Detections]:
    """The model's detections on every image of ``split`` (original pixels)."""
    model.eval()
    records = []
    for start in range(0, len(split.items), batch_size):
        items = [read_image_record(gt.uri, gt.image_id) for gt in split.items[start:start + batch_size]]
        found = model.detect([image_tensor(rec.image) for rec in items])
        for rec, det in zip(items, found):
            det = {k: v.cpu().numpy() for k, v in det.items()}
            records.append(Detections(rec.image_id, rec.uri, rec.width, rec.height, det["boxes"], det["labels"],
                                      det["scores"], det["probs"], SOURCE_COIN))
    return records


def run_variant(cfg: Config, run: RunDir, overrides: list[str], seed: int, split: LabelledSplit,
                cache: str) -> EvalResult:
    """Distil one variant with one seed and evaluate it (cached by variant and seed)."""
    key = "-".join(o.split(".")[-1].replace("=", "_") for o in overrides) or "full"
    uri = storage.join(cache, f"{key}-seed{seed}.json")
    if storage.exists(uri):
        return load_result(storage.read_text(uri))
    vcfg = with_updates(cfg, [*overrides, f"seed={seed}"])
    wanted = set(target_uris(cfg))
    items = [r for r in records_at(run.cloud_detections) if r.uri in wanted]
    started = time.time()

    def progress(step: int, metrics: dict[str, float]) -> None:
        if step % 100 == 0:
            print(f"[tables] {key} seed {seed}: step {step} loss {metrics['loss']:.3f} "
                  f"({time.time() - started:.0f} s)", flush=True)

    state = distill(vcfg, run.clip_detector, items, on_step=progress)
    result = evaluate(split, detect_split(state.detector, split))
    storage.write_text(uri, json.dumps(result.to_json()))
    print(f"[tables] {key} seed {seed}: mAP50 {result.map50:.1f}", flush=True)
    return result


def load_result(text: str) -> EvalResult:
    """An EvalResult from its JSON (where NaN was written as null)."""
    data = json.loads(text)
    nan = float("nan")
    data["ap50"] = {c: nan if v is None else v for c, v in data["ap50"].items()}
    for key in ("map50", "map_coco"):
        data[key] = nan if data[key] is None else data[key]
    return EvalResult(**data)


def mean_result(results: list[EvalResult]) -> EvalResult:
    """Per-class AP50 and mAP50 averaged over seeds (NaN classes stay NaN)."""
    classes = results[0].ap50
    return EvalResult({c: statistics.fmean(r.ap50[c] for r in results) for c in classes},
                      statistics.fmean(r.map50 for r in results), statistics.fmean(r.map_coco for r in results),
                      results[0].num_images, sum(r.num_detections for r in results) // len(results))


def spread(results: list[EvalResult]) -> str:
    maps = [r.map50 for r in results]
    return f"{statistics.fmean(maps):.1f} ± {statistics.stdev(maps):.1f}" if len(maps) > 1 else f"{maps[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="bench", choices=["tiny", "demo", "bench"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="distillation steps (0 = the config's)")
    parser.add_argument("--tables", default="1,5,6")
    parser.add_argument("--storage", default="runs-tables")
    parser.add_argument("--from-run", default="", help="read stages 0-2 from this finished run directory")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    overrides = [f"data.world={args.world}", f"storage={args.storage}", f"run_id=tables-{args.world}",
                 *([f"train.distill.steps={args.steps}"] if args.steps else []), *args.overrides]
    cfg, run = prepare_run(load_config(None, overrides), args.from_run)
    split = val_split(cfg)
    world = demo_world(cfg)
    # Results are cached per world and per shared setting (steps, overrides), so a run with
    # other settings into the same storage never reuses these.
    shared = [*([f"steps={args.steps}"] if args.steps else []), *args.overrides]
    tag = "-".join(o.replace("=", "_").replace("/", "_") for o in shared) or "defaults"
    cache = storage.join(args.storage, "tables", args.world, tag)
    tables = set(args.tables.split(","))
    if world is not None:
        train_gt = load_coco(str(world.target_train_json), str(world.target_train_images), cfg.data.categories)
        print("separation (target train, CLIP det vs cloud det):",
              json.dumps(separation_summary(cfg, run, train_gt), indent=1))

    def rows(variants: dict[str, list[str]]) -> dict[str, list[EvalResult]]:
        return {name: [run_variant(cfg, run, ov, s, split, cache) for s in args.seeds] for name, ov in variants.items()}

    stored = evaluate_rows(cfg, run)
    out = []
    if "1" in tables:
        coin = rows({FULL: []})[FULL]
        table = {m: stored[m] for m in ("Cloud det", "CLIP", "CLIP det") if m in stored} | {FULL: mean_result(coin)}
        out.append(f"Table 1 ({args.world} world, target val, COIN mean of seeds {args.seeds}; "
                   f"COIN mAP50 {spread(coin)})\n\n" + table1_markdown(table, cfg.data.categories))
    for number, variants in (("5", TABLE5), ("6", TABLE6)):
        if number in tables:
            results = rows(variants)
            table = {"CLIP det": stored["CLIP det"]} if number == "5" and "CLIP det" in stored else {}
            table |= {f"{name} ({spread(r)})": mean_result(r) for name, r in results.items()}
            out.append(f"Table {number}\n\n" + table1_markdown(table, cfg.data.categories))
    text = "\n".join(out)
    print(text)
    storage.write_text(storage.join(cache, "tables.md"), text)


if __name__ == "__main__":
    main()
