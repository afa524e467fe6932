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
| flux     | text_encoders.t5xxl.transformer.* (HF T5 names) and  | T5-XXL last layer, final RMSNorm, 256     |
|          | text_encoders.clip_l.transformer.text_model.*        | tokens → txt_in; CLIP-L pooled (final     |
|          |                                                     | norm at EOS, unprojected) → vector_in     |
| toyworld | as flux, with one small CLIP (text_encoders.toy_clip | its last layer, final norm → txt_in; its  |
| _flux    | .transformer.*) and "toyworld_flux.config" in the    | pooled output (unprojected) → vector_in;  |
|          | metadata (MMDiT config and word-level vocabulary)    | words tokenized with that vocabulary      |
| sd3      | text_encoders.clip_l / clip_g (HF CLIP names) and    | [CLIP-L ⊕ CLIP-G penultimate, zero-padded |
|          | text_encoders.t5xxl.transformer.*                   | to 4096 | T5 last layer] along tokens     |
|          |                                                     | (77 + 77) → context_embedder; CLIP-L      |
|          |                                                     | pooled ⊕ CLIP-G projected pooled → y_emb. |

The transformer families (Flux, SD3: MMDiT) read text through two entry projections, their maps: the
per-token features through `txt_in` / `context_embedder`, the pooled vector through `vector_in.in_layer` /
`y_embedder.mlp.0`. Their files come as ComfyUI all-in-one checkpoints (`model.diffusion_model.` prefix,
`text_encoders.*`) or as diffusion-model-only files with bare BFL/SAI key names, the text encoders in files of
their own; `CheckpointModel` mounts those under the all-in-one names (`ENCODER_PREFIXES`), so detection and
features see one layout. The maps' keys keep the file's own names (`ArchSpec.denoiser_prefix`).

Fine-tunes built on these (Pony, Illustrious, Juggernaut, inpainting and v-prediction variants)
share the layout: the edit touches only the text-conditioning maps and text encoders, which they share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from ..errors import ErasureFileError, UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
# Where text encoders given in files of their own are mounted: the names ComfyUI's all-in-one checkpoints use.
ENCODER_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                    "t5xxl": "text_encoders.t5xxl.transformer."}
# The command-line options that give those files (named in messages, also of hosts without them).
ENCODER_OPTIONS = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5xxl": "--t5"}
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")  # SD1/2, SDXL, Flux/SD3
# Tensors beside a denoiser stored without a prefix: text encoders, VAEs.
NOT_DENOISER_PREFIXES = TEXT_ENCODER_PREFIXES + ("vae.", "first_stage_model.")

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

    name: str  # "clip_l", "clip_h", "clip_g", "t5xxl": also the LoRA/ComfyUI slot name
    prefix: str  # checkpoint key prefix of this encoder's weights
    layout: str  # "hf" (transformers CLIP names), "open_clip" (fused in_proj, resblocks) or "t5" (HF T5 names)
    hidden_layer: int  # index into hidden_states: -1 last layer, -2 penultimate
    final_norm: bool  # apply the final layer norm to that hidden state
    pad_token: str  # "eos" (CLIP-L in SD1/SDXL) or "zero" (OpenCLIP encoders pad with id 0)
    width: int
    layers: int
    lora_prefix: str  # kohya prefix for this encoder's modules
    # its pooled output (final-normed EOS state, projected as `projection` says) reaches the denoiser: SDXL's bigG
    # through label_emb, Flux's CLIP-L through vector_in, SD3's CLIP-L and CLIP-G through y_embedder
    pooled: bool = False
    tokenizer: str = "clip"  # "clip" (byte-level BPE), "word" (ToyWorld: vocabulary in the checkpoint's
    # metadata) or "t5" (SentencePiece: words, EOS, zero padding; no BOS)
    vocab: tuple[str, ...] = ()  # the word-level vocabulary ("word" tokenizer only)
    window: int = CLIP_WINDOW  # tokens per prompt: BOS, words, EOS, padding
    context: bool = True  # its per-token features reach the CONTEXT maps (Flux's CLIP-L: only its pooled output)
    # Encoders of one segment are concatenated along the features (SDXL's CLIP-L ⊕ bigG), zero-padded to the
    # context width; segments follow each other along the tokens (SD3: [CLIP-L ⊕ CLIP-G, T5]).
    segment: int = 0
    # how the pooled output is projected: "open_clip" (x @ text_projection), "hf" (x @ text_projection.weightᵀ)
    # or "none" (the final-normed EOS state itself, as Flux and SD3 read CLIP-L's)
    projection: str = "open_clip"
    quick_gelu: bool = True  # OpenAI's CLIP-L uses quick_gelu; OpenCLIP's ViT-H and bigG exact GELU


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
    variant: str = "base"  # "inpainting" (9 input channels), "instruct-pix2pix" (8), "dev", "schnell" ...
    modelspec_architecture: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)
    denoiser: str = "unet"  # "unet" (cross-attention K/V maps) or "mmdit" (Flux, SD3: entry projections)
    denoiser_prefix: str = UNET_PREFIX  # key prefix of the denoiser's tensors in the file ("" in BFL files)

    def is_denoiser_key(self, key: str) -> bool:
        """A tensor of the denoiser (U-Net or transformer), not of a text encoder, VAE or anything else."""
        if self.denoiser_prefix:
            return key.startswith(self.denoiser_prefix)
        return not key.startswith(NOT_DENOISER_PREFIXES)

    def own_key(self, canonical: str) -> str:
        """The inverse of `canonical_key`: this file's name of a tensor named as an all-in-one checkpoint names it."""
        return canonical if self.denoiser_prefix else canonical.removeprefix(UNET_PREFIX)

    def map_keys(self, reads: str = CONTEXT) -> tuple[str, ...]:
        """The checkpoint keys of the maps that read `reads`: for CONTEXT, every cross-attention K and V."""
        return tuple(m.key for m in self.maps if m.reads == reads)

    def describe(self) -> str:
        context = [m for m in self.maps if m.reads == CONTEXT]
        if self.denoiser == "mmdit":
            text = ", ".join(f"{e.name} ({e.layers}×{e.width})" for e in self.encoders) or "none given"
            maps = ", ".join(f"{m.key} {m.shape[0]}×{m.shape[1]} ({m.reads})" for m in self.maps)
            return f"{self.title} ({self.variant}): text-conditioning maps {maps}; text encoders: {text}"
        widths = sorted({m.shape[0] for m in context})
        text = ", ".join(f"{e.name} ({e.layers}×{e.width})" for e in self.encoders)
        return (
            f"{self.title}{'' if self.variant == 'base' else f' ({self.variant})'}: "
            f"{len(context) // 2} cross-attention layers, {len(context)} K/V matrices, "
            f"context {self.context_dim}, output widths {widths}; text encoders: {text}"
        )


def is_text_encoder_key(key: str) -> bool:
    """A checkpoint key of a text encoder, in any family's layout."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def canonical_key(key: str) -> str:
    """A tensor's name as an all-in-one checkpoint names it: Flux and SD3 diffusion-model-only files store the
    denoiser's tensors without `model.diffusion_model.` (`ArchSpec.own_key` is the way back)."""
    return key if key.startswith((UNET_PREFIX, *NOT_DENOISER_PREFIXES)) else UNET_PREFIX + key


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
        _count_layers(keys, prefix, "transformer.resblocks."), lora_prefix, quick_gelu=False,
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
        """Whether a checkpoint with these keys is of this family (U-Net families: asked only of checkpoints with
        a U-Net)."""
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

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ArchSpec:
        """The description of a checkpoint this family claims (U-Net families: cross-attention K/V read the
        concatenated text features)."""
        keys = list(shapes)
        kv = cross_attention_maps(shapes)
        if not kv:
            raise UnsupportedModelError("the U-Net has no cross-attention (attn2.to_k / attn2.to_v) layers")
        context = {m.shape[1] for m in kv}
        if len(context) != 1:
            raise UnsupportedModelError(f"cross-attention layers disagree on the context width: {sorted(context)}")
        context_dim = context.pop()
        encoders = cls.text_encoders(keys, shapes, metadata)
        in_channels = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
        spec = ArchSpec(cls.name, cls.title, context_dim, cls.maps(shapes, encoders), encoders,
                        cls.variant(in_channels), cls.modelspec_architecture,
                        {"in_channels": in_channels, **cls.extra(metadata)})
        width = sum(e.width for e in spec.encoders)
        if width != context_dim:
            raise UnsupportedModelError(f"{spec.title}: the text encoder width ({width}) does not match the "
                                        f"cross-attention context ({context_dim})")
        return spec


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


def _t5_embedding(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> str | None:
    """The key of T5's token embedding: `shared.weight`, or its tied copy `encoder.embed_tokens.weight` alone."""
    return next((prefix + k for k in ("shared.weight", "encoder.embed_tokens.weight") if prefix + k in shapes), None)


def _t5_encoder(keys, shapes, prefix: str, window: int, segment: int, lora_prefix: str) -> EncoderSpec:
    return EncoderSpec("t5xxl", prefix, "t5", -1, True, "zero", shapes[_t5_embedding(shapes, prefix)][1],
                       _count_layers(keys, prefix, "encoder.block."), lora_prefix, tokenizer="t5", window=window,
                       segment=segment)


def _listed(items: Sequence[str], conjunction: str = "and") -> str:
    """"a", "a and b", "a, b and c"."""
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}" if len(items) > 1 else items[0]


def _slot_content(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> tuple[str, int] | None:
    """What a text-encoder slot holds: ("t5" | "clip", width), ("other", 0), or None when it is empty."""
    under = [k for k in shapes if k.startswith(prefix)]
    if not under:
        return None
    embedding = _t5_embedding(shapes, prefix)
    if embedding and prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        return "t5", shapes[embedding][1]
    for inner in ("text_model.", ""):
        token = f"{prefix}{inner}embeddings.token_embedding.weight"
        if token in shapes:
            return "clip", shapes[token][1]
    return "other", 0


class TransformerFamily(Family):
    """An MMDiT (Flux, SD3): text enters through two linear entry projections, the maps. Found by a marker
    key of its blocks, under whatever prefix the file stores the transformer (`denoiser_prefix`)."""

    MARKER: ClassVar[str]  # a key every file of the family has, relative to the transformer
    CONTEXT_KEY: ClassVar[str]  # Linear [hidden, context width] reading the per-token features
    POOLED_KEY: ClassVar[str]  # Linear [hidden, pooled width] reading the pooled vector
    # text-encoder slot → (kind, role): kind "t5" or "clip"; role says what reads it (for messages)
    SLOTS: ClassVar[dict[str, tuple[str, str]]]

    @classmethod
    def prefix(cls, keys: Sequence[str]) -> str | None:
        return next((k[: -len(cls.MARKER)] for k in keys if k.endswith(cls.MARKER)), None)

    @classmethod
    def claims(cls, keys, metadata):
        return cls.prefix(keys) is not None

    @classmethod
    def check_layout(cls, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
        """Refuse a transformer whose layout is not the family's (named after what was found)."""
        for key in (cls.CONTEXT_KEY, cls.POOLED_KEY):
            if prefix + key not in shapes or len(shapes[prefix + key]) != 2:
                raise UnsupportedModelError(f"{cls.title}: unknown transformer layout: {prefix + key} "
                                            f"{'is not a matrix' if prefix + key in shapes else 'is missing'}")

    @classmethod
    def check_slots(cls, shapes: Mapping[str, tuple[int, ...]], widths: Mapping[str, int]) -> None:
        """Each text encoder the family needs is present, of the right kind and width (`widths`: slot → the
        width its map reads, where one map reads it alone)."""
        found = {slot: _slot_content(shapes, ENCODER_PREFIXES[slot]) for slot in cls.SLOTS}
        missing = [slot for slot, content in found.items() if content is None]
        if missing:  # all of them in one message: a diffusion-model-only file given alone lacks every one
            several = len(missing) > 1
            raise UnsupportedModelError(
                f"{cls.title}: the {_listed([f'{s} ({cls.SLOTS[s][1]})' for s in missing])} text "
                f"encoder{'s are' if several else ' is'} missing: the file has no "
                f"{_listed([ENCODER_PREFIXES[s] + '*' for s in missing], 'or')} tensors; give "
                f"{'each' if several else 'it'} as a file of its own (command line: "
                f"{', '.join(ENCODER_OPTIONS[s] for s in missing)})")
        for slot, (kind, role) in cls.SLOTS.items():
            got, width = found[slot]
            if got != kind:
                what = {"t5": f"a T5 encoder ({width} wide)", "clip": f"a CLIP text model ({width} wide)",
                        "other": "no text encoder this program knows"}[got]
                raise UnsupportedModelError(f"{cls.title}: the {slot} slot holds {what}, not {kind.upper()} ({role})",
                                            slot)
            if slot in widths and width != widths[slot]:
                raise UnsupportedModelError(f"{cls.title}: the {slot} text encoder is {width} wide, but {role} reads "
                                            f"{widths[slot]} values: wrong text encoder", slot)

    @classmethod
    def build(cls, shapes, metadata, text: bool = True):
        """`text` False: the transformer alone (no text encoders described or required), enough to apply or
        inspect an edit of its maps."""
        keys = list(shapes)
        prefix = cls.prefix(keys)
        cls.check_layout(shapes, prefix)
        scaled = prefix + cls.CONTEXT_KEY.removesuffix("weight") + "scale_weight"
        if scaled in shapes:
            raise UnsupportedModelError(f"{cls.title}: a scaled-fp8 file ({scaled}: its weights are stored divided by "
                                        "per-tensor scales); use an fp16, bf16 or plain fp8 file of this model")
        encoders = cls.text_encoders(keys, shapes, metadata) if text else ()
        context, pooled = prefix + cls.CONTEXT_KEY, prefix + cls.POOLED_KEY
        maps = (TextMap(context, CONTEXT, tuple(shapes[context])), TextMap(pooled, POOLED, tuple(shapes[pooled])))
        return ArchSpec(cls.name, cls.title, shapes[context][1], maps, encoders, cls.variant_of(shapes, prefix),
                        cls.modelspec_architecture, cls.extra(metadata), denoiser="mmdit", denoiser_prefix=prefix)

    @classmethod
    def variant_of(cls, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> str:
        raise NotImplementedError


class Flux(TransformerFamily):
    """Flux.1 dev/schnell (BFL names): T5-XXL's per-token features → txt_in, CLIP-L's pooled output →
    vector_in.in_layer (ComfyUI comfy/text_encoders/flux.py: T5 padded to at least 256 tokens, no attention
    mask; CLIP-L's final-normed EOS state, not projected)."""

    name, title = "flux", "Flux.1"  # no modelspec.architecture: its dev and schnell ids differ
    MARKER = "double_blocks.0.img_attn.qkv.weight"
    CONTEXT_KEY, POOLED_KEY = "txt_in.weight", "vector_in.in_layer.weight"
    SLOTS = {"t5xxl": ("t5", "txt_in"), "clip_l": ("clip", "vector_in")}
    T5_WINDOW = 256  # ComfyUI's Flux T5 tokenizer: min_length 256

    @classmethod
    def check_layout(cls, shapes, prefix):
        if prefix + cls.POOLED_KEY not in shapes and any(k.startswith(prefix + "distilled_guidance_layer.")
                                                         for k in shapes):
            raise UnsupportedModelError(
                "Chroma (a Flux-layout transformer without vector_in: its modulations come from "
                "distilled_guidance_layer, and it reads T5 with an attention mask) is not supported")
        super().check_layout(shapes, prefix)

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        prefix = cls.prefix(keys)
        cls.check_slots(shapes, {"t5xxl": shapes[prefix + cls.CONTEXT_KEY][1],
                                 "clip_l": shapes[prefix + cls.POOLED_KEY][1]})
        clip = _hf_encoder(keys, shapes, ENCODER_PREFIXES["clip_l"], "clip_l", -1, True, "eos", "lora_te1_")
        return (_t5_encoder(keys, shapes, ENCODER_PREFIXES["t5xxl"], cls.T5_WINDOW, 0, "lora_te2_"),
                replace(clip, pooled=True, context=False, projection="none"))

    @classmethod
    def variant_of(cls, shapes, prefix):
        variant = "dev" if prefix + "guidance_in.in_layer.weight" in shapes else "schnell"
        channels = shapes.get(prefix + "img_in.weight", (0, 64))[1]
        return variant if channels == 64 else f"{variant}, {channels} input channels"


class SD3(TransformerFamily):
    """Stable Diffusion 3 / 3.5 (SAI names): ComfyUI's SD3 cond (comfy/text_encoders/sd3_clip.py) → context_embedder:
    CLIP-L ⊕ CLIP-G penultimate (not normed), zero-padded to 4096, followed along the tokens by T5's 77;
    CLIP-L pooled (unprojected) ⊕ CLIP-G pooled (projected) → y_embedder.mlp.0."""

    name, title = "sd3", "Stable Diffusion 3"  # no modelspec.architecture: medium and large ids differ
    MARKER = "joint_blocks.0.context_block.attn.qkv.weight"
    CONTEXT_KEY, POOLED_KEY = "context_embedder.weight", "y_embedder.mlp.0.weight"
    SLOTS = {"clip_l": ("clip", "context_embedder and y_embedder"), "clip_g": ("clip", "context_embedder and "
             "y_embedder"), "t5xxl": ("t5", "context_embedder")}
    T5_WINDOW = 77  # ComfyUI's SD3 T5 tokenizer: min_length 77

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        prefix = cls.prefix(keys)
        cls.check_slots(shapes, {"t5xxl": shapes[prefix + cls.CONTEXT_KEY][1]})
        clip_l = _hf_encoder(keys, shapes, ENCODER_PREFIXES["clip_l"], "clip_l", -2, False, "eos", "lora_te1_")
        clip_g = _hf_encoder(keys, shapes, ENCODER_PREFIXES["clip_g"], "clip_g", -2, False, "zero", "lora_te2_")
        if clip_l.width > clip_g.width or clip_l.layers > clip_g.layers:  # CLIP-L: 12 × 768, CLIP-G: 32 × 1280
            raise UnsupportedModelError(
                f"{cls.title}: the clip_l text encoder ({clip_l.layers} layers × {clip_l.width}) is larger than the "
                f"clip_g one ({clip_g.layers} × {clip_g.width}): they look swapped; give CLIP-L as clip_l and CLIP-G "
                f"as clip_g (command line: {ENCODER_OPTIONS['clip_l']} / {ENCODER_OPTIONS['clip_g']})", "clip_l")
        pooled = shapes[prefix + cls.POOLED_KEY][1]
        if clip_l.width + clip_g.width != pooled or clip_l.width + clip_g.width > shapes[prefix + cls.CONTEXT_KEY][1]:
            raise UnsupportedModelError(
                f"{cls.title}: the CLIP encoders are {clip_l.width} (clip_l) and {clip_g.width} (clip_g) wide, but "
                f"y_embedder reads {pooled} values: wrong text encoders")
        projection = ENCODER_PREFIXES["clip_g"] + "text_projection.weight"
        if projection not in shapes:
            raise UnsupportedModelError(f"{cls.title}: the clip_g text encoder has no {projection}, which its pooled "
                                        "output needs", "clip_g")
        return (replace(clip_l, pooled=True, projection="none"),
                replace(clip_g, pooled=True, projection="hf", quick_gelu=False),
                _t5_encoder(keys, shapes, ENCODER_PREFIXES["t5xxl"], cls.T5_WINDOW, 1, "lora_te3_"))

    @classmethod
    def variant_of(cls, shapes, prefix):
        depth = _count_layers(list(shapes), prefix, "joint_blocks.")
        if depth == 38:
            return "3.5 large"
        if depth == 24:
            return "3.5 medium" if prefix + "joint_blocks.0.x_block.attn2.qkv.weight" in shapes else "3 medium"
        return f"{depth} joint blocks"


class ToyWorldFlux(Flux):
    """Flux's layout (BFL names under model.diffusion_model.) with ToyWorld's one small CLIP text model feeding both
    maps: its per-token features → txt_in, its pooled output (final-normed EOS state, unprojected) → vector_in;
    word-level vocabulary and MMDiT config in the metadata (see concept_eraser.toyworld)."""

    name, title = "toyworld_flux", "ToyWorld-Flux"
    PREFIX = "text_encoders.toy_clip.transformer."

    @classmethod
    def claims(cls, keys, metadata):
        return TOYWORLD_FLUX_META in metadata and super().claims(keys, metadata)

    @classmethod
    def text_encoders(cls, keys, shapes, metadata):
        config = json.loads(metadata[TOYWORLD_FLUX_META])
        clip = _hf_encoder(keys, shapes, cls.PREFIX, "toy_clip", -1, True, "eos", "lora_te_")
        return (replace(clip, pooled=True, projection="none", tokenizer="word", vocab=tuple(config["vocab"]),
                        window=config["window"]),)

    @classmethod
    def variant_of(cls, shapes, prefix):
        return "base"

    @classmethod
    def extra(cls, metadata):
        return {"toyworld_flux": json.loads(metadata[TOYWORLD_FLUX_META])}


# Tried in this order: the first family that claims a checkpoint describes it (ToyWorld before SD1 and ToyWorld-Flux
# before Flux, whose layouts they share; the transformers first: an all-in-one file may also carry other models' keys).
FAMILIES: tuple[type[Family], ...] = (ToyWorldFlux, Flux, SD3, SDXL, SD2, ToyWorld, SD1)


# Layouts recognised but not edited, named in refusals: transformers (refused even beside a U-Net), then others.
TRANSFORMER_MARKERS = [
    ("single_transformer_blocks.", "a Flux transformer in diffusers layout (use a single-file checkpoint with BFL "
                                   "names, as ComfyUI's models/diffusion_models holds)"),
    ("transformer_blocks.0.attn.add_k_proj", "an MMDiT model in diffusers layout (use a single-file checkpoint)"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer of an unknown layout"),
    ("double_blocks.", "a Flux transformer of an unknown layout"),
]
UNET_MARKERS = ("input_blocks.", ".attn2.to_k")  # in the keys of every U-Net family's denoiser
OTHER_MARKERS = [
    ("lora_unet_", "a LoRA file"),
    ("lora_up.weight", "a LoRA file"),
    ("down_blocks.0.attentions.0", "a diffusers-layout U-Net (use a single-file .safetensors checkpoint)"),
    ("first_stage_model.encoder", "a VAE only"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder only (give it with the model)"),
    ("text_model.encoder.layers.0.", "a CLIP text encoder only (give it with the model)"),
]


def _found(keys: Sequence[str], markers: Sequence[tuple[str, str]]) -> str | None:
    """The description of the first marker some key contains."""
    joined = "\n".join(keys[:5000])
    return next((what for marker, what in markers if marker in joined), None)


def detect(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None,
           text: bool = True) -> ArchSpec:
    """Classify a checkpoint from its tensor names and shapes; raise UnsupportedModelError otherwise. `text` False:
    a transformer file (Flux, SD3) may come without its text encoders (they are then not described)."""
    keys = list(shapes)
    metadata = metadata or {}
    if metadata.get("concept_eraser.format") in ErasureFileError.NAMES:
        raise ErasureFileError(metadata["concept_eraser.format"])
    family = next((f for f in FAMILIES if issubclass(f, TransformerFamily) and f.claims(keys, metadata)), None)
    if family is not None:
        return family.build(shapes, metadata, text)
    transformer = _found(keys, TRANSFORMER_MARKERS)
    denoiser = [k for k in keys if k.startswith(UNET_PREFIX)]
    if transformer or not denoiser:
        found = (transformer or _found(keys, OTHER_MARKERS)
                 or f"no U-Net under '{UNET_PREFIX}' (first keys: {', '.join(keys[:3]) or 'none'})")
    elif not any(marker in k for k in denoiser for marker in UNET_MARKERS):
        # ComfyUI stores every denoiser under this prefix: AuraFlow, Lumina, HunyuanDiT ... as well as U-Nets
        encoders = sorted({k.split(".")[1] for k in keys if k.startswith("text_encoders.")})
        found = (f"a denoiser under '{UNET_PREFIX}' that is neither a U-Net nor a Flux.1 / SD3 transformer "
                 f"(first keys: {', '.join(denoiser[:3])})"
                 + (f", with text encoders {', '.join(encoders)}" if encoders else ""))
    else:
        found = None
    if found:
        raise UnsupportedModelError(f"not a checkpoint of a supported model (SD1.x, SD2.x, SDXL, Flux.1, SD3): "
                                    f"found {found}")
    family = next((f for f in FAMILIES if f.claims(keys, metadata)), None)
    if family is None:
        raise UnsupportedModelError(
            "the checkpoint has a U-Net but no text encoder (cond_stage_model / conditioner keys); "
            "concept features are computed with the checkpoint's own text encoder, so a full checkpoint is needed"
        )
    return family.build(shapes, metadata)
