"""The paper's Tables 1, 5 and 6 on a Foggy-Shapes world, over several distillation seeds.

    .venv/bin/python benchmarks/coin_tables.py --world bench --seeds 0 1 2
    .venv/bin/python benchmarks/coin_tables.py --world demo --seeds 0 --steps 200 --tables 1,6

Stages 0-2 (collection, dissemination, CLIP detection) run once through the pipeline
(``coin_ray.ray.pipeline.run_adaptation``, resumed when already done); every distillation
variant then runs in-process (``coin_ray.train.distill.distill``) from the same stored
cloud detections and CLIP detector, is evaluated on the labelled target val split
(pycocotools AP50) and cached as JSON under ``<storage>/tables/<world>/<settings>/``, so a re-run only trains
what is missing. The trainings (every variant, Oracle and cloud-label student, per seed) run
side by side, ``--jobs`` processes of one torch thread each (default: one per core).

    Table 1   Cloud det, CLIP, CLIP det (stored detections), COIN and Oracle (the same
              target detector and schedule on the target train split's ground truth);
              next to the cloud, the cloud-label student (the Oracle's trainer on the
              cloud's boxes with score >= s, s in {0.3, 0.5, 0.7} chosen per seed on the
              val split; coin_ray.train.cloud_label)
    Table 5   loss ablations: L_align, L_con, L_inc, L_pri switched off (COIN rows)
    Table 6   fusion of inconsistent detections: cloud probs, CLIP-det probs, avg, s-avg, CKG,
              each with the fraction of disagreements passing pi and how often the fused
              label of those is right (against the train split's ground truth)

COIN rows give the mean over seeds (mAP50 also with its standard deviation). Before the
tables, the separation statistics on the target train images (CLIP det vs cloud det, the
teacher before burn-up) with the fraction of right labels per set against ground truth, where
each class's objects land (consistent right or wrong, inconsistent and who is right), and on
the disagreements which source is more confident (gives its own label the higher
probability) and how often that source is right.
``--rho 0 0.5 0.8`` adds the rho curve: the world rebuilt at each ``data.cloud_confusion``,
stages 0-2 run again there (or read with ``--from-run RHO=DIR``, once per world), and COIN minus the best
teacher per seed; the config's own rho is the main world's Table 1. Everything measured
goes to ``--json`` (default benchmarks/results/fidelity.json) in the shape issue 13 asks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coin_ray import storage  # noqa: E402
from coin_ray.config import Config, load_config, with_updates  # noqa: E402
from coin_ray.data.datasets import GroundTruth, LabelledSplit, load_coco, target_uris, val_split  # noqa: E402
from coin_ray.evaluate import EvalResult, evaluate, table1_markdown  # noqa: E402
from coin_ray.demo import demo_world, with_demo_world  # noqa: E402
from coin_ray.ray.pipeline import run_adaptation  # noqa: E402
from coin_ray.ray.stages import evaluate_rows  # noqa: E402
from coin_ray.run import RunDir, run_dir  # noqa: E402
from coin_ray.train.distill import distill  # noqa: E402
from coin_ray.train.schedule import resolve_length  # noqa: E402
from coin_ray.schema import SOURCE_COIN, Detections, table_to_records  # noqa: E402
from coin_ray.separate import Separation, SeparationStats, as_source, separate  # noqa: E402
from coin_ray.source_agreement import hit_labels  # noqa: E402
from coin_ray.train.data import clip_det_records, clip_records  # noqa: E402
from coin_ray.confusion import SOURCES, cloud_annotations, estimate_source_confusions  # noqa: E402
from coin_ray.train.cloud_label import CLOUD_LABEL_STUDENT, best_cloud_label_student, detect_split  # noqa: E402
from coin_ray.train.oracle import train_oracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

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
    "COIN w/ DS (ours, beyond the paper)": ["train.distill.fusion=ds"],
}
# The keys of fidelity.json for the rows above.
TABLE5_KEYS = {"L_con": "L_con", "L_align + L_con": "L_align+L_con", "L_align + L_con + L_pri": "L_align+L_con+L_pri",
               "L_align + L_con + L_inc": "L_align+L_con+L_inc", FULL: "L_align+L_con+L_inc+L_pri"}
TABLE6_KEYS = {"COIN w/ cloud det probs": "cloud", "COIN w/ CLIP det probs": "clip_det", "COIN w/ avg": "avg",
               "COIN w/ s-avg": "s_avg", "COIN w/ CKG": "ckg", "COIN w/ DS (ours, beyond the paper)": "ds"}
TEACHERS = ("Cloud det", "CLIP", "CLIP det")


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


def teacher_separations(cfg: Config, run: RunDir, train_gt: LabelledSplit) -> list[tuple[GroundTruth, Separation]]:
    """The separation of the stored CLIP det vs cloud det detections (the teacher before
    burn-up) on every target train image that has both, with that image's ground truth."""
    d, k = cfg.train.distill, cfg.num_classes
    cloud = {r.uri: r for r in records_at(run.cloud_detections)}
    clip_det = {r.uri: r for r in records_at(run.clip_detections)}
    return [(gt, separate(as_source(cloud[gt.uri], d.min_score, k), as_source(clip_det[gt.uri], d.min_clip_score, k),
                          iou_threshold=d.match_iou))
            for gt in train_gt.items if gt.uri in cloud and gt.uri in clip_det]


def separation_summary(separations: list[tuple[GroundTruth, Separation]]) -> dict:
    """Sets of CLIP det vs cloud det on the target train images, judged against ground truth."""
    stats = SeparationStats()
    for gt, sep in separations:
        stats.add(sep, torch.as_tensor(gt.boxes), torch.as_tensor(gt.labels))
    return stats.summary()


def disagreement_confidence(separations: list[tuple[GroundTruth, Separation]]) -> dict:
    """On the inconsistent pairs (CLIP det vs cloud det, target train): which source gives its
    own label the higher probability, and how often each source, and the more confident
    one, is right against ground truth. Any fusion that weighs the two by confidence
    follows the more confident source."""
    own_cloud, own_clip, cloud_right, clip_right = [], [], [], []
    for gt, sep in separations:
        inc = sep.inconsistent
        truth = torch.as_tensor(hit_labels(gt, inc.boxes.numpy()))
        own_cloud += inc.cloud_probs.gather(1, inc.cloud_labels[:, None])[:, 0].tolist()
        own_clip += inc.clip_probs.gather(1, inc.clip_labels[:, None])[:, 0].tolist()
        cloud_right += (inc.cloud_labels == truth).tolist()
        clip_right += (inc.clip_labels == truth).tolist()
    if not own_cloud:
        return {"pairs": 0}
    cloud_surer = torch.tensor(own_cloud) > torch.tensor(own_clip)
    right = {"cloud": torch.tensor(cloud_right), "clip_det": torch.tensor(clip_right)}
    surer_right = torch.where(cloud_surer, right["cloud"], right["clip_det"])
    only_clip = right["clip_det"] & ~right["cloud"]
    return {"pairs": len(own_cloud), "cloud_more_confident": round(cloud_surer.float().mean().item(), 3),
            "median_own_label_prob": {"cloud": round(statistics.median(own_cloud), 3),
                                      "clip_det": round(statistics.median(own_clip), 3)},
            "right": {name: round(r.float().mean().item(), 3) for name, r in right.items()},
            "more_confident_right": round(surer_right.float().mean().item(), 3),
            "clip_det_only_right": int(only_clip.sum()),
            "cloud_more_confident_where_clip_det_only_right":
                round(cloud_surer[only_clip].float().mean().item(), 3) if bool(only_clip.any()) else None}


def separation_by_class(separations: list[tuple[GroundTruth, Separation]], categories: list[str]) -> dict:
    """Where each class's ground-truth objects land in the separation (CLIP det vs cloud det,
    target train): consistent with the right label or a wrong one, or inconsistent with the
    CLIP detector right, the cloud right, or neither. The CKG learns only from consistent
    boxes, so a class that is never consistent-right is one it has never seen agreed."""
    out = {name: dict.fromkeys(("consistent_right", "consistent_wrong", "inconsistent_clip_det_right",
                                "inconsistent_cloud_right", "inconsistent_neither"), 0) for name in categories}
    for gt, sep in separations:
        for truth, pair in zip(hit_labels(gt, sep.consistent.boxes.numpy()), sep.consistent.cloud_labels.tolist()):
            if truth >= 0:
                out[categories[truth]]["consistent_right" if pair == truth else "consistent_wrong"] += 1
        inc = sep.inconsistent
        for truth, a, b in zip(hit_labels(gt, inc.boxes.numpy()), inc.cloud_labels.tolist(), inc.clip_labels.tolist()):
            if truth >= 0:
                key = ("inconsistent_cloud_right" if a == truth else
                       "inconsistent_clip_det_right" if b == truth else "inconsistent_neither")
                out[categories[truth]][key] += 1
    return out


def source_confusions(cfg: Config, run: RunDir, train_gt: LabelledSplit) -> dict:
    """The sources' confusions on the target train images: Dawid-Skene's estimate (from the
    records alone, as fusion ds computes it) next to the true ones (each cloud box's class
    from ground truth, background when it hits no object), rows the true class."""
    d, k = cfg.train.distill, cfg.num_classes
    truth_of = {g.uri: g for g in train_gt.items}
    cloud = [r for r in records_at(run.cloud_detections) if r.uri in truth_of]
    annotations = cloud_annotations(cloud, clip_records(run), records_at(run.clip_detections), min_score=d.min_score,
                                    min_clip_score=d.min_clip_score, match_iou=d.match_iou)
    estimate = estimate_source_confusions(annotations, k)
    counts = np.zeros((len(SOURCES), k + 1, k + 1))
    for r, labels in zip(cloud, annotations):
        if labels is None:
            continue
        truth = hit_labels(truth_of[r.uri], np.asarray(r.boxes).reshape(-1, 4)[np.asarray(r.scores) >= d.min_score])
        truth = np.where(truth < 0, k, truth)
        for j in range(len(SOURCES)):
            seen = labels[:, j] >= 0
            np.add.at(counts[j], (truth[seen], labels[seen, j]), 1)
    rows = counts.sum(axis=2, keepdims=True)
    true = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    prior = counts[0].sum(axis=1)  # every usable cloud box, by its true class
    return {"estimated": estimate.to_dict(cfg.data.categories),
            "true": {"prior": (prior / max(prior.sum(), 1)).round(6).tolist(),
                     "confusion": {s: true[j].round(6).tolist() for j, s in enumerate(SOURCES)},
                     "boxes_per_true_class": prior.astype(int).tolist()}}


def confusion_lines(report: dict, categories: list[str]) -> list[str]:
    """Per source and true class: p(right label), estimated vs true, and the largest confusion."""
    names = [*categories, "background"]
    lines = []
    for source in SOURCES:
        est = np.asarray(report["estimated"]["confusion"][source])
        true = np.asarray(report["true"]["confusion"][source])
        for z, name in enumerate(names):
            off = est[z].copy()
            off[z] = -1
            worst = int(off.argmax())
            lines.append(f"  {source:8s} {name:12s} right {est[z, z]:.2f} (true {true[z, z]:.2f}); most often called "
                         f"{names[worst]} {est[z, worst]:.2f} (true {true[z, worst]:.2f})")
    return lines


@dataclass
class Variant:
    """One distilled (or Oracle) detector, evaluated: its Table 1 row and what it learnt from."""

    result: EvalResult
    fusion: dict = field(default_factory=dict)  # FusionStats.summary() after burn-up
    separation: dict = field(default_factory=dict)  # SeparationStats.summary() over training

    def to_json(self) -> dict:
        return {"eval": self.result.to_json(), "fusion": self.fusion, "separation": self.separation}


def load_variant(text: str) -> Variant:
    data = json.loads(text)
    if "eval" not in data:  # cached before fusion statistics were recorded
        return Variant(load_result(text))
    return Variant(load_result(json.dumps(data["eval"])), data.get("fusion", {}), data.get("separation", {}))


def ground_truth_by_uri(split: LabelledSplit) -> dict[str, dict[str, torch.Tensor]]:
    return {g.uri: {"boxes": torch.as_tensor(g.boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.as_tensor(g.labels, dtype=torch.int64)} for g in split.items}


def run_variant(cfg: Config, run: RunDir, overrides: list[str], seed: int, split: LabelledSplit,
                cache: str, train_gt: LabelledSplit | None = None) -> Variant:
    """Distil one variant with one seed and evaluate it (cached by variant and seed).

    ``train_gt`` (the target train split's labels) only judges the separation and fusion.
    """
    key = "-".join(o.split(".")[-1].replace("=", "_") for o in overrides) or "full"
    uri = storage.join(cache, f"{key}-seed{seed}.json")
    if storage.exists(uri):
        return load_variant(storage.read_text(uri))
    vcfg = with_updates(cfg, [*overrides, f"seed={seed}"])
    wanted = set(target_uris(cfg))
    items = [r for r in records_at(run.cloud_detections) if r.uri in wanted]
    started = time.time()

    def progress(step: int, metrics: dict[str, float]) -> None:
        if step % 100 == 0:
            print(f"[tables] {key} seed {seed}: step {step} loss {metrics['loss']:.3f} "
                  f"({time.time() - started:.0f} s)", flush=True)

    state = distill(vcfg, run.clip_detector, items, on_step=progress,
                    ground_truth=ground_truth_by_uri(train_gt) if train_gt else None,
                    teacher_records=clip_det_records(run), clip_records=clip_records(run))
    variant = Variant(evaluate(split, detect_split(state.detector, split, SOURCE_COIN)), state.fusion_stats.summary(),
                      state.stats.summary())
    storage.write_text(uri, json.dumps(variant.to_json()))
    print(f"[tables] {key} seed {seed}: mAP50 {variant.result.map50:.1f}  fusion {variant.fusion}", flush=True)
    return variant


def run_oracle(cfg: Config, run: RunDir, seed: int, split: LabelledSplit, cache: str,
               train_gt: LabelledSplit) -> Variant:
    """The Oracle row for one seed: the target detector trained on ``train_gt`` (cached)."""
    uri = storage.join(cache, f"oracle-seed{seed}.json")
    if storage.exists(uri):
        return load_variant(storage.read_text(uri))
    detector = train_oracle(with_updates(cfg, [f"seed={seed}"]), run.clip_detector, train_gt)
    variant = Variant(evaluate(split, detect_split(detector, split, SOURCE_COIN)))
    storage.write_text(uri, json.dumps(variant.to_json()))
    print(f"[tables] oracle seed {seed}: mAP50 {variant.result.map50:.1f}", flush=True)
    return variant


def run_cloud_label_student(cfg: Config, run: RunDir, seed: int, split: LabelledSplit, cache: str
                            ) -> tuple[EvalResult, dict]:
    """The cloud-label student's row for one seed: the best of its cuts s on ``split`` (cached),
    and its choice (``CloudLabelChoice.to_json``: s, mAP50 per cut, the note)."""
    uri = storage.join(cache, f"cloud-label-student-seed{seed}.json")
    if not storage.exists(uri):
        wanted = set(target_uris(cfg))
        items = [r for r in records_at(run.cloud_detections) if r.uri in wanted]
        choice = best_cloud_label_student(with_updates(cfg, [f"seed={seed}"]), run.clip_detector, items, split)
        storage.write_text(uri, json.dumps({"eval": choice.result.to_json(), "choice": choice.to_json()}))
        print(f"[tables] cloud-label student seed {seed}: {choice.note()}", flush=True)
    data = json.loads(storage.read_text(uri))
    return load_result(json.dumps(data["eval"])), data["choice"]


def row_json(results: list[EvalResult]) -> dict:
    """{"map50": [per seed], "ap50": {class: [per seed]}} (NaN as null)."""
    def num(v: float) -> float | None:
        return None if v != v else round(v, 2)

    return {"map50": [num(r.map50) for r in results],
            "ap50": {c: [num(r.ap50[c]) for r in results] for c in results[0].ap50}}


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


def without_nan(value: object) -> object:
    """``value`` with every NaN float as None, so the JSON is strict (null)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def teacher_rows(cfg: Config, run: RunDir) -> dict[str, EvalResult]:
    stored = evaluate_rows(cfg, run)
    return {m: stored[m] for m in TEACHERS if m in stored}


def with_cloud_label_student(cfg: Config, run: RunDir, seeds: list[int], split: LabelledSplit, cache: str,
                             table: dict[str, EvalResult], data: dict, coin: list[EvalResult]
                             ) -> tuple[dict[str, EvalResult], str]:
    """Table 1 with the cloud-label student's row (mean over ``seeds``) after "Cloud det";
    its fidelity.json parts added to ``data``; the row's note (s per seed, how chosen)."""
    found = [run_cloud_label_student(cfg, run, s, split, cache) for s in seeds]
    results = [r for r, _ in found]
    rows = list(table.items())
    at = next((i + 1 for i, (m, _) in enumerate(rows) if m == "Cloud det"), 0)
    table = dict(rows[:at] + [(CLOUD_LABEL_STUDENT, mean_result(results))] + rows[at:])
    data["table1"] = {m: data["table1"][m] if m != CLOUD_LABEL_STUDENT else row_json(results) for m in table}
    data["cloud_label_student"] = {"min_score": [c["min_score"] for _, c in found],
                                   "map50_by_min_score": [c["map50_by_min_score"] for _, c in found],
                                   "note": found[0][1]["note"] if len(found) == 1 else
                                   f"{CLOUD_LABEL_STUDENT}: the target detector trained like the Oracle on the "
                                   "cloud's boxes with score >= s as ground truth, s from {0.3, 0.5, 0.7} chosen "
                                   "per seed on the labelled val split (the one the table reports: its best case); "
                                   f"s per seed {[c['min_score'] for _, c in found]}"}
    data["coin_minus_cloud_label_student"] = [round(c.map50 - r.map50, 2) for c, r in zip(coin, results)]
    return table, data["cloud_label_student"]["note"]


def table_variants(number: str, fusions: str = "") -> dict[str, list[str]]:
    """Table 5's or 6's rows: name -> distillation overrides; Table 6 only the ``--fusions`` keys when given."""
    if number == "5":
        return dict(TABLE5)
    return {name: ov for name, ov in TABLE6.items() if not fusions or TABLE6_KEYS[name] in fusions.split(",")}


@dataclass(frozen=True, eq=False)
class Job:
    """One cached training of a table (a distilled variant, an Oracle, a cloud-label student) for one seed."""

    fn: Callable[..., object]
    args: tuple
    key: tuple


def training_jobs(cfg: Config, run: RunDir, args: argparse.Namespace, tables: set[str], split: LabelledSplit,
                  cache: str, train_gt: LabelledSplit | None, *, oracle: bool, cloud_label: bool) -> list[Job]:
    """Every training the tables will ask for, once each, in the order the tables ask."""
    variants = [[]] if "1" in tables else []
    variants += [ov for number in ("5", "6") if number in tables for ov in table_variants(number, args.fusions).values()]
    jobs = [Job(run_variant, (cfg, run, ov, seed, split, cache, train_gt), ("variant", tuple(ov), seed))
            for ov in variants for seed in args.seeds]
    if "1" in tables and cloud_label:
        jobs += [Job(run_cloud_label_student, (cfg, run, seed, split, cache), ("cloud-label", seed))
                 for seed in args.seeds]
    if "1" in tables and oracle and train_gt is not None:
        jobs += [Job(run_oracle, (cfg, run, seed, split, cache, train_gt), ("oracle", seed)) for seed in args.seeds]
    seen: set[tuple] = set()
    return [job for job in jobs if not (job.key in seen or seen.add(job.key))]


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_side_by_side(jobs: list[Job], workers: int) -> None:
    """Run ``jobs`` in ``workers`` processes of one torch thread each (``--jobs``), so a table
    uses every core; each job stores its result in the tables' cache, where the tables then
    read it. One worker: nothing runs here (the tables train in this process, in turn)."""
    if workers <= 1 or len(jobs) <= 1:
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads have started
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_one_thread) as pool:
        for job, done in zip(jobs, [pool.submit(job.fn, *job.args) for job in jobs]):
            done.result()  # raises the job's error here


def world_tables(args: argparse.Namespace, overrides: list[str], tables: set[str],
                 oracle: bool, from_run: str = "", cloud_label: bool = True) -> tuple[str, dict]:
    """The tables of one world (one ``data.cloud_confusion``): Markdown and fidelity.json parts.

    ``from_run``: a finished run of this very world to read stages 0-2 from (else they run).
    """
    cfg, run = prepare_run(load_config(None, overrides), from_run)
    split = val_split(cfg)
    world = demo_world(cfg)
    # Every variant distils over the same images: the length (epochs -> steps) is theirs.
    wanted = set(target_uris(cfg))
    _, length = resolve_length(cfg, "distill", sum(r.uri in wanted for r in records_at(run.cloud_detections)))
    print(length.describe(), flush=True)
    # Results are cached per world and per shared setting (the steps it resolves to,
    # overrides), so a run with other settings into the same storage never reuses these.
    shared = [f"steps={length.steps}", *args.overrides]
    tag = "-".join(o.replace("=", "_").replace("/", "_") for o in shared) or "defaults"
    rho_tag = f"-confusion{cfg.data.cloud_confusion:g}" if cfg.data.cloud_confusion else ""
    cache = storage.join(args.storage, "tables", args.world + rho_tag, tag)
    train_gt = None
    out, data = [], {"separation_teacher_before_burn_up": {}}
    if world is not None:
        train_gt = load_coco(str(world.target_train_json), str(world.target_train_images), cfg.data.categories)
        separations = teacher_separations(cfg, run, train_gt)
        data["separation_teacher_before_burn_up"] = separation_summary(separations)
        print("separation (target train, CLIP det vs cloud det):",
              json.dumps(data["separation_teacher_before_burn_up"], indent=1))
        data["separation_by_class"] = separation_by_class(separations, list(cfg.data.categories))
        print("where each class's objects land (target train):", json.dumps(data["separation_by_class"], indent=1))
        data["disagreement_confidence"] = disagreement_confidence(separations)
        print("disagreements (target train): who is more confident, who is right:",
              json.dumps(data["disagreement_confidence"], indent=1))
        data["source_confusions"] = source_confusions(cfg, run, train_gt)
        print("source confusions (target train), Dawid-Skene estimate against the truth:",
              *confusion_lines(data["source_confusions"], list(cfg.data.categories)), sep="\n")

    def rows(variants: dict[str, list[str]]) -> dict[str, list[Variant]]:
        return {name: [run_variant(cfg, run, ov, s, split, cache, train_gt) for s in args.seeds]
                for name, ov in variants.items()}

    jobs = training_jobs(cfg, run, args, tables, split, cache, train_gt, oracle=oracle, cloud_label=cloud_label)
    run_side_by_side(jobs, args.jobs)
    teachers = teacher_rows(cfg, run)
    if "1" in tables:
        coin = [v.result for v in rows({FULL: []})[FULL]]
        table = dict(teachers) | {FULL: mean_result(coin)}
        data["table1"] = {m: row_json([r]) for m, r in teachers.items()} | {FULL: row_json(coin)}
        notes = []
        if cloud_label:
            table, note = with_cloud_label_student(cfg, run, args.seeds, split, cache, table, data, coin)
            notes.append(note)
        if oracle and train_gt is not None:
            oracles = [run_oracle(cfg, run, s, split, cache, train_gt).result for s in args.seeds]
            table["Oracle"] = mean_result(oracles)
            data["table1"]["Oracle"] = row_json(oracles)
        best = max(r.map50 for m, r in teachers.items() if m in ("Cloud det", "CLIP det"))
        data["coin_minus_best_teacher"] = [round(r.map50 - best, 2) for r in coin]
        out.append(f"Table 1 ({args.world} world, rho {cfg.data.cloud_confusion:g}, target val, COIN mean of "
                   f"seeds {args.seeds}; COIN mAP50 {spread(coin)})\n\n" + table1_markdown(table, cfg.data.categories)
                   + "".join(f"\n{n}\n" for n in notes))
    for number, keys in (("5", TABLE5_KEYS), ("6", TABLE6_KEYS)):
        if number not in tables:
            continue
        results = rows(table_variants(number, args.fusions))
        table = {"CLIP det": teachers["CLIP det"]} if number == "5" and "CLIP det" in teachers else {}
        table |= {f"{name} ({spread([v.result for v in r])})": mean_result([v.result for v in r])
                  for name, r in results.items()}
        data[f"table{number}"] = {keys[name]: [round(v.result.map50, 2) for v in r] for name, r in results.items()}
        if number == "6":
            data["table6_fusion"] = {keys[name]: [v.fusion for v in r] for name, r in results.items()}
        out.append(f"Table {number}\n\n" + table1_markdown(table, cfg.data.categories))
    text = "\n".join(out)
    storage.write_text(storage.join(cache, "tables.md"), text)
    data |= {"rho": cfg.data.cloud_confusion, "target_backbone": cfg.model.target_backbone,
             "steps": length.steps, "epochs": round(length.epochs, 2)}
    return text, data


def tables_run_id(world: str, rho: float) -> str:
    """The run holding stages 0-2 of one world: one per cloud_confusion, so none is reused for another."""
    return f"tables-{world}" + (f"-confusion{rho:g}" if rho else "")


def parse_from_runs(values: list[str], main_rho: float) -> dict[float, str]:
    """``["0=runs/a", "runs/b"]`` -> {0.0: "runs/a", main_rho: "runs/b"} (a bare DIR is the main world's)."""
    runs = {}
    for value in values:
        rho, sep, path = value.partition("=")
        if not sep:
            rho, path = str(main_rho), value
        try:
            runs[float(rho)] = path
        except ValueError:
            raise SystemExit(f"--from-run: {value!r} is not [RHO=]DIR with RHO a number") from None
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="bench", choices=["tiny", "demo", "bench"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0,
                        help="distillation steps (0 = the config's: train.distill.epochs over the target images)")
    parser.add_argument("--tables", default="1,5,6")
    parser.add_argument("--fusions", default="",
                        help="Table 6 rows to run, by key (cloud,clip_det,avg,s_avg,ckg,ds); default every row")
    parser.add_argument("--rho", type=float, nargs="*", default=[],
                        help="cloud_confusion values for the rho curve (each builds its own world)")
    parser.add_argument("--no-oracle", action="store_true", help="leave the Oracle row out of Table 1")
    parser.add_argument("--no-cloud-label-student", action="store_true",
                        help="leave the cloud-label student's row out of Table 1 (3 trainings per seed)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="trainings run side by side, one torch thread each (default: one per core; "
                             "1 trains them in turn in this process, with torch's default threads)")
    parser.add_argument("--storage", default="runs-tables")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fidelity.json"))
    parser.add_argument("--from-run", action="append", default=[], metavar="[RHO=]DIR",
                        help="read stages 0-2 of the world at this cloud_confusion (default: the "
                             "config's) from this finished run directory; once per world")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    base = [f"data.world={args.world}", f"storage={args.storage}",
            *([f"train.distill.steps={args.steps}"] if args.steps else []), *args.overrides]
    main_rho = load_config(None, base).data.cloud_confusion
    from_runs = parse_from_runs(args.from_run, main_rho)
    text, data = world_tables(args, [*base, f"run_id={tables_run_id(args.world, main_rho)}"],
                              set(args.tables.split(",")), oracle=not args.no_oracle,
                              from_run=from_runs.pop(main_rho, ""), cloud_label=not args.no_cloud_label_student)
    curve = {}
    for rho in args.rho:
        if rho == main_rho and "table1" in data:  # the main world's Table 1 is this point already
            part = data
        else:
            world_overrides = [*base, f"data.cloud_confusion={rho}", f"run_id={tables_run_id(args.world, rho)}"]
            part_text, part = world_tables(args, world_overrides, {"1"}, oracle=False, from_run=from_runs.get(rho, ""),
                                           cloud_label=False)
            text += "\n" + part_text
        curve[f"{rho:g}"] = {"coin_minus_best_teacher": part["coin_minus_best_teacher"],
                             "table1": part["table1"],
                             "disagreement_confidence": part.get("disagreement_confidence", {})}
    print(text)
    result = {"world": args.world, "seeds": args.seeds, **data, "rho_curve": curve}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(without_nan(result), indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
