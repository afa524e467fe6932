"""A checkpoint's text encoder run one transformer block at a time, with weights that can change.

Methods that edit the text encoder itself (ErasePro) need what a host's encoder object does not
offer: the input of every block's q/k/v projections, and the next block run with weights just
edited. `LayerwiseEncoder` rebuilds one encoder from the model's weights by checkpoint key
(`EditableModel.keys` / `weight`) and steps through it; `CheckpointTextEncoder` runs the same. Every CLIP block is

    h ← h + out_proj(causal_attention(q(x), k(x), v(x))),  x = layer_norm1(h)
    h ← h + mlp(layer_norm2(h))

and `hidden_states[j]` (the output of the first j blocks) is what a host reads: SD1 j = all blocks,
final-normed; SD2 / SDXL the penultimate, j = all − 1. SDXL's pooled embedding comes from the
final-normed output of all blocks (`pooled_embedding`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..tokenizer import tokenizer_for
from .arch import EncoderSpec
from .text_encoders import block_index, build_text_model, hf_state_dict, pooled_embedding, pooled_projection


def blocks_reaching_unet(spec: EncoderSpec) -> int:
    """How many leading blocks' outputs reach the U-Net: those up to the context layer (all but the
    last for SD2 / SDXL, which read the penultimate), or all of them where the pooled output is read."""
    return spec.layers if spec.pooled else spec.layers + 1 + spec.hidden_layer


class LayerwiseEncoder:
    """One text encoder rebuilt from the model's weights with only the blocks that reach the U-Net,
    directly on `device` in `dtype` (each tensor is moved in the checkpoint's dtype, then cast there)."""

    def __init__(self, spec: EncoderSpec, keys: Sequence[str], load: Callable[[str], torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        depth = blocks_reaching_unet(spec)
        needed = [k for k in keys if k.startswith(spec.prefix) and block_index(spec, k) < depth]
        # Our own copy (weights are edited in place later; `load` may return the model's live or
        # memory-mapped tensor), cast tensor by tensor so that two whole copies never coexist.
        state = hf_state_dict(spec, needed, lambda key: load(key).to(self.device).to(dtype, copy=True))
        self.transformer = build_text_model(spec, state, depth, self.device, dtype)
        del state
        self.layers = self.transformer.encoder.layers
        # hidden_states[hidden_layer] is the output of this many blocks
        self.context_depth = spec.layers + 1 + spec.hidden_layer
        self.tokenize = tokenizer_for(spec)
        self.projection = pooled_projection(spec, load, self.device, dtype) if spec.pooled else None

    @property
    def depth(self) -> int:
        """How many blocks reach the U-Net (`blocks_reaching_unet`): all that were built."""
        return len(self.layers)

    def qkv_keys(self, layer: int) -> tuple[str, ...]:
        """Checkpoint keys of block `layer`'s q/k/v weights: three, or OpenCLIP's one fused [q; k; v]."""
        if self.spec.layout == "open_clip":
            return (f"{self.spec.prefix}transformer.resblocks.{layer}.attn.in_proj_weight",)
        return tuple(f"{self.spec.prefix}encoder.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv")

    @torch.no_grad()
    def set_weight(self, key: str, value: torch.Tensor) -> None:
        """Replace a tensor given under its checkpoint key (a fused in_proj is split like on loading)."""
        for name, tensor in hf_state_dict(self.spec, [key], lambda _: value).items():
            self.transformer.get_parameter(name).copy_(tensor)

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[int, ...]]:
        tokens = [self.tokenize(p) for p in prompts]
        return torch.tensor([t.ids for t in tokens], device=self.device), tuple(t.length for t in tokens)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embeddings(ids)

    @torch.no_grad()
    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What block `layer`'s q, k and v projections read: its first layer norm's output."""
        return self.layers[layer].layer_norm1(hidden)

    @torch.no_grad()
    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](hidden)

    @torch.no_grad()
    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """The per-token features the U-Net reads, from the output of `context_depth` blocks."""
        return self.transformer.final_layer_norm(hidden) if self.spec.final_norm else hidden

    @torch.no_grad()
    def pooled(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The pooled embedding (SDXL's bigG, Flux's CLIP-L, SD3's both) from the output of all blocks."""
        return pooled_embedding(self.transformer.final_layer_norm(hidden), lengths, self.projection)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context features [n, 77, width], pooled [n, projection] or None) with the current weights."""
        ids, lengths = self.tokens(prompts)
        hidden = self.embed(ids)
        context = self.context(hidden) if self.context_depth == 0 else None
        for i in range(self.depth):
            hidden = self.run_layer(i, hidden)
            if i + 1 == self.context_depth:
                context = self.context(hidden)
        return context, self.pooled(hidden, lengths) if self.spec.pooled else None
