"""ToyWorld's text encoder: a small transformers `CLIPTextModel`, pre-trained then frozen.

Pre-training (as SD inherits a trained CLIP): from the final-normed EOS feature, predict the
caption's shape, colour and background (each or "unmentioned") and which vocabulary words it
contains. The attribute heads make synonyms land near each other; the bag-of-words head keeps
different wordings distinguishable, as real CLIP features are, so that paraphrase attacks on an
erased model measure something.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..tokenizer import WordTokenizer
from . import world

WIDTH, LAYERS, MLP = 128, 3, 512
WINDOW = 20  # BOS + 18 words + EOS: the longest caption has 10 words


def text_config(vocab_size: int):
    """Head width 64, quick_gelu and eps 1e-5: what `models.text_encoders.build_text_model` rebuilds."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=WIDTH // 64, max_position_embeddings=WINDOW, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def new_text_model(tokenizer: WordTokenizer, seed: int):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(text_config(len(tokenizer.vocab)))


def features(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token features fed to cross-attention: last layer, final layer norm (SD1's convention)."""
    return model(input_ids=ids).last_hidden_state


def encode(model, tokenizer: WordTokenizer, prompts: list[str]) -> torch.Tensor:
    ids = torch.tensor([tokenizer(p).ids for p in prompts])
    return features(model, ids)


class AttributeHeads(nn.Module):
    """Pre-training heads on the EOS feature; discarded after pre-training."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.shape = nn.Linear(WIDTH, len(world.SHAPES) + 1)
        self.colour = nn.Linear(WIDTH, len(world.COLOURS) + 1)
        self.background = nn.Linear(WIDTH, len(world.BACKGROUNDS) + 1)
        self.words = nn.Linear(WIDTH, vocab_size)


def _labels(captions: list[str], tokenizer: WordTokenizer):
    def index(values, value):
        return len(values) if value is None else values.index(value)

    parsed = [world.parse(c) for c in captions]
    shape = torch.tensor([index(world.SHAPES, p["shape"]) for p in parsed])
    colour = torch.tensor([index(world.COLOURS, p["colour"]) for p in parsed])
    background = torch.tensor([index(world.BACKGROUNDS, p["background"]) for p in parsed])
    words = torch.zeros(len(captions), len(tokenizer.vocab))
    for i, c in enumerate(captions):
        for w in tokenizer.split(c):
            words[i, tokenizer.index.get(w, 2)] = 1.0
    return shape, colour, background, words


def pretrain(model, tokenizer: WordTokenizer, seed: int, steps: int = 300, batch: int = 128, log=print) -> dict:
    """Train `model` on the attribute and bag-of-words objectives; returns final accuracies."""
    gen = torch.Generator().manual_seed(seed)
    heads = AttributeHeads(len(tokenizer.vocab))
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3)
    model.train()
    for step in range(steps):
        captions = [world.caption(s, gen) for s in world.random_scenes(gen, batch)]
        captions = [("" if u < 0.05 else c) for u, c in zip(torch.rand(batch, generator=gen).tolist(), captions)]
        tokens = [tokenizer(c) for c in captions]
        ids = torch.tensor([t.ids for t in tokens])
        eos = features(model, ids)[torch.arange(batch), torch.tensor([t.length - 1 for t in tokens])]
        shape, colour, background, words = _labels(captions, tokenizer)
        logits = (heads.shape(eos), heads.colour(eos), heads.background(eos))
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, (shape, colour, background)))
        loss = loss + F.binary_cross_entropy_with_logits(heads.words(eos), words) * 10
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            acc = {n: (lg.argmax(-1) == y).float().mean().item()
                   for n, lg, y in zip(("shape", "colour", "background"), logits, (shape, colour, background))}
            log(f"text step {step}: loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc
