"""Per-token text features: what cross-attention K/V projections read for a prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .models.arch import ArchSpec
from .models.text_encoders import build_text_model, hf_state_dict, text_transformer
from .tokenizer import EOS_ID, tokenize


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: tuple[str, ...]
    features: torch.Tensor  # [n, 77, context_dim], float32
    lengths: tuple[int, ...]  # BOS + words + EOS per prompt; the last word sits at length - 2


class TextEncoder(Protocol):
    """What a method needs from a model's text side; hosts provide their own."""

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...


class CheckpointTextEncoder:
    """The checkpoint's own text encoder(s), built with transformers, features as the hosts compute them:
    SD1 the final layer-normed output; SD2 the penultimate layer, normed; SDXL CLIP-L penultimate ⊕ bigG
    penultimate, not normed."""

    def __init__(self, arch: ArchSpec, keys: list[str], load: Callable[[str], torch.Tensor], device="cpu"):
        self.arch = arch
        self.device = torch.device(device)
        self.models = [
            (spec, build_text_model(spec, hf_state_dict(spec, keys, load), self.device)) for spec in arch.encoders
        ]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        prompts = tuple(prompts)
        parts, lengths = [], None
        for spec, model in self.models:
            tokens = [tokenize(p, EOS_ID if spec.pad_token == "eos" else 0) for p in prompts]
            lengths = tuple(t.length for t in tokens)
            ids = torch.tensor([t.ids for t in tokens], device=self.device)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[spec.hidden_layer]
            if spec.final_norm:
                hidden = text_transformer(model).final_layer_norm(hidden)
            parts.append(hidden.float())
        return EncodedPrompts(prompts, torch.cat(parts, dim=-1), lengths)
