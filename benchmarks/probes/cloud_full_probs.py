"""Would the cloud's full class distributions change COIN? A copy of a run, re-answered with them.
Backs docs/fidelity.md, "Why: the separation statistics" (the cloud's full distributions).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probes/cloud_full_probs.py RUN_DIR OUT_RUN_DIR
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coin_tables.py --from-run OUT_RUN_DIR ...

The Foggy-Shapes stand-in cloud is served class-only, as the Grounding DINO 1.5 API answers:
each box's probs are its score on its label, the rest shared uniformly
(``schema.class_only_probs``). The paper's tables use a local Grounding DINO, whose full
distributions carry a second choice (rider under person). This copies RUN_DIR (stages
collect, disseminate and clip_det done on the built-in world) to OUT_RUN_DIR and asks the
same stand-in, with ``full_probs``, for every target image again: every box and label must
come back identical (the script stops otherwise), and only the probs column of
``collect/cloud.parquet`` changes. The CLIP relabelling, the CLIP detector and its
detections are kept, since they depend on the boxes alone. It also prints, per class of
rider and train ground truth, the mean distribution the cloud gives its boxes there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coin_ray import storage  # noqa: E402
from coin_ray.cloud.mapping import CategoryMap, answer_to_detections  # noqa: E402
from coin_ray.config import load_config  # noqa: E402
from coin_ray.data.datasets import LabelledSplit, load_coco  # noqa: E402
from coin_ray.data.images import decode_image  # noqa: E402
from coin_ray.demo import demo_world, with_demo_world  # noqa: E402
from coin_ray.schema import Detections, records_to_table, table_to_records  # noqa: E402
from coin_ray.source_agreement import hit_labels  # noqa: E402
from coin_ray.world.cloud_standin import StandInCloudDetector, prompt_categories  # noqa: E402

KEPT = ("collect", "disseminate", "clip_det", "config.yaml", "manifest.json")


def with_full_probs(records: list[Detections], cloud: StandInCloudDetector, cmap: CategoryMap,
                    prompts: list[str]) -> list[Detections]:
    """The same records with the stand-in's full (N, K+1) probs; boxes and labels checked equal."""
    out = []
    for record in records:
        data = storage.read_bytes(record.uri)
        answer = cloud.detect(data, decode_image(data, record.uri), prompts)
        again, _ = answer_to_detections(answer, cmap, record.image_id, record.uri, record.width, record.height)
        if len(again) != len(record) or not (np.allclose(again.boxes, record.boxes, atol=1e-3)
                                             and (again.labels == record.labels).all()):
            raise SystemExit(f"{record.uri}: the stand-in answered other boxes than the run holds; "
                             "is RUN_DIR from this world and checkpoint?")
        record.probs = again.probs
        out.append(record)
    return out


def mean_probs_on(records: list[Detections], split: LabelledSplit, classes: tuple[str, ...]) -> list[str]:
    """Lines: for cloud boxes (score >= 0.3) hitting a ground-truth object of ``classes``
    (IoU >= 0.5), the three largest entries of their mean probs, per (true class, cloud label)."""
    names = [*split.categories, "background"]
    wanted = {split.categories.index(c) for c in classes}
    truth = {g.uri: g for g in split.items}
    rows: dict[tuple[int, int], list[np.ndarray]] = {}
    for record in records:
        if record.uri not in truth or not len(record):
            continue
        hits = hit_labels(truth[record.uri], record.boxes)
        for i in np.flatnonzero((hits >= 0) & (record.scores >= 0.3)):
            if int(hits[i]) in wanted:
                rows.setdefault((int(hits[i]), int(record.labels[i])), []).append(record.probs[i])
    lines = []
    for (true, said), probs in sorted(rows.items()):
        mean = np.mean(probs, 0)
        top = ", ".join(f"{names[k]} {mean[k]:.2f}" for k in np.argsort(-mean)[:3])
        lines.append(f"true {names[true]}, cloud says {names[said]} ({len(probs)} boxes): {top}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory on the built-in world, stages collect..clip_det done")
    parser.add_argument("out", help="where the copy with full cloud probs goes (must not exist)")
    args = parser.parse_args()
    src, dst = Path(args.run), Path(args.out)
    if dst.exists():
        raise SystemExit(f"{dst} exists")
    cfg = with_demo_world(load_config(str(src / "config.yaml"), []))
    world = demo_world(cfg)
    if world is None:
        raise SystemExit(f"{src} is not a run on the built-in Foggy-Shapes world")
    cmap = CategoryMap.build(cfg.data.categories, cfg.cloud.prompts, cfg.cloud.label_map)
    prompts = cmap.prompt_list()
    cloud = StandInCloudDetector.load(world.cloud_detector, full_probs=True)
    if prompt_categories(prompts, cloud.categories) != list(cfg.data.categories):
        raise SystemExit("the stand-in's probs columns would not be in the run's category order")
    dst.mkdir(parents=True)
    for name in KEPT:
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)
    records = with_full_probs(table_to_records(storage.read_parquet(str(src / "collect" / "cloud.parquet"))),
                              cloud, cmap, prompts)
    storage.write_parquet(records_to_table(records), str(dst / "collect" / "cloud.parquet"))
    split = load_coco(str(world.target_train_json), str(world.target_train_images), cfg.data.categories)
    print("\n".join(mean_probs_on(records, split, ("rider", "train"))))
    print(f"wrote {dst} ({len(records)} records re-answered with full probs)")


if __name__ == "__main__":
    main()
