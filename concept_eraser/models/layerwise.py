"""A checkpoint's text encoder run one transformer block at a time, with weights that can change.

Methods that edit the text encoder itself (ErasePro) need what a host's encoder object does not
offer: the input of every block's q/k/v projections, and the next block run with weights just
edited. `LayerwiseEncoder` rebuilds one encoder from the model's weights by checkpoint key
(`EditableModel.keys` / `weight`) with the same `build_text_model` that `CheckpointTextEncoder`
uses, and steps through it. Every CLIP block is

    h ← h + out_proj(causal_attention(q(x), k(x), v(x))),  x = layer_norm1(h)
    h ← h + mlp(layer_norm2(h))

and `hidden_states[j]` (the output of the first j blocks) is what a host reads: SD1 j = all blocks,
final-normed; SD2 / SDXL the penultimate, j = all − 1. SDXL's pooled embedding comes from the
final-normed output of all blocks (`pooled_embedding`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..tokenizer import tokenizer_for
from .arch import EncoderSpec
from .text_encoders import build_text_model, hf_state_dict, pooled_embedding, text_transformer


def blocks_reaching_unet(spec: EncoderSpec) -> int:
    """How many leading blocks' outputs reach the U-Net: those up to the context layer (all but the
    last for SD2 / SDXL, which read the penultimate), or all of them where the pooled output is read."""
    return spec.layers if spec.pooled else spec.layers + 1 + spec.hidden_layer


class LayerwiseEncoder:
    def __init__(self, spec: EncoderSpec, keys: Sequence[str], load: Callable[[str], torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        # Our own copy (weights are edited in place later; `load` may return the model's live or
        # memory-mapped tensor), cast tensor by tensor so that two whole copies never coexist.
        state = hf_state_dict(spec, list(keys), lambda key: load(key).to(self.device, dtype, copy=True))
        self.transformer = text_transformer(build_text_model(spec, state, device, dtype))
        self.layers = self.transformer.encoder.layers
        # hidden_states[hidden_layer] is the output of this many blocks
        self.context_depth = len(self.layers) + 1 + spec.hidden_layer
        self.tokenize = tokenizer_for(spec)
        self.projection = load(spec.prefix + "text_projection").to(self.device, dtype) if spec.pooled else None

    @property
    def depth(self) -> int:
        """How many blocks reach the U-Net (`blocks_reaching_unet`)."""
        return blocks_reaching_unet(self.spec)

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
        return self.transformer.embeddings(input_ids=ids)

    @torch.no_grad()
    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What block `layer`'s q, k and v projections read: its first layer norm's output."""
        return self.layers[layer].layer_norm1(hidden)

    @torch.no_grad()
    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        attn = block.self_attn
        x = block.layer_norm1(hidden)
        n, t, w = x.shape

        def heads(proj):
            return proj(x).view(n, t, attn.num_heads, w // attn.num_heads).transpose(1, 2)

        # CLIP text towers attend causally, with no padding mask (as ComfyUI and transformers run them)
        out = F.scaled_dot_product_attention(heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj), is_causal=True)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(n, t, w))
        return hidden + block.mlp(block.layer_norm2(hidden))

    @torch.no_grad()
    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """The per-token features the U-Net reads, from the output of `context_depth` blocks."""
        return self.transformer.final_layer_norm(hidden) if self.spec.final_norm else hidden

    @torch.no_grad()
    def pooled(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """SDXL's pooled embedding from the output of all blocks."""
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
