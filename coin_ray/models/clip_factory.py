"""Build small ``CLIPModel`` checkpoints from scratch (no hub access needed).

Used by tests (tiny random CLIPs) and by the Foggy-Shapes stand-in CLIP (trained after
creation). The result is saved with ``save_pretrained`` (model, tokenizer, processor) and
must then be loaded only through the code path that loads real CLIP checkpoints.

The tokenizer is a real byte-level BPE ``CLIPTokenizer`` whose vocabulary holds every
byte (so any text tokenizes) plus whole-word merges for the given words.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:  # unprintable bytes are shifted past 255, as byte-level BPE does
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer; each of ``words`` (lower-case) becomes one token."""
    byte_chars = byte_alphabet()
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words if w}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def write_clip(out_dir: str | Path, words: list[str], *, image_size: int = 64, patch_size: int = 8,
               hidden_size: int = 64, projection_dim: int = 64, num_layers: int = 2,
               num_heads: int = 4, seed: int = 0) -> Path:
    """Create a randomly initialised CLIP (model + tokenizer + processor) in ``out_dir``.

    Args:
        words: vocabulary words that get their own token (category names, prompt words).
        image_size: the vision tower's native input side in pixels.
    Returns:
        ``out_dir`` as a Path, loadable with ``CLIPModel.from_pretrained``.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(words)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 4,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
