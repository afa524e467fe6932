"""Text encoders rebuilt from a checkpoint's own weights (`ClipTextTransformer`, transformers' names).

OpenCLIP encoders (SD2's ViT-H, SDXL's bigG) are converted to the transformers layout: the fused
`attn.in_proj_weight` is split into q/k/v, `resblocks` become `encoder.layers`. Every real CLIP
text tower uses 64-wide attention heads, so the head count is width / 64; OpenAI's CLIP-L uses
quick_gelu, OpenCLIP's towers exact GELU (SD3's CLIP-G too, stored under transformers' names); all layer norms
have eps 1e-5. T5 (Flux, SD3) is transformers' own `T5EncoderModel` (`build_t5`).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .arch import EncoderSpec

HEAD_WIDTH = 64

# OpenCLIP name ↔ transformers name; {i} is a block index, {p} weight or bias. One table serves both
# directions (the checkpoint → transformers conversion here, the hosts' transformers → checkpoint maps).
_OPEN_CLIP_NAMES = [
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.{p}", "final_layer_norm.{p}"),
    ("transformer.resblocks.{i}.ln_1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("transformer.resblocks.{i}.ln_2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("transformer.resblocks.{i}.attn.out_proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("transformer.resblocks.{i}.mlp.c_fc.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("transformer.resblocks.{i}.mlp.c_proj.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
]
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{body}$")


_TO_HF = [(_pattern(o), h) for o, h in _OPEN_CLIP_NAMES]
_TO_OPEN_CLIP = [(_pattern(h), o) for o, h in _OPEN_CLIP_NAMES]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        if (m := pattern.match(name)) is not None:
            return template.format(**m.groupdict())
    return None


def open_clip_to_hf(name: str) -> str | None:
    """transformers name of an OpenCLIP text-tower tensor (None for fused q/k/v and unused tensors)."""
    return _rename(name, _TO_HF)


def hf_to_open_clip(name: str) -> str | None:
    """OpenCLIP name of a transformers text-transformer tensor (None for q/k/v, which OpenCLIP fuses)."""
    return _rename(name, _TO_OPEN_CLIP)


def hf_state_dict(spec: EncoderSpec, keys: list[str], load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights under transformers' CLIP text-transformer names (no `text_model.` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if not key.startswith(spec.prefix):
            continue
        name = key[len(spec.prefix):]
        if spec.layout == "hf":
            if not name.endswith("position_ids"):
                out[name] = load(key)
            continue
        if (m := _IN_PROJ.match(name)) is not None:
            q, k, v = load(key).chunk(3, dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = tensor
            continue
        if (hf := open_clip_to_hf(name)) is not None:
            out[hf] = load(key)
    return out


# The modules take their tensors as given (no initialisation, no meta device: its first use imports
# torch's meta registrations, seconds on a busy CPU), under transformers' CLIP names, in the dtype they are
# stored in: each layer casts its weights to its input's dtype as it runs. A float32 pass over an fp16
# checkpoint so never holds a float32 copy of the encoder (allocating SDXL's, 3.3 GB, took a CPU longer than
# casting each weight when it is used: the casts land in memory the allocator reuses).
class _Linear(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.weight = nn.Parameter(state[name + ".weight"], requires_grad=False)
        self.bias = nn.Parameter(state[name + ".bias"], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class _LayerNorm(_Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight.to(x.dtype), self.bias.to(x.dtype), eps=1e-5)


class _Attention(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_Linear(state, f"{name}.{p}_proj")
                                                                 for p in ("q", "k", "v", "out"))
        self.num_heads = max(1, self.q_proj.weight.shape[0] // HEAD_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape

        def heads(proj):
            return proj(x).view(n, t, self.num_heads, w // self.num_heads).transpose(1, 2)

        # CLIP text towers attend causally, with no padding mask (as ComfyUI and transformers run them)
        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, w))


class _MLP(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor], name: str, quick_gelu: bool):
        super().__init__()
        self.fc1, self.fc2 = _Linear(state, name + ".fc1"), _Linear(state, name + ".fc2")
        self.quick_gelu = quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x))


class ClipBlock(nn.Module):
    """h ← h + out_proj(causal_attention(q, k, v of layer_norm1(h))); h ← h + mlp(layer_norm2(h))."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, quick_gelu: bool):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = (_LayerNorm(state, f"{name}.layer_norm{i}") for i in (1, 2))
        self.self_attn = _Attention(state, name + ".self_attn")
        self.mlp = _MLP(state, name + ".mlp", quick_gelu)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class _Embeddings(nn.Module):
    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Module(), nn.Module()
        self.token_embedding.weight = nn.Parameter(state["embeddings.token_embedding.weight"], requires_grad=False)
        self.position_embedding.weight = nn.Parameter(state["embeddings.position_embedding.weight"],
                                                      requires_grad=False)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows looked up as stored, then cast (not the whole vocabulary), and summed in `dtype`."""
        positions = self.position_embedding.weight[: ids.shape[1]]
        return F.embedding(ids, self.token_embedding.weight).to(dtype) + positions.to(dtype)


class ClipTextTransformer(nn.Module):
    """CLIP's text tower under transformers' parameter names (`embeddings`, `encoder.layers.i`,
    `final_layer_norm`), holding only its first `depth` blocks; run block by block (`models.layerwise`).
    Not transformers' own class: importing transformers' modelling code takes seconds (it pulls
    torch._dynamo, sympy and scipy), longer than a whole erasure on a GPU."""

    def __init__(self, state: dict[str, torch.Tensor], depth: int, quick_gelu: bool):
        super().__init__()
        self.embeddings = _Embeddings(state)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipBlock(state, f"encoder.layers.{i}", quick_gelu) for i in range(depth))
        self.final_layer_norm = _LayerNorm(state, "final_layer_norm")


def block_index(spec: EncoderSpec, key: str) -> int:
    """Which transformer block a checkpoint key of this encoder belongs to (-1: none)."""
    marker = "transformer.resblocks." if spec.layout == "open_clip" else "encoder.layers."
    rest = key[len(spec.prefix):]
    return int(rest[len(marker):].split(".", 1)[0]) if rest.startswith(marker) else -1


def _block(name: str) -> int:
    """Block of a transformers-named tensor (-1: none)."""
    return int(name.split(".", 3)[2]) if name.startswith("encoder.layers.") else -1


def build_text_model(spec: EncoderSpec, state: dict[str, torch.Tensor], depth: int | None = None,
                     device: torch.device | str = "cpu") -> ClipTextTransformer:
    """The text tower holding `state` (transformers names, each tensor in its own dtype; used as is when already
    on `device`, tensors of blocks ≥ `depth` ignored), with its first `depth` blocks (default: all)."""
    depth = spec.layers if depth is None else depth
    try:
        model = ClipTextTransformer({k: v.to(device) for k, v in state.items() if _block(k) < depth}, depth,
                                    quick_gelu=spec.quick_gelu)
    except KeyError as exc:
        raise UnsupportedModelError(f"the {spec.name} text encoder is missing {exc.args[0]}") from None
    return model.eval()


def pooled_embedding(final_normed: torch.Tensor, lengths, projection: torch.Tensor | None) -> torch.Tensor:
    """The pooled text embedding, as ComfyUI computes it (comfy/clip_model.py, sd1_clip.py): the final
    layer-normed last-layer state at the first EOS (position length − 1), times `projection` applied as x @ P
    (`pooled_projection`; None: the state itself, as Flux and SD3 read CLIP-L's). [n, width or projection]."""
    rows = torch.arange(final_normed.shape[0], device=final_normed.device)
    eos = torch.as_tensor(lengths, device=final_normed.device) - 1
    pooled = final_normed[rows, eos]
    return pooled if projection is None else pooled @ projection.to(final_normed.dtype)


def pooled_projection(spec: EncoderSpec, load: Callable[[str], torch.Tensor], device, dtype) -> torch.Tensor | None:
    """P of the pooled output's x @ P: OpenCLIP's `text_projection` as stored (width × projection), transformers'
    `text_projection.weight` (a Linear beside `text_model.`) transposed, or None (`spec.projection` "none")."""
    if spec.projection == "none":
        return None
    if spec.projection == "hf":
        key = spec.prefix.removesuffix("text_model.") + "text_projection.weight"
        return load(key).to(device).to(dtype).T
    return load(spec.prefix + "text_projection").to(device).to(dtype)


def t5_state_dict(spec: EncoderSpec, keys: list[str], load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5's encoder weights under transformers' `T5EncoderModel` names (the checkpoint's, behind the prefix)."""
    return {k[len(spec.prefix):]: load(k) for k in keys
            if k.startswith(spec.prefix) and k[len(spec.prefix):].startswith(("shared.", "encoder."))}


def t5_config(spec: EncoderSpec, state: Mapping[str, torch.Tensor]):
    """transformers' `T5Config` of T5 v1.1 / T5-XXL (gated GELU, relative attention bias in the first block, RMSNorm
    eps 1e-6), its sizes read from `state`: the embedding and block 0's tensors under transformers' names."""
    from transformers import T5Config

    try:
        bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        vocab, width = state["shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"].shape
        inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
        ff = state[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    except KeyError as exc:
        raise UnsupportedModelError(f"the {spec.name} text encoder is missing {spec.prefix}{exc.args[0]}") from None
    heads = bias.shape[1]
    return T5Config(vocab_size=vocab, d_model=width, d_kv=inner // heads, d_ff=ff, num_layers=spec.layers,
                    num_heads=heads, relative_attention_num_buckets=bias.shape[0], dropout_rate=0.0,
                    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if gated else "relu",
                    is_encoder_decoder=False, use_cache=False)


def build_t5(spec: EncoderSpec, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32):
    """transformers' `T5EncoderModel` holding `state` (`t5_config`). Built on the meta device and given the
    tensors as they are, so no random initialisation of 4.7 billion parameters runs first."""
    from transformers import T5EncoderModel

    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    config = t5_config(spec, state)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    state = {k: v.to(device, dtype) for k, v in state.items()}
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied in T5: a file may hold either
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        what = f"is missing {missing[0]}" if missing else f"has an unknown tensor {unexpected[0]}"
        raise UnsupportedModelError(f"the {spec.name} text encoder {what} (not T5 v1.1's encoder layout)")
    return model.eval().requires_grad_(False)


def t5_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A T5 weight in `dtype`; fp8 files' NaNs become zeros, as ComfyUI's T5 cleans fp8 embeddings (t5.py)."""
    fp8 = tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    return torch.nan_to_num(tensor.to(dtype)) if fp8 else tensor.to(dtype)


class T5TextEncoder:
    """T5's encoder rebuilt from a checkpoint's weights (`build_t5`), in `dtype` on `device`: per-token features
    are its last layer after the final RMSNorm (what ComfyUI's T5XXLModel returns: layer "last", no attention mask
    over the padding). It has no pooled output. T5-XXL in float32 takes 19 GB (4.76 billion parameters) of the
    device's memory; the denoiser is never loaded, only its two text maps."""

    def __init__(self, spec: EncoderSpec, keys, load: Callable[[str], torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from ..tokenizer import t5_tokenizer, tokenizer_for

        self.spec = spec
        self.device = torch.device(device)
        vocab = t5_tokenizer().get_vocab_size()  # fail on a missing tokenizer before reading gigabytes
        # cast tensor by tensor: the file's fp16 T5-XXL (9.5 GB) and its float32 copy never coexist whole
        state = t5_state_dict(spec, list(keys), lambda key: t5_tensor(load(key).to(self.device), dtype))
        self.model = build_t5(spec, state, self.device, dtype)
        del state
        if vocab > self.model.config.vocab_size:
            raise UnsupportedModelError(f"the T5 tokenizer has {vocab} tokens, the {spec.name} encoder's embedding "
                                        f"only {self.model.config.vocab_size}: another tokenizer")
        self.tokenize = tokenizer_for(spec)

    def tokens(self, prompts) -> tuple[torch.Tensor, tuple[int, ...]]:
        tokens = [self.tokenize(p) for p in prompts]
        return torch.tensor([t.ids for t in tokens], device=self.device), tuple(t.length for t in tokens)

    @torch.no_grad()
    def encode(self, prompts) -> tuple[torch.Tensor, None]:
        ids, _ = self.tokens(prompts)
        return self.model(input_ids=ids).last_hidden_state, None
