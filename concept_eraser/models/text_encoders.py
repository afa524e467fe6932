"""Text encoders rebuilt from a checkpoint's own weights as transformers `CLIPTextModel`s.

OpenCLIP encoders (SD2's ViT-H, SDXL's bigG) are converted to the transformers layout: the fused
`attn.in_proj_weight` is split into q/k/v, `resblocks` become `encoder.layers`. Every real CLIP
text tower uses 64-wide attention heads, so the head count is width / 64.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

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


def build_text_model(spec: EncoderSpec, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32):
    """A `CLIPTextModel` holding `state` (transformers names), on `device`, in `dtype` (float32; float64 for
    exact checks)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        vocab, width = state["embeddings.token_embedding.weight"].shape
        positions = state["embeddings.position_embedding.weight"].shape[0]
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise UnsupportedModelError(f"the {spec.name} text encoder is missing {exc.args[0]}") from None
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=max(1, width // HEAD_WIDTH),
        max_position_embeddings=positions,
        hidden_act="quick_gelu" if spec.layout == "hf" else "gelu",  # OpenAI CLIP vs OpenCLIP
        layer_norm_eps=1e-5,
        projection_dim=width,
        # CLIP's BOS/EOS ids (the config defaults) do not exist in a word-level vocabulary: use its own
        **({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1} if spec.tokenizer == "word" else {}),
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    transformer = text_transformer(model)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, _unexpected = transformer.load_state_dict(state, strict=False, assign=True)
    # transformers < 4.31 (A1111 pins 4.30.2) makes position_ids a persistent buffer; it is rebuilt below.
    missing = [name for name in missing if not name.endswith("position_ids")]
    if missing:
        raise UnsupportedModelError(f"the {spec.name} text encoder is missing weights: {', '.join(missing[:3])}")
    # Non-persistent buffers were created on the meta device; rebuild them for real.
    transformer.embeddings.register_buffer("position_ids", torch.arange(positions, device=device).unsqueeze(0), persistent=False)
    return model.eval().requires_grad_(False)


def text_transformer(model):
    """The module holding embeddings/encoder/final_layer_norm (transformers 4.x nests it in `text_model`)."""
    return getattr(model, "text_model", model)


def pooled_embedding(final_normed: torch.Tensor, lengths, projection: torch.Tensor) -> torch.Tensor:
    """SDXL's pooled text embedding, as ComfyUI computes it (comfy/clip_model.py, sd1_clip.py): the
    final layer-normed last-layer state at the first EOS (position length − 1) times the OpenCLIP
    `text_projection` (stored width × projection, applied as x @ P). [n, projection]."""
    rows = torch.arange(final_normed.shape[0], device=final_normed.device)
    eos = torch.as_tensor(lengths, device=final_normed.device) - 1
    return final_normed[rows, eos] @ projection.to(final_normed.dtype)
