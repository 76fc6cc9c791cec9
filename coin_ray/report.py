"""The run report: metrics as JSON and Markdown, and pictures a person would rather look at.

    report/metrics.json        Table 1 as JSON (+ separation statistics)
    report/table1.md           Table 1 as Markdown
    report/losses.png          training loss curves of both stages
    report/ap_per_class.png    per-class AP50 bars, one colour per method
    report/separation.png      consistent / inconsistent / private counts over distillation
    report/detections.png      target images: cloud | CLIP det | COIN, boxes coloured by set
"""

from __future__ import annotations

import io
import json
import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from coin_ray import storage  # noqa: E402
from coin_ray.boxes import match_one_to_one  # noqa: E402
from coin_ray.config import Config  # noqa: E402
from coin_ray.data.datasets import LabelledSplit  # noqa: E402
from coin_ray.data.images import load_image  # noqa: E402
from coin_ray.evaluate import EvalResult, table1_json, table1_markdown  # noqa: E402
from coin_ray.run import RunDir  # noqa: E402
from coin_ray.schema import Detections, table_to_records  # noqa: E402

SET_COLOURS = {"consistent": "#2ca02c", "inconsistent": "#ff7f0e", "private": "#d62728", "coin": "#17becf"}


def _save(fig: plt.Figure, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def plot_losses(curves: dict[str, list[dict]], uri: str) -> None:
    """One panel per stage; ``curves[stage]`` is a list of {"step": int, "<loss name>": float}."""
    stages = [s for s, rows in curves.items() if rows]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(6 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = curves[stage]
        keys = sorted({k for r in rows for k in r if k.startswith(("loss", "l_")) and isinstance(r[k], (int, float))})
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key, lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
    _save(fig, uri)


def plot_ap_bars(results: dict[str, EvalResult], categories: Sequence[str], uri: str) -> None:
    """Grouped bars: AP50 per class (and mAP50) for each method."""
    names = [*categories, "mAP50"]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 1.1), 3.8))
    for i, (method, res) in enumerate(results.items()):
        values = [res.ap50.get(c, float("nan")) for c in categories] + [res.map50]
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(values), width, label=method)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("AP50 (%)")
    ax.legend(fontsize=8, ncol=len(results))
    _save(fig, uri)


def plot_separation(rows: list[dict], uri: str) -> None:
    """Counts of each set over distillation; rows are {"step", "sep_<set>": count}."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = sorted({k for r in rows for k in r if k.startswith("sep_")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key[len("sep_"):])
    ax.set_xlabel("step")
    ax.set_ylabel("boxes per batch")
    ax.set_title("knowledge separation during distillation")
    if keys:
        ax.legend(fontsize=8)
    _save(fig, uri)


def _draw(ax: plt.Axes, boxes: np.ndarray, colours: list[str], captions: list[str]) -> None:
    for (x1, y1, x2, y2), colour, caption in zip(boxes.tolist(), colours, captions):
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.2))
        ax.text(x1, y1, caption, color="white", fontsize=5, va="bottom",
                bbox=dict(facecolor=colour, alpha=0.7, pad=0.5, lw=0))


def _set_colours(cloud: Detections, clip_det: Detections, iou: float) -> tuple[list[str], list[str]]:
    """Colour of each cloud box and each CLIP-det box by its separation set.

    Uses the same one-to-one matching as ``coin_ray.separate.separate``: a matched pair is
    consistent when the labels agree, inconsistent otherwise; unmatched boxes are private.
    """
    pairs = match_one_to_one(torch.from_numpy(cloud.boxes), torch.from_numpy(clip_det.boxes), iou,
                             labels_a=torch.as_tensor(cloud.labels), labels_b=torch.as_tensor(clip_det.labels)).tolist()
    cloud_colours = [SET_COLOURS["private"]] * len(cloud)
    clip_colours = [SET_COLOURS["private"]] * len(clip_det)
    for i, j in pairs:
        agree = cloud.labels[i] == clip_det.labels[j]
        cloud_colours[i] = clip_colours[j] = SET_COLOURS["consistent" if agree else "inconsistent"]
    return cloud_colours, clip_colours


def detection_grid(images: list[np.ndarray], cloud: list[Detections], clip_det: list[Detections],
                   coin: list[Detections], categories: Sequence[str], uri: str,
                   iou: float = 0.5, min_score: float = 0.3) -> None:
    """Rows of target images; columns cloud | CLIP det | COIN. Cloud and CLIP-det boxes are
    coloured consistent (green) / inconsistent (orange) / private (red); COIN in cyan.
    Boxes below ``min_score`` are not drawn (nor separated)."""
    fig, axes = plt.subplots(len(images), 3, figsize=(12, 2.6 * len(images)), squeeze=False)
    for row, (img, c, d, s) in enumerate(zip(images, cloud, clip_det, coin)):
        c, d, s = (_above(r, min_score) for r in (c, d, s))
        cloud_col, clip_col = _set_colours(c, d, iou)
        panels = [(c, cloud_col, "cloud"), (d, clip_col, "CLIP det"), (s, [SET_COLOURS["coin"]] * len(s), "COIN")]
        for ax, (rec, colours, title) in zip(axes[row], panels):
            ax.imshow(img)
            captions = [f"{categories[int(lab)]} {sc:.2f}" for lab, sc in zip(rec.labels, rec.scores)]
            _draw(ax, rec.boxes, colours, captions)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.suptitle("green: consistent, orange: inconsistent, red: private", fontsize=9)
    _save(fig, uri)


def _above(rec: Detections, min_score: float) -> Detections:
    keep = rec.scores >= min_score
    return Detections(rec.image_id, rec.uri, rec.width, rec.height, rec.boxes[keep], rec.labels[keep],
                      rec.scores[keep], rec.probs[keep], rec.source, rec.error)


def write_tables(results: dict[str, EvalResult], categories: Sequence[str], report_uri: str,
                 extra: dict | None = None) -> str:
    """Write table1.md and metrics.json under ``report_uri``; return the Markdown."""
    md = table1_markdown(results, list(categories))
    storage.write_text(storage.join(report_uri, "table1.md"), md)
    metrics = json.loads(table1_json(results))
    if extra:
        metrics = {"table1": metrics, **extra}
    storage.write_text(storage.join(report_uri, "metrics.json"), json.dumps(metrics, indent=2))
    return md


def read_metrics(uri: str) -> list[dict]:
    """Per-step metrics written as JSON lines ({"step": ..., ...}); [] when absent."""
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def write_report(cfg: Config, run: RunDir, split: LabelledSplit, results: dict[str, EvalResult],
                 grid_images: int = 4) -> str:
    """Everything under ``<run>/report``: tables, loss curves, AP bars, separation, detections.

    Args:
        cfg: the run's ``Config``; run: its ``RunDir``; split: the labelled ``LabelledSplit``;
        results: Table 1 rows (method -> EvalResult).
    Returns:
        The Table 1 Markdown.
    """
    out = run.report_dir
    curves = {stage: read_metrics(run.metrics(stage)) for stage in ("disseminate", "distill")}
    md = write_tables(results, cfg.data.categories, out)
    plot_ap_bars(results, cfg.data.categories, storage.join(out, "ap_per_class.png"))
    if any(curves.values()):
        plot_losses(curves, storage.join(out, "losses.png"))
    if any(k.startswith("sep_") for row in curves["distill"] for k in row):
        plot_separation(curves["distill"], storage.join(out, "separation.png"))
    sources = {}
    for name, uri in (("cloud", run.cloud_detections), ("clip_det", run.clip_detections),
                      ("coin", run.eval("coin"))):
        if storage.exists(uri):
            sources[name] = {r.uri: r for r in table_to_records(storage.read_parquet(uri))}
    if len(sources) == 3:
        uris = [g.uri for g in split.items if all(g.uri in s for s in sources.values())][:grid_images]
        detection_grid([load_image(u) for u in uris], [sources["cloud"][u] for u in uris],
                       [sources["clip_det"][u] for u in uris], [sources["coin"][u] for u in uris],
                       cfg.data.categories, storage.join(out, "detections.png"),
                       iou=cfg.train.distill.match_iou)
    return md
