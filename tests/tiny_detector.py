"""An untrained CLIP detector on the tiny world whose score threshold splits its detections."""

from __future__ import annotations

import torch

from coin_ray.config import ModelConfig
from coin_ray.data.images import load_image
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.train.data import image_tensor


def detector_with_wide_gap_threshold(clip_dir: str, categories: list[str], uris: list[str]) -> OpenVocabularyRCNN:
    """The detector (at most 100 detections per image) with its threshold in the widest gap
    between its own middle scores on ``uris``.

    An untrained head spreads probability over K+1 classes, so its scores crowd together: in
    the widest gap around the median, a varying number of boxes survives per image and no
    score sits within ONNX's numerical noise of the threshold. The scores are the returned
    detector's own (its weights are the probe's): the RPN's initialisation draws from torch's
    global generator, so a second ``from_clip`` would score differently.
    """
    probe = OpenVocabularyRCNN.from_clip(clip_dir, categories, ModelConfig(score_threshold=0.0,
                                                                           detections_per_image=100), seed=0)
    scores = torch.cat([d["scores"] for d in probe.eval().detect([image_tensor(load_image(u)) for u in uris])])
    ranked = scores.sort().values[len(scores) // 4: 3 * len(scores) // 4]
    gap = int((ranked[1:] - ranked[:-1]).argmax())
    cfg = ModelConfig(score_threshold=float(ranked[gap] + ranked[gap + 1]) / 2, detections_per_image=100)
    detector = OpenVocabularyRCNN.from_clip(clip_dir, categories, cfg, seed=0)
    detector.load_state_dict(probe.state_dict())
    return detector
