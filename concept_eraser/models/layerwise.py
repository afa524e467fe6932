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

T5 (Flux, SD3: `T5LayerwiseEncoder`) steps through transformers' own `T5Block`s, each built from the weights only
while it runs (T5-XXL's 24 blocks are 0.77 GB each in float32), exactly as `T5EncoderModel` runs them:

    h ← h + o(attention(q(x), k(x), v(x)) + position bias),  x = RMSNorm_0(h)   (no biases, no padding mask)
    h ← h + wo(gelu(wi_0(RMSNorm_1(h))) · wi_1(RMSNorm_1(h)))

with the relative position bias computed by block 0 and reused by every block, and the final RMSNorm on the
output of the last block (what ComfyUI's T5 returns for Flux and SD3).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..tokenizer import tokenizer_for
from .arch import EncoderSpec
from .text_encoders import (block_index, build_text_model, hf_state_dict, pooled_embedding, pooled_projection,
                            t5_config, t5_tensor)

T5_BLOCK = "encoder.block.{}."


def blocks_reaching_unet(spec: EncoderSpec) -> int:
    """How many leading blocks' outputs reach the U-Net: those up to the context layer (all but the
    last for SD2 / SDXL, which read the penultimate), or all of them where the pooled output is read."""
    return spec.layers if spec.pooled else spec.layers + 1 + spec.hidden_layer


class LayerwiseEncoder:
    """One text encoder rebuilt from the model's weights with only the blocks that reach the U-Net, holding them
    on `device` as the checkpoint stores them (no copy when they are already there) and running in `dtype`."""

    def __init__(self, spec: EncoderSpec, keys: Sequence[str], load: Callable[[str], torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        depth = blocks_reaching_unet(spec)
        needed = [k for k in keys if k.startswith(spec.prefix) and block_index(spec, k) < depth]
        # `load` may return the model's live or memory-mapped tensors: they are only read (`set_weight` replaces).
        state = hf_state_dict(spec, needed, lambda key: load(key).to(self.device))
        self.transformer = build_text_model(spec, state, depth, self.device)
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

    def set_weight(self, key: str, value: torch.Tensor) -> None:
        """Use `value` for a tensor given under its checkpoint key (a fused in_proj is split like on loading). The
        tensor held is replaced, never written into: it may be the model's own."""
        for name, tensor in hf_state_dict(self.spec, [key], lambda _: value).items():
            module, _, attr = name.rpartition(".")
            setattr(self.transformer.get_submodule(module), attr,
                    torch.nn.Parameter(tensor.to(self.device), requires_grad=False))

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[int, ...]]:
        tokens = [self.tokenize(p) for p in prompts]
        return torch.tensor([t.ids for t in tokens], device=self.device), tuple(t.length for t in tokens)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embeddings(ids, self.dtype)

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
    def encode(self, prompts: Sequence[str], positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context features [n, 77, width], pooled [n, projection] or None) with the current weights. `positions`:
        only the first that many tokens are run (CLIP attends causally, so their features are those of the whole
        window), and no pooled embedding."""
        ids, lengths = self.tokens(prompts)
        hidden = self.embed(ids[:, :positions])
        context = self.context(hidden) if self.context_depth == 0 else None
        depth = self.depth if positions is None else self.context_depth
        for i in range(depth):
            hidden = self.run_layer(i, hidden)
            if i + 1 == self.context_depth:
                context = self.context(hidden)
        return context, self.pooled(hidden, lengths) if self.spec.pooled and positions is None else None


class T5LayerwiseEncoder:
    """T5's encoder run block by block with the interface of `LayerwiseEncoder`, holding on `device` only the
    embedding as stored, the final norm and the block being run (built in `dtype` when first asked for, then kept
    until another block is) — never the whole encoder in `dtype`. Edited weights (`set_weight`) are kept in main
    memory as given and used whenever their block is built again."""

    def __init__(self, spec: EncoderSpec, keys: Sequence[str], load: Callable[[str], torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import T5EncoderModel
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        self.spec, self.device, self.dtype, self.load = spec, torch.device(device), dtype, load
        self.keys = {k[len(spec.prefix):]: k for k in keys if k.startswith(spec.prefix)}
        embedding = "shared.weight" if "shared.weight" in self.keys else "encoder.embed_tokens.weight"
        # the embedding in the file's dtype: rows are looked up, then cast (a float32 copy of T5-XXL's is 0.5 GB)
        self.embedding = self._load(embedding, cast=False)
        first = T5_BLOCK.format(0)
        config = t5_config(spec, {embedding: self.embedding, **{name: self._load(name, cast=False) for name in self.keys
                                                                  if name.startswith(first)}})
        with torch.device("meta"):  # resolves the attention implementation as `T5EncoderModel` (`build_t5`) does
            self.config = T5EncoderModel(config).config
            self.final_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.final_norm.weight = torch.nn.Parameter(self._load("encoder.final_layer_norm.weight"), requires_grad=False)
        self.edited: dict[str, torch.Tensor] = {}  # transformers name → weight as it will be stored, on the CPU
        self._block: tuple[int, torch.nn.Module] | None = None
        self._bias: dict[int, torch.Tensor] = {}  # sequence length → block 0's relative position bias
        self.context_depth = spec.layers + 1 + spec.hidden_layer
        self.tokenize = tokenizer_for(spec)

    def _load(self, name: str, cast: bool = True) -> torch.Tensor:
        """A tensor by transformers name on `device`, in `dtype` (`cast`) or as stored."""
        tensor = self.load(self.keys[name]).to(self.device)
        return t5_tensor(tensor, self.dtype) if cast else tensor

    @property
    def depth(self) -> int:
        return blocks_reaching_unet(self.spec)

    def qkv_keys(self, layer: int) -> tuple[str, ...]:
        return tuple(f"{self.spec.prefix}{T5_BLOCK.format(layer)}layer.0.SelfAttention.{p}.weight" for p in "qkv")

    def set_weight(self, key: str, value: torch.Tensor) -> None:
        """Replace a block's tensor given under its checkpoint key (in the block built now and whenever it is)."""
        name = key[len(self.spec.prefix):]
        self.edited[name] = value.to("cpu")  # T5-XXL's 72 q/k/v: 2.4 GB in fp16, kept off the device
        if self._block is not None and name.startswith(prefix := T5_BLOCK.format(self._block[0])):
            with torch.no_grad():
                self._block[1].get_parameter(name[len(prefix):]).copy_(t5_tensor(value.to(self.device), self.dtype))

    def block(self, layer: int) -> torch.nn.Module:
        """transformers' `T5Block` `layer` holding the current weights in `dtype` on `device`."""
        from transformers.models.t5.modeling_t5 import T5Block

        if self._block is None or self._block[0] != layer:
            self._block = None  # free the previous block first
            prefix = T5_BLOCK.format(layer)
            state = {name[len(prefix):]: (t5_tensor(self.edited[name].to(self.device), self.dtype)
                                          if name in self.edited else self._load(name))
                     for name in self.keys if name.startswith(prefix)}
            with torch.device("meta"):
                module = T5Block(self.config, has_relative_attention_bias=layer == 0, layer_idx=layer)
            module.load_state_dict(state, strict=True, assign=True)
            self._block = (layer, module.eval().requires_grad_(False))
        return self._block[1]

    def position_bias(self, length: int) -> torch.Tensor:
        """[1, heads, length, length]: computed by block 0 and added to every block's attention scores."""
        if length not in self._bias:
            self._bias[length] = self.block(0).layer[0].SelfAttention.compute_bias(length, length, device=self.device)
        return self._bias[length]

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[int, ...]]:
        tokens = [self.tokenize(p) for p in prompts]
        return torch.tensor([t.ids for t in tokens], device=self.device), tuple(t.length for t in tokens)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return t5_tensor(torch.nn.functional.embedding(ids, self.embedding), self.dtype)

    @torch.no_grad()
    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What block `layer`'s q, k and v read: its first RMSNorm's output."""
        return self.block(layer).layer[0].layer_norm(hidden)

    @torch.no_grad()
    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.position_bias(hidden.shape[1])  # before `block(layer)`: it may build block 0
        return self.block(layer)(hidden, attention_mask=None, position_bias=bias)[0]

    @torch.no_grad()
    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden) if self.spec.final_norm else hidden


def layerwise_encoder(spec: EncoderSpec, keys: Sequence[str], load: Callable[[str], torch.Tensor],
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The encoder of `spec` run block by block: CLIP towers whole (`LayerwiseEncoder`), T5 one block at a time."""
    cls = T5LayerwiseEncoder if spec.layout == "t5" else LayerwiseEncoder
    return cls(spec, keys, load, device, dtype)
