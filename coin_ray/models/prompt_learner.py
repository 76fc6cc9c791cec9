"""Learnable prompts (CoOp style) on a frozen CLIP text encoder.

Each class prompt is the token sequence

    [BOS] c_1 .. c_n  x_1 .. x_M  <class name tokens> "." [EOS]

where c_1..c_n start as the token embeddings of ``context_init`` ("a photo of a"), x_1..x_M
are M extra learnable vectors (small random init), and the class name may be several words
("traffic light"). The context is shared by all classes. The encoder is CLIP's own text
transformer, run on embeddings instead of ids, and stays frozen: gradients reach only the
context and the learnable background embedding.

Shapes (K classes, W the text width, D the joint width):
    forward() -> (K+1, D) L2-normalised text embeddings t; row K is background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

BACKGROUND_TEXT = "background"
EXTRA_CONTEXT_STD = 0.02  # the CoOp init scale for context vectors without a word


def prompt_texts(name: str, templates: list[str], style: str = "") -> list[str]:
    """The prompt ensemble for one class: each template filled with the name, plus the style.

    >>> prompt_texts("car", ["a photo of a {}."], "foggy street scene")
    ['a photo of a car, foggy street scene.']
    """
    texts = []
    for template in templates:
        text = template.format(name)
        if style:
            text = f"{text.rstrip('.')}, {style}."
        texts.append(text)
    return texts


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, L, L) additive mask: CLIP's text encoder only looks left."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]


def encode_text_embeddings(text: nn.Module, projection: nn.Module, token_embeds: torch.Tensor,
                           eos_index: torch.Tensor) -> torch.Tensor:
    """Run CLIP's text transformer on token embeddings (N,L,W); pool at ``eos_index`` (N,).

    Args:
        text: ``clip.text_model``; projection: ``clip.text_projection``.
    Returns:
        (N, D) joint-space text features, not normalised.
    """
    length = token_embeds.shape[1]
    x = token_embeds + text.embeddings.position_embedding.weight[:length]
    x = text.encoder(inputs_embeds=x, attention_mask=_causal_mask(length, x.dtype, x.device))
    x = text.final_layer_norm(x.last_hidden_state)
    pooled = x[torch.arange(len(x), device=x.device), eos_index]
    return projection(pooled)


@torch.no_grad()
def encode_texts(clip: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    """Plain CLIP text features of ``texts``: (N, D) L2-normalised, float32."""
    ids = [[tokenizer.bos_token_id, *_word_ids(tokenizer, t), tokenizer.eos_token_id] for t in texts]
    tokens, eos = _pad(ids, tokenizer.pad_token_id)
    embeds = clip.text_model.embeddings.token_embedding(tokens)
    features = encode_text_embeddings(clip.text_model, clip.text_projection, embeds, eos)
    return F.normalize(features.float(), dim=-1)


def _word_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: (N, L) int64 and the EOS (last real token) index (N,)."""
    length = max(len(i) for i in ids)
    tokens = torch.full((len(ids), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, torch.tensor([len(seq) - 1 for seq in ids], dtype=torch.long)


class PromptLearner(nn.Module):
    """Learnable context + background embedding over a frozen CLIP text encoder.

    Args:
        clip: the CLIP model; its text tower and text projection are kept (frozen).
        tokenizer: CLIP's tokenizer.
        class_names: the K category names (multi-word names are fine).
        context_init: words whose token embeddings initialise the context.
        num_extra_context: M extra context vectors after those words.
        seed: seeds the extra context init.
    """

    def __init__(self, clip: CLIPModel, tokenizer, class_names: list[str], *,
                 context_init: str = "a photo of a", num_extra_context: int = 4, seed: int = 0) -> None:
        super().__init__()
        # Frozen: gradients pass through these modules to the context, never into them.
        self.text_model = clip.text_model.requires_grad_(False)
        self.text_projection = clip.text_projection.requires_grad_(False)
        embed = clip.text_model.embeddings.token_embedding
        init_ids = torch.tensor(_word_ids(tokenizer, context_init) if context_init else [], dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        extra = torch.randn(num_extra_context, embed.embedding_dim, generator=generator) * EXTRA_CONTEXT_STD
        with torch.no_grad():
            words = embed(init_ids).float()
        self.context = nn.Parameter(torch.cat([words, extra.to(words.dtype)]))  # (n_ctx, W)
        n_ctx = len(self.context)
        # Context positions hold the pad id as a placeholder; their embeddings are replaced.
        ids = [[tokenizer.bos_token_id, *[tokenizer.pad_token_id] * n_ctx,
                *_word_ids(tokenizer, f"{name}."), tokenizer.eos_token_id] for name in class_names]
        tokens, eos = _pad(ids, tokenizer.pad_token_id)
        self.register_buffer("token_ids", tokens, persistent=False)  # (K, L)
        self.register_buffer("eos_index", eos, persistent=False)  # (K,)
        background = encode_texts(clip, tokenizer, [BACKGROUND_TEXT])[0]
        self.background = nn.Parameter(background)  # (D,)

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.shape[0])

    def forward(self) -> torch.Tensor:
        """(K+1, D) L2-normalised text embeddings t; row K is the background embedding."""
        with torch.no_grad():
            words = self.text_model.embeddings.token_embedding(self.token_ids)  # (K, L, W)
        n_ctx = len(self.context)
        context = self.context.to(words.dtype).expand(self.num_classes, -1, -1)
        embeds = torch.cat([words[:, :1], context, words[:, 1 + n_ctx:]], dim=1)
        classes = encode_text_embeddings(self.text_model, self.text_projection, embeds, self.eos_index)
        t = torch.cat([classes, self.background.to(classes.dtype)[None]], dim=0)
        return F.normalize(t, dim=-1)

