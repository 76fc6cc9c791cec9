"""The hf backend with tiny randomly initialised Grounding DINO and OWLv2 (save_pretrained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_world import draw, png_bytes
from coin_ray.cloud.hf import HfBackend, prompt_spans
from coin_ray.cloud.http_backend import HttpBackend
from coin_ray.models.clip_factory import build_tokenizer
from coin_ray.serve import start_server

WORDS = ["car", "bus", "traffic", "light"]


def write_tiny_grounding_dino(out) -> str:
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SwinConfig)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"))
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=2,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=10, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    processor.save_pretrained(out)
    return str(out)


def write_tiny_owlv2(out) -> str:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor
    tok = build_tokenizer(WORDS)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=64, patch_size=16)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision,
                                        projection_dim=32)).save_pretrained(out)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tok).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def gd_path(tmp_path_factory):
    return write_tiny_grounding_dino(tmp_path_factory.mktemp("gd"))


@pytest.fixture(scope="module", params=["grounding-dino", "owlv2"])
def tiny(request, tmp_path_factory):
    if request.param == "grounding-dino":
        return request.param, request.getfixturevalue("gd_path")
    return request.param, write_tiny_owlv2(tmp_path_factory.mktemp("owl"))


def test_hf_tiny_detects_in_pixels_with_prompt_names(tiny):
    kind, path = tiny
    backend = HfBackend(path, threshold=0.0)
    assert backend.kind == kind
    image, _ = draw(0, size=(40, 70))
    prompts = ["Car", "traffic light"]
    answer = backend.detect(png_bytes(image), image, prompts)
    n = len(answer.boxes)
    assert n > 0 and answer.boxes.shape == (n, 4) and len(answer.phrases) == len(answer.scores) == n
    assert set(answer.phrases) <= {"car", "traffic light"}
    assert (answer.scores >= 0).all() and (answer.scores <= 1).all()
    assert (answer.boxes[:, [0, 2]] <= 70 + 1e-3).all() and (answer.boxes[:, [1, 3]] <= 40 + 1e-3).all()
    again = backend.detect(png_bytes(image), image, prompts)
    np.testing.assert_allclose(again.boxes, answer.boxes)  # eval mode: deterministic
    assert len(HfBackend(path, threshold=1.01).detect(b"", image, prompts).boxes) == 0


def test_hf_served_over_http_matches_direct(tiny):
    _, path = tiny
    backend = HfBackend(path, threshold=0.0)
    server = start_server(backend)
    try:
        image, _ = draw(1)
        direct = backend.detect(png_bytes(image), image, ["car", "bus"])
        remote = HttpBackend(server.url, threshold=0.0).detect(png_bytes(image), image, ["car", "bus"])
    finally:
        server.stop()
    np.testing.assert_allclose(remote.boxes, direct.boxes, atol=1e-4)
    assert remote.phrases == direct.phrases


def test_prompt_spans_skip_separators_and_special_tokens(gd_path):
    from transformers import AutoProcessor
    tokenizer = AutoProcessor.from_pretrained(gd_path).tokenizer
    ids = tokenizer("car. traffic light. bus.")["input_ids"]
    assert prompt_spans(ids, tokenizer) == [(1, 2), (3, 5), (6, 7)]
