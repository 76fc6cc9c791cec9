"""Export the target detector for deployment, load it back, and check it against eager.

Formats: TorchScript, by ``torch.jit.trace`` of an inference-only wrapper, and ONNX
(``coin_ray.onnx_export``, written when the optional ``.[onnx]`` extra is installed). Why both:
- TorchScript keeps RoIAlign and NMS as torchvision ops and loads with ``torch.jit.load``
  in Python or C++ (libtorch + torchvision ops), no project code, no transformers; torch
  itself now calls TorchScript deprecated.
- ONNX (opset 17, RoIAlign and NonMaxSuppression are standard ops) runs in onnxruntime
  and most serving stacks, and takes any batch size in one file.
- ``torch.jit.script`` cannot compile transformers' CLIP layers; tracing records the ops.
  A trace is exact for one input size: torchvision's traced resize rounds some sizes one
  pixel differently from eager, and the per-image loops are unrolled. So the export has a
  deployment resolution (H, W) (the example image's size; a fixed camera's size in
  practice) and one module per batch size (1 and a batched one). ``ExportedDetector``
  resizes an image of another size to (H, W) and maps its boxes back, and pads a short
  last batch.
- Deployment prompts are fixed: the K+1 text embeddings (learned context + frozen text
  encoder) are computed once and stored as a constant classifier matrix, so neither the
  text encoder nor the prompt learner is in the file.

Equivalence (``check_equivalence``): on images at the deployment resolution, single and
batched, the exported model gives the same detections per image (count and labels) as
``OpenVocabularyRCNN.detect``, boxes within ``BOX_ATOL`` pixels and scores/probs within
``PROB_ATOL`` (measured: 0 on CPU, the same kernels run).

The ONNX check is the same comparison against eager with ``ONNX_BOX_ATOL`` and
``ONNX_PROB_ATOL`` (onnxruntime's kernels differ from torch's; measured ~1e-5).
Both exported models return outputs without autograd history.

Files under the export folder (local or s3://): ``detector_b{B}.pt`` per batch size,
``model.onnx`` and ``export.json`` (categories, batch sizes, tolerances, the measured
differences; under "onnx" its own entry, or why it was skipped).
"""

from __future__ import annotations

import io
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torchvision  # noqa: F401  (registers roi_align / nms for torch.jit.load)
from torch import nn

from coin_ray import onnx_export, storage
from coin_ray.data.images import load_image
from coin_ray.models.build import load_detector
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.models.roi_heads import postprocess_detections
from coin_ray.progress import ProgressLine
from coin_ray.train.data import image_tensor, resize_to

BOX_ATOL = 1e-2  # pixels
PROB_ATOL = 1e-4
DEFAULT_BATCH_SIZES = (1, 8)
# torch warns on every jit.save/load that TorchScript is deprecated; the docstring above
# says why it still ships (with model.onnx beside it).
JIT_DEPRECATION = r"`torch\.jit\.(save|load)` is deprecated"
NOTHING_COMPARED = "nothing compared: the eager model gives 0 detections"
NOISE = 0.05  # the check perturbs the example image with this much seeded noise per copy


class ExportMismatch(RuntimeError):
    """The exported model's detections differ from the eager model's beyond tolerance."""


class DeployedDetector(nn.Module):
    """The detection path of an ``OpenVocabularyRCNN`` with the text side folded in.

    forward(images: list of B (3,H_i,W_i) float in [0,1]) ->
        boxes (N,4) float xyxy pixels of the original images, labels (N,) int64 in [0,K),
        scores (N,), probs (N,K+1), counts (B,) int64: image i owns the next counts[i] rows.
    """

    def __init__(self, model: OpenVocabularyRCNN) -> None:
        super().__init__()
        self.transform = model.transform
        self.trunk = model.trunk
        self.rpn_norm = model.rpn_norm
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads
        with torch.no_grad():
            self.register_buffer("classifier", model.text_embeddings().detach().clone())  # (K+1, D)
        self.score_threshold = float(model.model_cfg.score_threshold)
        self.detections_per_image = int(model.model_cfg.detections_per_image)

    def _fixed_count(self, proposals: torch.Tensor) -> torch.Tensor:
        """(R_i,4) -> (R,4), R the RPN's test-time maximum, padded with copies of row 0.

        The postprocessing splits regions by ``len(proposals[i])``, a Python int that a
        trace freezes; a constant count keeps it right. A copy of a proposal yields a copy
        of its detection, which NMS (IoU 1) removes, so the output is unchanged. An image
        with no proposal is padded with empty boxes, which the size filter removes.
        """
        r = self.rpn.post_nms_top_n()
        empty = proposals.new_zeros(r, 4)
        return torch.cat([proposals, proposals[:1].repeat(r, 1), empty])[:r]

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _ = self.transform(images)
        features = self.trunk(image_list.tensors)
        normed = self.rpn_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        proposals, _ = self.rpn(image_list, OrderedDict([("0", normed)]))
        proposals = [self._fixed_count(p) for p in proposals]
        outputs = self.roi_heads(features, proposals, self.classifier, image_list.tensors)
        results = postprocess_detections(outputs, proposals, image_list.image_sizes, self.roi_heads.box_coder,
                                         score_threshold=self.score_threshold,
                                         detections_per_image=self.detections_per_image)
        results = self.transform.postprocess(results, image_list.image_sizes, original_sizes)
        counts = torch.stack([torch.ones_like(r["labels"]).sum() for r in results])
        return (torch.cat([r["boxes"] for r in results]), torch.cat([r["labels"] for r in results]),
                torch.cat([r["scores"] for r in results]), torch.cat([r["probs"] for r in results]), counts)


def trace(model: OpenVocabularyRCNN, examples: list[torch.Tensor]) -> torch.jit.ScriptModule:
    """Trace ``DeployedDetector(model)`` on ``examples`` (their count is the batch size)."""
    # No parameter needs a gradient in deployment: outputs then carry no autograd history.
    wrapper = DeployedDetector(model.eval()).eval().requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int it meets in torchvision's resize code;
        # check_equivalence is the real test of what it recorded.
        warnings.simplefilter("ignore")
        return torch.jit.trace(wrapper, (examples,), check_trace=False, strict=False)


def split_outputs(outputs: tuple[torch.Tensor, ...], n: int) -> list[dict[str, torch.Tensor]]:
    """The flat (boxes, labels, scores, probs, counts) of a traced call as per-image dicts
    like ``OpenVocabularyRCNN.detect``; only the first ``n`` images are kept (padding)."""
    boxes, labels, scores, probs, counts = outputs
    sizes = [int(c) for c in counts]
    parts = [t.split(sizes) for t in (boxes, labels, scores, probs)]
    return [{"boxes": b, "labels": lab, "scores": s, "probs": p} for b, lab, s, p in zip(*parts)][:n]


@dataclass
class ExportedDetector:
    """Loaded TorchScript modules keyed by batch size, the class names, the input size."""

    modules: dict[int, torch.jit.ScriptModule]
    categories: list[str]
    input_size: tuple[int, int]  # (H, W) the modules were traced at

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Same contract as ``OpenVocabularyRCNN.detect``: images (3,H,W) float in [0,1] ->
        per image {"boxes" (N,4) xyxy original pixels, "labels", "scores", "probs" (N,K+1)}.

        Images of another size are resized to ``input_size`` and their boxes mapped back.
        Uses the largest traced batch size that the remaining images fill, else the
        smallest one padded with copies of the last image (their outputs are dropped).
        """
        resized = [resize_to(img, self.input_size) for img in images]
        out: list[dict[str, torch.Tensor]] = []
        sizes = sorted(self.modules, reverse=True)
        i = 0
        while i < len(resized):
            size = next((s for s in sizes if s <= len(resized) - i), sizes[-1])
            chunk = [img for img, _ in resized[i:i + size]]
            n = len(chunk)
            chunk += [chunk[-1]] * (size - n)
            out += split_outputs(self.modules[size](chunk), n)
            i += n
        for det, (_, factors) in zip(out, resized):
            det["boxes"] = det["boxes"] * factors
        return out


def _save_module(module: torch.jit.ScriptModule, uri: str) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=FutureWarning)
        torch.jit.save(module, buf)
    storage.write_bytes(uri, buf.getvalue())


RUNTIMES = ("torchscript", "onnx")


def load_exported(export_uri: str, map_location: str = "cpu", runtime: str = "torchscript",
                  num_threads: int = 1):
    """Load an export folder (local or s3://) written by ``export_detector``.

    ``runtime`` "torchscript" gives an ``ExportedDetector``, "onnx" an
    ``onnx_export.OnnxDetector`` (needs the ``.[onnx]`` extra); both have ``detect``,
    ``categories`` and ``input_size``.
    """
    meta = json.loads(storage.read_text(storage.join(export_uri, "export.json")))
    if runtime == "onnx":
        if "file" not in meta.get("onnx", {}):
            raise FileNotFoundError(f"{export_uri} has no ONNX model: "
                                    f"{meta.get('onnx', {}).get('skipped', 'exported before ONNX support')}")
        blob = storage.read_bytes(storage.join(export_uri, onnx_export.ONNX_FILE))
        return onnx_export.OnnxDetector(blob, meta["categories"],
                                        tuple(meta["input_size"]), max(meta["batch_sizes"]), num_threads)
    if runtime != "torchscript":
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    modules = {}
    for b in meta["batch_sizes"]:
        blob = storage.read_bytes(storage.join(export_uri, f"detector_b{b}.pt"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=FutureWarning)
            modules[int(b)] = torch.jit.load(io.BytesIO(blob), map_location=map_location).eval()
    return ExportedDetector(modules, list(meta["categories"]), tuple(meta["input_size"]))


def check_equivalence(model: OpenVocabularyRCNN, exported, images: list[torch.Tensor], *,
                      box_atol: float = BOX_ATOL, prob_atol: float = PROB_ATOL) -> dict[str, float]:
    """Compare exported (anything with ``detect``) and eager detections on ``images``;
    raise ExportMismatch when a detection has no counterpart, or values differ beyond the tolerances.

    Detections are paired per image regardless of order (same label, nearest box): two
    detections whose scores tie to float precision may come out in either order, and one
    whose score ties the last kept one (the per-image cap) may be either one; only those
    may go unpaired.

    Returns the largest differences seen: {"max_box_diff" (pixels), "max_prob_diff",
    "images", "detections", "status"}. ``status`` is "passed", or says that nothing was
    compared when the eager model detects nothing on ``images`` (0 differences of nothing
    prove nothing: a detector trained on almost no boxes does that).
    """
    eager = model.eval().detect(images)
    traced = exported.detect(images)
    box_diff, prob_diff, total = 0.0, 0.0, 0
    for i, (e, t) in enumerate(zip(eager, traced)):
        pairs, unpaired = pair_detections(e, t)
        if unpaired:
            raise ExportMismatch(f"image {i}: eager gives {len(e['boxes'])} detections, exported "
                                 f"{len(t['boxes'])}; {unpaired} without a counterpart of the same label")
        for a, b in pairs:
            box_diff = max(box_diff, float((e["boxes"][a] - t["boxes"][b]).abs().max()))
            prob_diff = max(prob_diff, float((e["probs"][a] - t["probs"][b]).abs().max()),
                            float((e["scores"][a] - t["scores"][b]).abs()))
        total += len(e["boxes"])
    if box_diff > box_atol or prob_diff > prob_atol:
        raise ExportMismatch(f"exported model differs from eager: boxes by {box_diff:.3g} px "
                             f"(allowed {box_atol}), probs by {prob_diff:.3g} (allowed {prob_atol})")
    status = "passed" if total else f"{NOTHING_COMPARED} on {len(images)} images: the export is not checked"
    return {"max_box_diff": box_diff, "max_prob_diff": prob_diff, "images": len(images), "detections": total,
            "status": status}


def pair_detections(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tie: float = PROB_ATOL
                    ) -> tuple[list[tuple[int, int]], int]:
    """Pair two detectors' detections of one image: (pairs of indices, count left unpaired).

    Each detection of ``a``, in the order given (detectors list them by decreasing score),
    takes the unpaired detection of ``b`` with its label and the nearest box (max abs
    difference, pixels). A detection left over counts as unpaired
    unless its score is within ``tie`` of the lowest score of its list (a tie at the cap).
    """
    pairs, used = [], torch.zeros(len(b["boxes"]), dtype=torch.bool)
    left_a = []
    for i in range(len(a["boxes"])):
        free = (~used) & (b["labels"] == a["labels"][i])
        if not free.any():
            left_a.append(i)
            continue
        diff = (b["boxes"] - a["boxes"][i]).abs().amax(dim=1).masked_fill(~free, float("inf"))
        j = int(diff.argmin())
        used[j] = True
        pairs.append((i, j))
    left_b = torch.nonzero(~used).flatten().tolist()

    def not_a_tie(d: dict[str, torch.Tensor], rows: list[int]) -> int:
        floor = float(d["scores"].min()) if len(d["scores"]) else 0.0
        return sum(float(d["scores"][r]) > floor + tie for r in rows)

    return pairs, not_a_tie(a, left_a) + not_a_tie(b, left_b)


def check_images(example: torch.Tensor, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` variants of ``example`` (3,H,W) float in [0,1] at its size: seeded noise,
    every other one mirrored, so that detections (and their counts) differ per image."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        img = example.flip(-1) if i % 2 else example
        out.append((img + NOISE * torch.randn(img.shape, generator=gen)).clamp(0, 1))
    return out


CHECK_IMAGES_MAX = 16  # val images the export stage compares on (a few seconds of eager inference)


def export_detector(model_uri: str, out_uri: str, *, example_uri: str | None = None,
                    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, check_uris: list[str] | None = None,
                    with_onnx: bool = True) -> dict:
    """Export the detector in ``model_uri`` (a model.pt) to ``out_uri`` and check it.

    ``example_uri`` is an image used to trace; its size becomes the deployment resolution
    (a grey 120x160 image when None). The check compares both exports with eager on
    ``check_uris`` (the run's val images; at most ``CHECK_IMAGES_MAX``), or on noisy
    variants of the example when None. ``model.onnx`` is written when ``with_onnx`` and
    the ``.[onnx]`` extra is installed; otherwise export.json says why not.
    Returns what ``export.json`` holds (also the manifest entry of the export stage).
    Raises ExportMismatch when an exported model disagrees with the eager one.
    """

    model = load_detector(model_uri).eval()
    example = image_tensor(load_image(example_uri)) if example_uri else torch.full((3, 120, 160), 0.5)
    size = tuple(example.shape[-2:])
    batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    progress = ProgressLine("export", len(batch_sizes) + 2, unit="part")  # traces, ONNX, check
    modules = {}
    for b in batch_sizes:
        modules[b] = trace(model, check_images(example, b, seed=b))
        _save_module(modules[b], storage.join(out_uri, f"detector_b{b}.pt"))
        progress.update(len(modules), extra=f"TorchScript batch {b}")
    meta = {"format": "torchscript", "categories": model.categories, "batch_sizes": list(batch_sizes),
            "input_size": list(size),
            "input": "list of exactly B (3,H,W) float32 RGB in [0,1] at input_size",
            "output": "boxes (N,4) xyxy original pixels, labels (N,) in [0,K), scores (N,), "
                      "probs (N,K+1), counts (B,)",
            "tolerance": {"box_px": BOX_ATOL, "prob": PROB_ATOL}, "torch": torch.__version__}
    meta["onnx"] = _export_onnx(model, example, out_uri) if with_onnx else {"skipped": "with_onnx=False"}
    progress.update(len(modules) + 1, extra="ONNX" if "file" in meta["onnx"] else "ONNX skipped")
    storage.write_text(storage.join(out_uri, "export.json"), json.dumps(meta, indent=2))
    images = _check_set(example, size, check_uris, max(batch_sizes) + 3)
    meta["check"] = check_equivalence(model, load_exported(out_uri), images)
    if "file" in meta["onnx"]:
        meta["onnx"]["check"] = check_equivalence(model, load_exported(out_uri, runtime="onnx"), images,
                                                  box_atol=onnx_export.ONNX_BOX_ATOL,
                                                  prob_atol=onnx_export.ONNX_PROB_ATOL)
    progress.update(len(modules) + 2, extra=f"checked against eager on {len(images)} images")
    storage.write_text(storage.join(out_uri, "export.json"), json.dumps(meta, indent=2))
    if meta["check"]["status"] != "passed":
        print(f"[coin-ray] warning: export check: {meta['check']['status']} "
              f"(see {storage.join(out_uri, 'export.json')})", flush=True)
    return meta


def _check_set(example: torch.Tensor, size: tuple[int, int], uris: list[str] | None, count: int
               ) -> list[torch.Tensor]:
    """The check's images at the deployment size: ``uris`` (resized when needed) or variants."""
    if not uris:
        return check_images(example, count, seed=99)
    return [resize_to(image_tensor(load_image(u)), size)[0] for u in uris[:CHECK_IMAGES_MAX]]


def _export_onnx(model: OpenVocabularyRCNN, example: torch.Tensor, out_uri: str) -> dict:
    """Write ``model.onnx``; its export.json entry (or {"skipped": why})."""
    missing = onnx_export.onnx_available()
    if missing:
        return {"skipped": missing}
    blob = onnx_export.to_onnx(model, tuple(example.shape[-2:]), torch.stack(check_images(example, 2, seed=2)))
    storage.write_bytes(storage.join(out_uri, onnx_export.ONNX_FILE), blob)
    import onnxruntime

    return {"file": onnx_export.ONNX_FILE, "opset": onnx_export.OPSET, "onnxruntime": onnxruntime.__version__,
            "input": "images (B,3,H,W) float32 RGB in [0,1] at input_size, any B",
            "output": "boxes (N,4) xyxy input pixels, labels (N,) int64 in [0,K), scores (N,), "
                      "probs (N,K+1), batch_index (N,) int64",
            "tolerance": {"box_px": onnx_export.ONNX_BOX_ATOL, "prob": onnx_export.ONNX_PROB_ATOL}}
