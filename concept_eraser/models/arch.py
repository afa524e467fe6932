"""Which Stable Diffusion family a checkpoint belongs to, read from its key names and shapes.

Single-file checkpoints in the original LDM/SGM layout are recognised:

| family | text encoder keys                                   | features fed to cross-attention        |
|--------|-----------------------------------------------------|----------------------------------------|
| sd1    | cond_stage_model.transformer.(text_model.)*          | CLIP ViT-L, last layer, final norm     |
| sd2    | cond_stage_model.model.* (OpenCLIP)                  | OpenCLIP ViT-H, penultimate, final norm|
| sdxl   | conditioner.embedders.0.transformer.text_model.* and | CLIP-L penultimate ⊕ bigG penultimate, |
|        | conditioner.embedders.1.model.* (OpenCLIP)           | no final norm (768 + 1280 = 2048)      |
| toyworld | as sd1, plus "toyworld.config" in the metadata     | small CLIP, last layer, final norm;    |
|        | (config and word-level vocabulary)                   | words tokenized with that vocabulary   |

Fine-tunes built on these (Pony, Illustrious, Juggernaut, inpainting and v-prediction variants)
share the layout: the edit touches only cross-attention K/V and text encoders, which they share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..errors import UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
TOYWORLD_META = "toyworld.config"  # JSON: U-Net config, token window, vocabulary
KV_PATTERN = re.compile(r"^(.*\.attn2\.to_[kv])\.weight$")


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder inside a checkpoint and how its per-token features are taken."""

    name: str  # "clip_l", "clip_h", "clip_g": also the LoRA/ComfyUI slot name
    prefix: str  # checkpoint key prefix of this encoder's weights
    layout: str  # "hf" (transformers CLIP names) or "open_clip" (fused in_proj, resblocks)
    hidden_layer: int  # index into hidden_states: -1 last layer, -2 penultimate
    final_norm: bool  # apply the final layer norm to that hidden state
    pad_token: str  # "eos" (CLIP-L in SD1/SDXL) or "zero" (OpenCLIP encoders pad with id 0)
    width: int
    layers: int
    lora_prefix: str  # kohya prefix for this encoder's modules
    # its projected EOS state (final norm, text_projection) reaches the U-Net: SDXL's bigG, through label_emb
    pooled: bool = False
    tokenizer: str = "clip"  # "clip" (byte-level BPE) or "word" (ToyWorld: vocabulary in the checkpoint's metadata)
    vocab: tuple[str, ...] = ()  # the word-level vocabulary ("word" tokenizer only)
    window: int = 77  # tokens per prompt: BOS, words, EOS, padding


@dataclass(frozen=True)
class ArchSpec:
    family: str
    title: str
    context_dim: int
    kv_keys: tuple[str, ...]
    encoders: tuple[EncoderSpec, ...]
    variant: str = "base"  # "inpainting" (9 input channels), "instruct-pix2pix" (8) ...
    modelspec_architecture: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        widths = sorted({self.extra["kv_out"][k] for k in self.kv_keys}) if "kv_out" in self.extra else []
        text = ", ".join(f"{e.name} ({e.layers}×{e.width})" for e in self.encoders)
        return (
            f"{self.title}{'' if self.variant == 'base' else f' ({self.variant})'}: "
            f"{len(self.kv_keys) // 2} cross-attention layers, {len(self.kv_keys)} K/V matrices, "
            f"context {self.context_dim}, output widths {widths}; text encoders: {text}"
        )


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _count_layers(keys: Sequence[str], prefix: str, marker: str) -> int:
    pattern = re.compile(re.escape(prefix) + re.escape(marker) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _hf_encoder(keys, shapes, prefix, name, hidden_layer, final_norm, pad, lora_prefix) -> EncoderSpec:
    if prefix + "text_model.embeddings.token_embedding.weight" in shapes:
        prefix = prefix + "text_model."
    token = prefix + "embeddings.token_embedding.weight"
    if token not in shapes:
        raise UnsupportedModelError(f"the {name} text encoder is incomplete: {token} is missing")
    return EncoderSpec(
        name, prefix, "hf", hidden_layer, final_norm, pad, shapes[token][1],
        _count_layers(keys, prefix, "encoder.layers."), lora_prefix,
    )


def _open_clip_encoder(keys, shapes, prefix, name, hidden_layer, final_norm, lora_prefix) -> EncoderSpec:
    token = prefix + "token_embedding.weight"
    if token not in shapes:
        raise UnsupportedModelError(f"the {name} text encoder is incomplete: {token} is missing")
    return EncoderSpec(
        name, prefix, "open_clip", hidden_layer, final_norm, "zero", shapes[token][1],
        _count_layers(keys, prefix, "transformer.resblocks."), lora_prefix,
    )


def _unsupported_family(keys: Sequence[str]) -> str | None:
    """Name families we recognise but do not edit, for a clear refusal."""
    joined = "\n".join(keys[:5000])
    probes = [
        ("joint_blocks.", "Stable Diffusion 3 (MMDiT)"),
        ("double_blocks.", "Flux"),
        ("single_transformer_blocks.", "Flux (diffusers layout)"),
        ("transformer_blocks.0.attn.add_k_proj", "an MMDiT model in diffusers layout"),
        ("lora_unet_", "a LoRA file"),
        ("lora_up.weight", "a LoRA file"),
        ("down_blocks.0.attentions.0", "a diffusers-layout U-Net (use a single-file .safetensors checkpoint)"),
        ("first_stage_model.encoder", "a VAE only"),
    ]
    for marker, family in probes:
        if marker in joined:
            return family
    return None


def detect(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> ArchSpec:
    """Classify a checkpoint from its tensor names and shapes; raise UnsupportedModelError otherwise."""
    keys = list(shapes)
    metadata = metadata or {}
    if metadata.get("concept_eraser.format") in ("patch", "lora"):
        raise UnsupportedModelError(
            "this file is a Concept Eraser patch, not a checkpoint: use `apply` to put it on its checkpoint"
        )
    kv = sorted((k for k in keys if k.startswith(UNET_PREFIX) and KV_PATTERN.match(k)), key=natural_key)
    other = _unsupported_family(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        found = other or f"no U-Net under '{UNET_PREFIX}' (first keys: {', '.join(keys[:3]) or 'none'})"
        raise UnsupportedModelError(f"not a Stable Diffusion 1.x/2.x/XL checkpoint: found {found}")
    if other and other.startswith(("Stable Diffusion 3", "Flux")):
        raise UnsupportedModelError(f"{other} is not supported; Concept Eraser edits SD1.x, SD2.x and SDXL")
    if not kv:
        raise UnsupportedModelError("the U-Net has no cross-attention (attn2.to_k / attn2.to_v) layers")

    context = {shapes[k][1] for k in kv}
    if len(context) != 1:
        raise UnsupportedModelError(f"cross-attention layers disagree on the context width: {sorted(context)}")
    context_dim = context.pop()
    in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    variant = {4: "base", 9: "inpainting", 8: "instruct-pix2pix"}.get(in_channels, f"{in_channels} input channels")
    extra = {"kv_out": {k: shapes[k][0] for k in kv}, "in_channels": in_channels}

    if any(k.startswith("conditioner.embedders.") for k in keys):
        has_l = any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
        has_g = any(k.startswith("conditioner.embedders.1.model.") for k in keys)
        if not has_l:
            if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
                raise UnsupportedModelError(
                    "this is an SDXL refiner (a single OpenCLIP bigG text encoder, context "
                    f"{context_dim}); only SDXL base-layout checkpoints are supported"
                )
            raise UnsupportedModelError("SDXL layout without the CLIP-L text encoder (conditioner.embedders.0)")
        if not has_g:
            raise UnsupportedModelError("SDXL layout without the OpenCLIP bigG text encoder (conditioner.embedders.1)")
        encoders = (
            _hf_encoder(keys, shapes, "conditioner.embedders.0.transformer.", "clip_l", -2, False, "eos", "lora_te1_"),
            replace(_open_clip_encoder(keys, shapes, "conditioner.embedders.1.model.", "clip_g", -2, False, "lora_te2_"),
                    pooled=True),
        )
        label = UNET_PREFIX + "label_emb.0.0.weight"
        extra["adm_in_channels"] = shapes[label][1] if label in shapes else None
        spec = ArchSpec("sdxl", "Stable Diffusion XL", context_dim, tuple(kv), encoders, variant,
                        "stable-diffusion-xl-v1-base", extra)
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        encoders = (_open_clip_encoder(keys, shapes, "cond_stage_model.model.", "clip_h", -2, True, "lora_te_"),)
        spec = ArchSpec("sd2", "Stable Diffusion 2.x", context_dim, tuple(kv), encoders, variant, None, extra)
    elif TOYWORLD_META in metadata:
        # SD1's layout with a small CLIP text model and a word-level vocabulary (see concept_eraser.toyworld).
        config = json.loads(metadata[TOYWORLD_META])
        extra["toyworld"] = config
        encoders = (replace(_hf_encoder(keys, shapes, "cond_stage_model.transformer.", "toy_clip", -1, True, "eos",
                                        "lora_te_"), tokenizer="word", vocab=tuple(config["vocab"]),
                            window=config["window"]),)
        spec = ArchSpec("toyworld", "ToyWorld", context_dim, tuple(kv), encoders, "base", None, extra)
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        encoders = (_hf_encoder(keys, shapes, "cond_stage_model.transformer.", "clip_l", -1, True, "eos", "lora_te_"),)
        spec = ArchSpec("sd1", "Stable Diffusion 1.x", context_dim, tuple(kv), encoders, variant,
                        "stable-diffusion-v1", extra)
    else:
        raise UnsupportedModelError(
            "the checkpoint has a U-Net but no text encoder (cond_stage_model / conditioner keys); "
            "concept features are computed with the checkpoint's own text encoder, so a full checkpoint is needed"
        )
    width = sum(e.width for e in spec.encoders)
    if width != context_dim:
        raise UnsupportedModelError(
            f"{spec.title}: the text encoder width ({width}) does not match the cross-attention context ({context_dim})"
        )
    return spec
