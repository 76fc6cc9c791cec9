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
from coin_ray.boxes import match_one_to_one, pairwise_iou  # noqa: E402
from coin_ray.config import Config  # noqa: E402
from coin_ray.data.datasets import LabelledSplit  # noqa: E402
from coin_ray.data.images import load_image  # noqa: E402
from coin_ray.evaluate import EvalResult, comparison_line, table1_json, table1_markdown  # noqa: E402
from coin_ray.run import RunDir  # noqa: E402
from coin_ray.schema import Detections, table_to_records  # noqa: E402
from coin_ray.tensorboard_log import TensorBoardLog  # noqa: E402

# Separation sets (detections.png, separation.png) and methods (every plot) never share a colour.
DUPLICATE_IOU = 0.3
SET_COLOURS = {"consistent": "#2ca02c", "inconsistent": "#ff7f0e", "private": "#d62728"}
METHOD_COLOURS = {"Cloud det": "#1f77b4", "Cloud-label student": "#aec7e8", "CLIP": "#9467bd", "CLIP det": "#8c564b",
                  "COIN": "#17becf", "Oracle": "#7f7f7f", "ground truth": "#f5d000"}
OTHER_COLOURS = ("#e377c2", "#bcbd22", "#393b79", "#637939")  # methods not listed above
SMOOTH_WINDOW = 0.1  # of a curve's points: the running mean of the solid line
CAPTION_PT = 8


def method_colour(method: str, index: int = 0) -> str:
    """The one colour of ``method`` in every figure (a spare one for unknown methods)."""
    return METHOD_COLOURS.get(method, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def _save(fig: plt.Figure, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Running mean over the last ``window`` points (shorter at the start); same length."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


FEW_POINTS = 10


def _curve(ax: plt.Axes, steps: list[int], values: list[float], label: str, colour: str) -> None:
    """Raw values faint, their running mean solid."""
    window = max(1, int(round(SMOOTH_WINDOW * len(values))))
    # A short run logs a point or two: a line through one point draws nothing, a marker does.
    marker = "o" if len(values) < FEW_POINTS else None
    ax.plot(steps, values, color=colour, lw=0.8, alpha=0.25)
    ax.plot(steps, smooth(values, window), color=colour, lw=1.6, label=label, marker=marker, markersize=4)


def _burn_up(ax: plt.Axes, step: int | None) -> None:
    if step:
        ax.axvline(step, color="black", ls="--", lw=1)
        ax.text(step, 0.97, " burn-up", va="top", transform=ax.get_xaxis_transform(), ha="left", fontsize=9)


LOSS_NAMES = {"loss": "total", "l_con": "L_con", "l_inc": "L_inc (x gamma1, from burn-up)",
              "l_pri": "L_pri (x gamma2)", "l_align": "L_align (x lambda)", "l_ckg": "L_ckg (CKG)",
              "loss_objectness": "RPN objectness", "loss_rpn_box_reg": "RPN box", "loss_classifier": "RoI class",
              "loss_box_reg": "RoI box", "loss_align": "L_align (unweighted)"}


def plot_losses(curves: dict[str, list[dict]], uri: str, *, run: str = "", burn_up: int | None = None) -> None:
    """One panel per stage; ``curves[stage]`` is a list of {"step": int, "<loss name>": float}.

    Log scale with only the positive values drawn: a term that is switched off (L_inc
    before ``burn_up``, marked) is absent rather than a plunge to zero.
    """
    stages = [s for s, rows in curves.items() if rows]
    fig, axes = plt.subplots(max(1, len(stages)), 1, figsize=(9, 3.8 * max(1, len(stages))), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, stage in zip(axes[:, 0], stages):
        rows = curves[stage]
        keys = sorted({k for r in rows for k in r if k.startswith(("loss", "l_")) and isinstance(r[k], (int, float))},
                      key=lambda k: (k != "loss", k))
        for i, key in enumerate(keys):
            pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key]) and r[key] > 0]
            if pts:
                _curve(ax, *map(list, zip(*pts)), LOSS_NAMES.get(key, key), colours[i % len(colours)])
        ax.set_yscale("log")
        ax.set_title(f"{stage}: training losses" + (f", run {run}" if run else "")
                     + "\nfaint: logged values, solid: running mean", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (log scale)")
        if stage == "distill":
            _burn_up(ax, burn_up)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, uri)


def plot_ap_bars(results: dict[str, EvalResult], categories: Sequence[str], uri: str, *, run: str = "",
                 split: str = "") -> None:
    """Grouped bars: AP50 per class (and mAP50) for each method; a zero is written as "0"."""
    names = [*categories, "mAP50"]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(9, len(names) * 1.2), 4.2))
    for i, (method, res) in enumerate(results.items()):
        values = np.nan_to_num([res.ap50.get(c, float("nan")) for c in categories] + [res.map50])
        pos = x + i * width - 0.4 + width / 2
        ax.bar(pos, values, width, label=method, color=method_colour(method, i))
        for p, v in zip(pos, values):
            if v < 0.5:  # a zero bar is invisible: say it
                ax.text(p, 0.5, "0", ha="center", va="bottom", fontsize=7, color=method_colour(method, i))
    ax.axvline(len(categories) - 0.5, color="grey", lw=0.8)
    ax.set_xticks(x, names, rotation=20)
    ax.set_xlabel("category (last group: mean over categories)")
    ax.set_ylabel("AP50 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("AP50 per category by method" + (f", {split}" if split else "") + (f" (run {run})" if run else ""),
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, uri)


def plot_separation(rows: list[dict], uri: str, *, run: str = "", burn_up: int | None = None) -> None:
    """Counts of each set over distillation; rows are {"step", "sep_<set>": count}."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, colour in SET_COLOURS.items():
        pts = [(r["step"], r[f"sep_{name}"]) for r in rows if f"sep_{name}" in r]
        if pts:
            _curve(ax, *map(list, zip(*pts)), name, colour)
    _burn_up(ax, burn_up)
    ax.set_xlabel("distillation step")
    ax.set_ylabel("boxes per training batch")
    ax.set_ylim(bottom=0)
    ax.set_title("knowledge separation of the training batches (cloud vs CLIP det)" + (f", run {run}" if run else "")
                 + "\nfaint: logged values, solid: running mean", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, uri)


def _draw(ax: plt.Axes, boxes: np.ndarray, colours: list[str], captions: list[str],
          dashed: list[bool] | None = None) -> None:
    dashed = dashed or [False] * len(boxes)
    for (x1, y1, x2, y2), colour, caption, dash in zip(boxes.tolist(), colours, captions, dashed):
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.5,
                                   ls="--" if dash else "-"))
        ax.text(x1, y1, caption, color="black", fontsize=CAPTION_PT, va="bottom",
                bbox=dict(facecolor=colour, alpha=0.8, pad=1.0, lw=0))


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


def duplicates(rec: Detections, iou: float = DUPLICATE_IOU) -> list[bool]:
    """Per box (sorted by score as detectors emit them): does a higher-scoring box of the
    same label overlap it by ``iou`` or more? Such a box is a false positive at AP50."""
    if len(rec) == 0:
        return []
    overlaps = pairwise_iou(torch.from_numpy(rec.boxes).float(), torch.from_numpy(rec.boxes).float())
    order = np.argsort(-rec.scores, kind="stable")
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))
    return [any(overlaps[i, j] >= iou and rec.labels[j] == rec.labels[i] and rank[j] < rank[i]
                for j in range(len(rec))) for i in range(len(rec))]


def detection_grid(images: list[np.ndarray], cloud: list[Detections], clip_det: list[Detections],
                   coin: list[Detections], categories: Sequence[str], uri: str,
                   iou: float = 0.5, min_score: float = 0.3, truth: list[dict] | None = None,
                   title: str = "") -> None:
    """Rows of target images; columns ground truth | cloud | CLIP det | COIN.

    ``truth``: per image {"boxes" (N,4) xyxy pixels, "labels" (N,)} (column left out when
    None). Cloud and CLIP-det boxes are coloured by separation set; COIN boxes in COIN's
    colour, dashed when they duplicate a better same-label box. Boxes below ``min_score``
    are not drawn (nor separated).
    """
    columns = (["ground truth"] if truth is not None else []) + ["cloud", "CLIP det", "COIN"]
    h, w = images[0].shape[:2] if images else (1, 1)
    side = 4.5
    fig, axes = plt.subplots(len(images), len(columns), squeeze=False,
                             figsize=(side * len(columns), side * h / w * len(images) + 1.2))
    for row, (img, c, d, s) in enumerate(zip(images, cloud, clip_det, coin)):
        c, d, s = (_above(r, min_score) for r in (c, d, s))
        cloud_col, clip_col = _set_colours(c, d, iou)
        panels = [(c.boxes, c.labels, c.scores, cloud_col, None), (d.boxes, d.labels, d.scores, clip_col, None),
                  (s.boxes, s.labels, s.scores, [METHOD_COLOURS["COIN"]] * len(s), duplicates(s))]
        if truth is not None:
            t = truth[row]
            panels.insert(0, (np.asarray(t["boxes"]).reshape(-1, 4), np.asarray(t["labels"]), None,
                              [METHOD_COLOURS["ground truth"]] * len(t["labels"]), None))
        for ax, (boxes, labels, scores, colours, dashed), name in zip(axes[row], panels, columns):
            ax.imshow(img)
            captions = [categories[int(lab)] + (f" {sc:.2f}" if scores is not None else "")
                        for lab, sc in zip(labels, scores if scores is not None else labels)]
            _draw(ax, boxes, colours, captions, dashed)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=11)
    legend = ("cloud and CLIP det boxes: green consistent, orange inconsistent, red private (their labels and "
              f"score >= {min_score}); COIN: cyan, dashed = a second box on an object COIN already boxed "
              "with the same label (a false positive at AP50)")
    fig.suptitle((title + "\n" if title else "") + legend, fontsize=10, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    _save(fig, uri)


def _above(rec: Detections, min_score: float) -> Detections:
    keep = rec.scores >= min_score
    return Detections(rec.image_id, rec.uri, rec.width, rec.height, rec.boxes[keep], rec.labels[keep],
                      rec.scores[keep], rec.probs[keep], rec.source, rec.error)


def write_tables(results: dict[str, EvalResult], categories: Sequence[str], report_uri: str,
                 extra: dict | None = None, notes: Sequence[str] = (), note: str = "") -> str:
    """Write table1.md and metrics.json under ``report_uri``; return the Markdown.

    Under the table: ``notes`` (what a row is, how it was chosen), then ``note`` when given,
    else the verdict of ``comparison_line``.
    """
    md = table1_markdown(results, list(categories))
    for line in [*notes, note or comparison_line(results)]:
        if line:
            md = f"{md.rstrip()}\n\n{line}\n"
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


def write_training_plots(cfg: Config, run: RunDir) -> list[str]:
    """``losses.png`` and ``separation.png`` under ``<run>/report`` from the training metrics;
    they need no labels. ``cfg``'s distillation length must be resolved (``resolve_length``):
    the plots mark burn-up at its step. Returns the uris written (none before any training)."""
    out, name = run.report_dir, run.root.rstrip("/").rsplit("/", 1)[-1]
    d = cfg.train.distill
    burn_up = int(round(d.burn_up * d.steps))
    curves = {stage: read_metrics(run.metrics(stage)) for stage in ("disseminate", "distill")}
    written = []
    if any(curves.values()):
        written.append(storage.join(out, "losses.png"))
        plot_losses(curves, written[-1], run=name, burn_up=burn_up)
    if any(k.startswith("sep_") for row in curves["distill"] for k in row):
        written.append(storage.join(out, "separation.png"))
        plot_separation(curves["distill"], written[-1], run=name, burn_up=burn_up)
    return written


def write_report(cfg: Config, run: RunDir, split: LabelledSplit, results: dict[str, EvalResult],
                 grid_images: int = 8, note: str = "", row_notes: dict[str, dict] | None = None) -> str:
    """Everything under ``<run>/report``: tables, loss curves, AP bars, separation, detections.

    Args:
        cfg: the run's ``Config``; run: its ``RunDir``; split: the labelled ``LabelledSplit``;
        results: Table 1 rows (method -> EvalResult).
        note: a sentence that replaces the verdict under Table 1 (the tiny world's "plumbing
            check": its numbers judge nothing).
        row_notes: method -> what makes its row (JSON, with a "note" line printed under the
            table), e.g. the cloud-label student's cut; kept in metrics.json as "row_notes".
    Returns:
        The Table 1 Markdown.
    """
    out = run.report_dir
    name = run.root.rstrip("/").rsplit("/", 1)[-1]
    split_name = f"labelled target split ({len(split.items)} images)"
    d = cfg.train.distill
    burn_up = int(round(d.burn_up * d.steps))
    extra = {"separation": separation_summary(read_metrics(run.metrics("distill")), burn_up)}
    notes = [n["note"] for n in (row_notes or {}).values() if n.get("note")]
    if storage.exists(run.distill_sets):
        sets = json.loads(storage.read_text(run.distill_sets))
        extra["separation_by_class"] = class_coverage(sets, cfg.data.categories)
        if "confusions" in sets:
            extra["source_confusions"] = sets["confusions"]
        notes.append(coverage_warning(unconfirmed_classes(extra["separation_by_class"]), d.fusion))
    if row_notes:
        extra["row_notes"] = row_notes
    md = write_tables(results, cfg.data.categories, out, extra=extra, note=note, notes=notes)
    plot_ap_bars(results, cfg.data.categories, storage.join(out, "ap_per_class.png"), run=name, split=split_name)
    write_training_plots(cfg, run)
    sources = {}
    for method, uri in (("cloud", run.cloud_detections), ("clip_det", run.clip_detections),
                        ("coin", run.eval("coin"))):
        if storage.exists(uri):
            sources[method] = {r.uri: r for r in table_to_records(storage.read_parquet(uri))}
    if len(sources) == 3:
        items = [g for g in split.items if all(g.uri in s for s in sources.values())][:grid_images]
        uris = [g.uri for g in items]
        detection_grid([load_image(u) for u in uris], [sources["cloud"][u] for u in uris],
                       [sources["clip_det"][u] for u in uris], [sources["coin"][u] for u in uris],
                       cfg.data.categories, storage.join(out, "detections.png"),
                       iou=d.match_iou, truth=[{"boxes": g.boxes, "labels": g.labels} for g in items],
                       title=f"detections on the {split_name}, run {name}")
    write_tensorboard(results, out, run)
    return md


COVERED_SETS = ("consistent", "admitted", "inconsistent_cloud", "inconsistent_clip", "private_cloud", "private_clip",
                "relabelled")


def class_coverage(sets: dict, categories: Sequence[str]) -> dict[str, dict[str, int]]:
    """{class name: {set name: boxes}} from ``<run>/distill/sets.json``: how many boxes each
    set held under each label over the distillation (a consistent box under its agreed
    label, an inconsistent one under each source's label; see ``SeparationStats``)."""
    by_class = sets.get("separation", {}).get("by_class", {})
    return {name: {s: int(by_class.get(s, {}).get(str(k), 0)) for s in COVERED_SETS}
            for k, name in enumerate(categories)}


def unconfirmed_classes(coverage: dict[str, dict[str, int]]) -> list[str]:
    """Classes no box of which was confirmed: none agreed by both sources, none admitted."""
    return [name for name, sets in coverage.items() if sets["consistent"] + sets["admitted"] == 0]


def coverage_warning(classes: Sequence[str], fusion: str) -> str:
    """One line under Table 1 when some classes were never confirmed ('' when all were)."""
    if not classes:
        return ""
    hint = " (try train.distill.fusion=ds, which estimates where each source is wrong)" if fusion != "ds" else ""
    return (f"Warning: no box of {', '.join(classes)} was confirmed by both sources during distillation, so the "
            f"consistent set never taught {'it' if len(classes) == 1 else 'them'}{hint}.")


def separation_summary(rows: list[dict], burn_up: int) -> dict:
    """Mean boxes per logged training batch in each set, before and after burn-up, and the
    share of matched pairs that are inconsistent; {} without separation metrics."""
    out = {}
    for phase, keep in (("before_burn_up", lambda s: s < burn_up), ("after_burn_up", lambda s: s >= burn_up)):
        part = [r for r in rows if "sep_consistent" in r and keep(r["step"])]
        if not part:
            continue
        means = {name: round(float(np.mean([r.get(f"sep_{name}", 0) for r in part])), 2) for name in SET_COLOURS}
        pairs = means["consistent"] + means["inconsistent"]
        out[phase] = {"logged_batches": len(part), "mean_boxes_per_batch": means,
                      "inconsistent_share_of_pairs": round(means["inconsistent"] / pairs, 3) if pairs else None}
    return out


def write_tensorboard(results: dict[str, EvalResult], report_uri: str, run: RunDir) -> None:
    """AP50 per method and category, mAP50 per method, and the report figures, under
    ``run.tensorboard_dir("evaluate")`` (beside the training stages' events)."""
    log = TensorBoardLog(run.tensorboard_dir("evaluate"), "evaluate")
    for method, res in results.items():
        log.add(0, {f"mAP50/{method}": res.map50,
                    **{f"AP50/{c}/{method}": v for c, v in res.ap50.items() if math.isfinite(v)}})
    for figure in ("losses", "ap_per_class", "separation", "detections"):
        uri = storage.join(report_uri, f"{figure}.png")
        if storage.exists(uri):
            log.add_png(figure, storage.read_bytes(uri))
    log.close()
