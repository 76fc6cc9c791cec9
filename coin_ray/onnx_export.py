"""ONNX export of the target detector, with a dynamic batch, and its onnxruntime runner.

Why a second wrapper beside ``export.DeployedDetector``: torchvision's RPN and our
postprocessing loop over the images of a batch in Python, so a trace records one copy of
the loop body per image and the batch size is frozen. ``BatchedDetector`` computes the
same detections with batch-wide tensor ops instead (one anchor grid broadcast to every
image, top-k along the batch dimension, one NMS call whose groups are (image, label)), so
the ONNX graph takes any batch size B.

Shapes (B images at the deployment resolution H x W, K categories):

    input   images (B,3,H,W) float32 RGB in [0,1]
    output  boxes (N,4) xyxy pixels of the input images, labels (N,) int64 in [0,K),
            scores (N,), probs (N,K+1), batch_index (N,) int64: the image each row belongs to;
            rows are grouped by image (ascending) and by score (descending) within an image.

``onnx`` and ``onnxruntime`` are an optional extra (``pip install -e .[onnx]``); this
module imports them only where needed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, clip_boxes_to_image, roi_align

from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.models.roi_heads import MAX_LOGIT_SCALE, MIN_BOX_SIZE, NMS_THRESHOLD
from coin_ray.train.data import resize_to

OPSET = 17
OUTPUT_NAMES = ("boxes", "labels", "scores", "probs", "batch_index")
RPN_MIN_BOX_SIZE = 1e-3  # torchvision RegionProposalNetwork.min_size


class BatchedDetector(nn.Module):
    """``OpenVocabularyRCNN.detect`` for a (B,3,H,W) batch at one fixed (H,W), loop-free.

    The resize and padding, the anchors and the box scale are constants of (H,W), taken
    from the model's own transform at construction; the K+1 text embeddings are folded
    into a constant classifier as in the TorchScript export.
    """

    def __init__(self, model: OpenVocabularyRCNN, input_size: tuple[int, int]) -> None:
        super().__init__()
        model = model.eval()
        self.trunk, self.rpn_norm, self.rpn, self.roi_heads = model.trunk, model.rpn_norm, model.rpn, model.roi_heads
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1))
        with torch.no_grad():
            image_list, _ = t([torch.zeros(3, *input_size)])
            features = self.trunk(image_list.tensors)
            anchors = self.rpn.anchor_generator(image_list, [features])[0]
            self.register_buffer("classifier", model.text_embeddings().detach().clone())  # (K+1, D)
        self.resized = tuple(int(s) for s in image_list.image_sizes[0])  # (h, w) before padding
        self.padded = tuple(int(s) for s in image_list.tensors.shape[-2:])
        self.register_buffer("anchors", anchors)  # (A,4) resized-image pixels
        scale = [input_size[1] / self.resized[1], input_size[0] / self.resized[0]] * 2
        self.register_buffer("box_scale", torch.tensor(scale))  # resized -> input pixels
        self.score_threshold = float(model.model_cfg.score_threshold)
        self.detections_per_image = int(model.model_cfg.detections_per_image)
        self.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> normalised, resized as the transform does, zero-padded."""
        x = (images - self.mean) / self.std
        x = F.interpolate(x, size=self.resized, mode="bilinear", align_corners=False)
        return F.pad(x, (0, self.padded[1] - self.resized[1], 0, self.padded[0] - self.resized[0]))

    def proposals(self, features: torch.Tensor) -> torch.Tensor:
        """RPN proposals (B,R,4) resized-image pixels, R the RPN's test-time maximum.

        As torchvision: top pre-NMS scores per image, clip, drop tiny boxes, NMS, keep the
        best R. An image with fewer than R survivors gets copies of its best proposal,
        which yield copies of one detection that the final NMS (IoU 1) removes.
        """
        normed = self.rpn_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        objectness, deltas = self.rpn.head([normed])
        b = features.shape[0]
        objectness = objectness[0].permute(0, 2, 3, 1).reshape(b, -1)  # (B,A) anchor order
        a = self.anchors.shape[0]
        deltas = _deltas_per_anchor(deltas[0], b)
        boxes = self.rpn.box_coder.decode_single(deltas.reshape(-1, 4), self.anchors.repeat(b, 1)).view(b, -1, 4)
        top = min(self.rpn.pre_nms_top_n(), a)
        scores, index = objectness.topk(top, dim=1)
        boxes = clip_boxes_to_image(boxes.gather(1, index[..., None].expand(-1, -1, 4)), self.resized)
        scores = torch.sigmoid(scores)
        sizes = boxes[..., 2:] - boxes[..., :2]
        valid = ((sizes >= RPN_MIN_BOX_SIZE).all(-1) & (scores >= self.rpn.score_thresh)).flatten()
        image = torch.arange(b, device=boxes.device)[:, None].expand(b, top).flatten()
        rows = torch.nonzero(valid).flatten()
        kept = rows[batched_nms(boxes.view(-1, 4)[rows], scores.flatten()[rows], image[rows], self.rpn.nms_thresh)]
        ranked = torch.full((b * top,), -1.0, device=boxes.device).scatter(0, kept, scores.flatten()[kept])
        best, order = ranked.view(b, top).topk(min(self.rpn.post_nms_top_n(), top), dim=1)
        chosen = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        fallback = torch.where(best[:, :1, None] >= 0, chosen[:, :1], torch.zeros_like(chosen[:, :1]))
        return torch.where(best[..., None] >= 0, chosen, fallback)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = self.preprocess(images)
        features = self.trunk(pixels)
        proposals = self.proposals(features)  # (B,R,4)
        b, r = proposals.shape[:2]
        image = torch.arange(b, device=images.device)[:, None].expand(b, r).flatten()
        rois = torch.cat([image[:, None].to(proposals.dtype), proposals.reshape(-1, 4)], dim=1)
        heads = self.roi_heads
        tokens = roi_align(features, rois, output_size=heads.roi_size, spatial_scale=1.0 / heads.stride,
                           sampling_ratio=1, aligned=True).flatten(2).transpose(1, 2)
        box_features, embeddings = heads.embed(tokens, pixels, rois)
        scale = heads.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * F.normalize(embeddings, dim=-1) @ self.classifier.t()
        probs = F.softmax(logits, dim=-1)
        boxes = heads.box_coder.decode_single(heads.box_predictor(box_features), proposals.reshape(-1, 4))
        return self.select(clip_boxes_to_image(boxes.reshape(-1, 4), self.resized), probs, image)

    def select(self, boxes: torch.Tensor, probs: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One candidate per (box, class) above the score threshold (as ``postprocess_detections``),
        size filter, NMS per (image, label), the best per image; sorted."""
        above = torch.nonzero(probs[:, :-1] > self.score_threshold)  # (M, 2): box row, label
        rows, labels = above[:, 0], above[:, 1]
        scores = probs[rows, labels]
        sizes = boxes[rows, 2:] - boxes[rows, :2]
        keep = torch.nonzero((sizes >= MIN_BOX_SIZE).all(-1)).flatten()
        groups = image[rows[keep]] * probs.shape[1] + labels[keep]
        keep = keep[batched_nms(boxes[rows[keep]], scores[keep], groups, NMS_THRESHOLD)]
        # Image-major, score-descending order: scores lie in [0,1], so one key sorts both.
        keep = keep[torch.argsort(image[rows[keep]].to(scores.dtype) * 2.0 + (1.0 - scores[keep]))]
        img = image[rows[keep]]
        first = (img[None, :] < img[:, None]).sum(dim=1)  # rows of earlier images
        keep = keep[(torch.arange(keep.shape[0], device=keep.device) - first) < self.detections_per_image]
        box = rows[keep]
        return boxes[box] * self.box_scale, labels[keep], scores[keep], probs[box], image[box]


def _deltas_per_anchor(deltas: torch.Tensor, b: int) -> torch.Tensor:
    """RPN head deltas (B,A*4,h,w) -> (B,h*w*A,4) in the anchor generator's order."""
    _, c, h, w = deltas.shape
    return deltas.view(b, c // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)


ONNX_FILE = "model.onnx"
ONNX_BOX_ATOL = 1e-2  # pixels; measured ~1e-5 on CPU (different kernels than torch's)
ONNX_PROB_ATOL = 1e-4
ONNX_CHECK_BATCH = 4  # images per onnxruntime call in the check (any batch size works)


def onnx_available() -> str:
    """"" when ``onnx`` and ``onnxruntime`` import, else why not (for export.json)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install -e '.[onnx]')"
    return ""


def to_onnx(model: OpenVocabularyRCNN, input_size: tuple[int, int], example: torch.Tensor) -> bytes:
    """The serialized ONNX model of ``BatchedDetector(model, input_size)`` (batch axis dynamic).

    ``example`` (B,3,H,W) is only used to trace; B does not become a constant.
    """
    wrapper = BatchedDetector(model, input_size).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about each Python int it meets (sizes, loop bounds); the parity
        # check of the written file is the real test of what it recorded.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"images": {0: "batch"}, **{n: {0: "detections"} for n in OUTPUT_NAMES}})
    return buf.getvalue()


class OnnxDetector:
    """An onnxruntime session over ``model.onnx``, with ``OpenVocabularyRCNN.detect``'s contract."""

    def __init__(self, blob: bytes, categories: list[str], input_size: tuple[int, int],
                 batch_size: int = 8, num_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, num_threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its shape-inference notes are not for users
        self.session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        self.categories, self.input_size, self.batch_size = list(categories), tuple(input_size), batch_size

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """(B,3,H,W) float32 in [0,1] at ``input_size`` -> the five flat outputs (numpy)."""
        return self.session.run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)})

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """images (3,H,W) float in [0,1] -> per image {"boxes" (N,4) xyxy original pixels,
        "labels", "scores", "probs" (N,K+1)}; other sizes are resized to ``input_size``."""
        resized = [resize_to(img, self.input_size) for img in images]
        out: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(resized), self.batch_size):
            chunk = resized[i:i + self.batch_size]
            boxes, labels, scores, probs, index = self.run(torch.stack([img for img, _ in chunk]).numpy())
            for j, (_, factors) in enumerate(chunk):
                rows = index == j
                out.append({"boxes": torch.from_numpy(boxes[rows]) * factors,
                            "labels": torch.from_numpy(labels[rows]), "scores": torch.from_numpy(scores[rows]),
                            "probs": torch.from_numpy(probs[rows])})
        return out
