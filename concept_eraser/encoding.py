"""Per-token text features: what cross-attention K/V projections read for a prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .models.arch import ArchSpec
from .models.text_encoders import build_text_model, hf_state_dict, pooled_embedding, text_transformer
from .tokenizer import tokenizer_for


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: tuple[str, ...]
    features: torch.Tensor  # [n, 77, context_dim], float32
    lengths: tuple[int, ...]  # BOS + words + EOS per prompt; the last word sits at length - 2
    # SDXL only: the pooled bigG embedding [n, 1280] the U-Net also reads (through label_emb); None elsewhere
    pooled: torch.Tensor | None = None


class TextEncoder(Protocol):
    """What a method needs from a model's text side; hosts provide their own. On SDXL, `pooled` is
    filled (the host's pooled output, e.g. ComfyUI's `return_pooled`) for the `pooled_edit` option."""

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
        self.tokenizers = {spec.name: tokenizer_for(spec) for spec in arch.encoders}
        self.projections = {spec.name: load(spec.prefix + "text_projection").float().to(self.device)
                            for spec in arch.encoders if spec.pooled}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        prompts = tuple(prompts)
        parts, lengths, pooled = [], None, None
        for spec, model in self.models:
            tokens = [self.tokenizers[spec.name](p) for p in prompts]
            lengths = tuple(t.length for t in tokens)
            ids = torch.tensor([t.ids for t in tokens], device=self.device)
            out = model(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[spec.hidden_layer]
            if spec.pooled:
                pooled = pooled_embedding(out.last_hidden_state, lengths, self.projections[spec.name]).float()
            if spec.final_norm:
                hidden = text_transformer(model).final_layer_norm(hidden)
            parts.append(hidden.float())
        return EncodedPrompts(prompts, torch.cat(parts, dim=-1), lengths, pooled)
