"""Model families: one class per family declaring what the rest of the code needs to know about it.

As ComfyUI's `comfy/supported_models.py` declares one class per model it loads, each `Family` here says

- how a checkpoint of the family is recognised from its key names, shapes and metadata (`claims`);
- its text encoders and how a prompt becomes features (`text_encoders`: key layout, tokenizer, token
  window, which hidden layer, final norm, whether its pooled output reaches the denoiser);
- its text-conditioning maps (`maps`): the linear layers that read text features, each with the features
  that feed it — per-token `CONTEXT` (cross-attention K/V) or the `POOLED` embedding (SDXL's `label_emb`).

`detect` applies the checks every family shares, picks the family and returns an `ArchSpec`, the description
of one checkpoint that methods and hosts read. The methods edit maps, whatever family they belong to.

| family   | text encoder keys                                   | features fed to the maps                  |
|----------|-----------------------------------------------------|-------------------------------------------|
| sd1      | cond_stage_model.transformer.(text_model.)*          | CLIP ViT-L, last layer, final norm        |
| sd2      | cond_stage_model.model.* (OpenCLIP)                  | OpenCLIP ViT-H, penultimate, final norm   |
| sdxl     | conditioner.embedders.0.transformer.text_model.* and | CLIP-L penultimate ⊕ bigG penultimate, no |
|          | conditioner.embedders.1.model.* (OpenCLIP)           | final norm (768 + 1280 = 2048); bigG's    |
|          |                                                     | pooled output → label_emb (pooled columns)|
| toyworld | as sd1, plus "toyworld.config" in the metadata       | small CLIP, last layer, final norm; words |
|          | (config and word-level vocabulary)                   | tokenized with that vocabulary            |

Fine-tunes built on these (Pony, Illustrious, Juggernaut, inpainting and v-prediction variants)
share the layout: the edit touches only the text-conditioning maps and text encoders, which they share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from ..errors import UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
TOYWORLD_META = "toyworld.config"  # JSON: U-Net config, token window, vocabulary
TOYWORLD_FLUX_META = "toyworld_flux.config"  # JSON: MMDiT config, token window, vocabulary
KV_PATTERN = re.compile(r"^(.*\.attn2\.to_[kv])\.weight$")
CLIP_WINDOW = 77  # CLIP's token window: BOS, 75 tokens, EOS

# What feeds a text-conditioning map.
CONTEXT = "context"  # the per-token features [window, context_dim] (cross-attention K/V)
POOLED = "pooled"  # the pooled embedding of the encoder whose `pooled` is set (SDXL's bigG)


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
    window: int = CLIP_WINDOW  # tokens per prompt: BOS, words, EOS, padding


@dataclass(frozen=True)
class TextMap:
    """A text-conditioning map: a linear layer y = W x whose input columns `columns` read the text features
    `reads` (CONTEXT or POOLED); its other columns (SDXL label_emb's size/crop embeddings) are not text."""

    key: str  # checkpoint key of the weight [out, in]
    reads: str
    shape: tuple[int, int]
    columns: tuple[int, int] | None = None  # [start, stop) of the text columns; None: all of them


@dataclass(frozen=True)
class ArchSpec:
    family: str
    title: str
    context_dim: int
    maps: tuple[TextMap, ...]  # CONTEXT maps in model order, then POOLED ones
    encoders: tuple[EncoderSpec, ...]
    variant: str = "base"  # "inpainting" (9 input channels), "instruct-pix2pix" (8) ...
    modelspec_architecture: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def map_keys(self, reads: str = CONTEXT) -> tuple[str, ...]:
        """The checkpoint keys of the maps that read `reads`: for CONTEXT, every cross-attention K and V."""
        return tuple(m.key for m in self.maps if m.reads == reads)

    def describe(self) -> str:
        context = [m for m in self.maps if m.reads == CONTEXT]
        widths = sorted({m.shape[0] for m in context})
        text = ", ".join(f"{e.name} ({e.layers}×{e.width})" for e in self.encoders)
        return (
            f"{self.title}{'' if self.variant == 'base' else f' ({self.variant})'}: "
            f"{len(context) // 2} cross-attention layers, {len(context)} K/V matrices, "
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


def cross_attention_maps(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TextMap, ...]:
    """Every U-Net cross-attention K and V (`attn2.to_k` / `to_v`), in model order: they read the context."""
    keys = sorted((k for k in shapes if k.startswith(UNET_PREFIX) and KV_PATTERN.match(k)), key=natural_key)
    return tuple(TextMap(k, CONTEXT, tuple(shapes[k])) for k in keys)


class Family:
    """One model family. Subclasses declare the class attributes and override what differs."""

    name: ClassVar[str]
    title: ClassVar[str]
    modelspec_architecture: ClassVar[str | None] = None

    @classmethod
    def claims(cls, keys: Sequence[str], metadata: Mapping[str, str]) -> bool:
        """Whether a checkpoint with these keys (one that has a U-Net with cross-attention) is of this family."""
        raise NotImplementedError

    @classmethod
    def text_encoders(cls, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                      metadata: Mapping[str, str]) -> tuple[EncoderSpec, ...]:
        raise NotImplementedError

    @classmethod
    def maps(cls, shapes: Mapping[str, tuple[int, ...]], encoders: Sequence[EncoderSpec]) -> tuple[TextMap, ...]:
        return cross_attention_maps(shapes)

    @classmethod
    def variant(cls, in_channels: int) -> str:
        return {4: "base", 9: "inpainting", 8: "instruct-pix2pix"}.get(in_channels, f"{in_channels} input channels")

    @classmethod
    def extra(cls, metadata: Mapping[str, str]) -> dict:
        return {}


class SD1(Family):
    name, title, modelspec_architecture = "sd1", "Stable Diffusion 1.x", "stable-diffusion-v1"

    @classmethod
    def claims(cls, keys, metadata):
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        return (_hf_encoder(keys, shapes, "cond_stage_model.transformer.", "clip_l", -1, True, "eos", "lora_te_"),)


class SD2(Family):
    name, title = "sd2", "Stable Diffusion 2.x"

    @classmethod
    def claims(cls, keys, metadata):
        return any(k.startswith("cond_stage_model.model.") for k in keys)

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        return (_open_clip_encoder(keys, shapes, "cond_stage_model.model.", "clip_h", -2, True, "lora_te_"),)


class SDXL(Family):
    name, title, modelspec_architecture = "sdxl", "Stable Diffusion XL", "stable-diffusion-xl-v1-base"
    # The ADM vector y = [pooled bigG embedding, six 256-wide size/crop embeddings] (ComfyUI comfy/model_base.py
    # `SDXL.encode_adm`) enters through this Linear: its first columns read the pooled text.
    ADM_KEY = UNET_PREFIX + "label_emb.0.0.weight"

    @classmethod
    def claims(cls, keys, metadata):
        return any(k.startswith("conditioner.embedders.") for k in keys)

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        has_l = any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
        has_g = any(k.startswith("conditioner.embedders.1.model.") for k in keys)
        if not has_l:
            if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
                context = {shapes[m.key][1] for m in cross_attention_maps(shapes)}
                raise UnsupportedModelError(
                    "this is an SDXL refiner (a single OpenCLIP bigG text encoder, context "
                    f"{context.pop()}); only SDXL base-layout checkpoints are supported"
                )
            raise UnsupportedModelError("SDXL layout without the CLIP-L text encoder (conditioner.embedders.0)")
        if not has_g:
            raise UnsupportedModelError("SDXL layout without the OpenCLIP bigG text encoder (conditioner.embedders.1)")
        return (
            _hf_encoder(keys, shapes, "conditioner.embedders.0.transformer.", "clip_l", -2, False, "eos", "lora_te1_"),
            replace(_open_clip_encoder(keys, shapes, "conditioner.embedders.1.model.", "clip_g", -2, False,
                                       "lora_te2_"),
                    pooled=True),
        )

    @classmethod
    def maps(cls, shapes, encoders):
        pooled = next(e for e in encoders if e.pooled)
        projection = shapes.get(pooled.prefix + "text_projection")
        if cls.ADM_KEY not in shapes or projection is None:
            return cross_attention_maps(shapes)
        return cross_attention_maps(shapes) + (TextMap(cls.ADM_KEY, POOLED, tuple(shapes[cls.ADM_KEY]),
                                                       (0, projection[1])),)


class ToyWorld(Family):
    """SD1's layout with a small CLIP text model and a word-level vocabulary (see concept_eraser.toyworld)."""

    name, title = "toyworld", "ToyWorld"

    @classmethod
    def claims(cls, keys, metadata):
        return TOYWORLD_META in metadata

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        config = json.loads(metadata[TOYWORLD_META])
        return (replace(_hf_encoder(keys, shapes, "cond_stage_model.transformer.", "toy_clip", -1, True, "eos",
                                    "lora_te_"), tokenizer="word", vocab=tuple(config["vocab"]),
                        window=config["window"]),)

    @classmethod
    def variant(cls, in_channels):
        return "base"

    @classmethod
    def extra(cls, metadata):
        return {"toyworld": json.loads(metadata[TOYWORLD_META])}


# Tried in this order: the first family that claims a checkpoint describes it (ToyWorld before SD1, whose
# layout it shares).
FAMILIES: tuple[type[Family], ...] = (SDXL, SD2, ToyWorld, SD1)


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
    kv = cross_attention_maps(shapes)
    other = _unsupported_family(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        found = other or f"no U-Net under '{UNET_PREFIX}' (first keys: {', '.join(keys[:3]) or 'none'})"
        raise UnsupportedModelError(f"not a Stable Diffusion 1.x/2.x/XL checkpoint: found {found}")
    if other and other.startswith(("Stable Diffusion 3", "Flux")):
        raise UnsupportedModelError(f"{other} is not supported; Concept Eraser edits SD1.x, SD2.x and SDXL")
    if not kv:
        raise UnsupportedModelError("the U-Net has no cross-attention (attn2.to_k / attn2.to_v) layers")

    context = {m.shape[1] for m in kv}
    if len(context) != 1:
        raise UnsupportedModelError(f"cross-attention layers disagree on the context width: {sorted(context)}")
    context_dim = context.pop()
    family = next((f for f in FAMILIES if f.claims(keys, metadata)), None)
    if family is None:
        raise UnsupportedModelError(
            "the checkpoint has a U-Net but no text encoder (cond_stage_model / conditioner keys); "
            "concept features are computed with the checkpoint's own text encoder, so a full checkpoint is needed"
        )
    encoders = family.text_encoders(keys, shapes, metadata)
    in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    spec = ArchSpec(family.name, family.title, context_dim, family.maps(shapes, encoders), encoders,
                    family.variant(in_channels), family.modelspec_architecture,
                    {"in_channels": in_channels, **family.extra(metadata)})
    width = sum(e.width for e in spec.encoders)
    if width != context_dim:
        raise UnsupportedModelError(
            f"{spec.title}: the text encoder width ({width}) does not match the cross-attention context ({context_dim})"
        )
    return spec
