"""ComfyUI's MODEL + CLIP as the solver's `EditableModel`, and erasures put back as host patches.

Weights are read as ComfyUI itself would compute them when it loads the model: the original tensor
(its backup when some clone is patched in place) plus every patch pending on this MODEL/CLIP
(LoRAs, earlier erase nodes), through `comfy.lora.calculate_weight` on a float32 copy. Nothing of
the input objects is touched. Names are mapped between the two worlds with the host's own saving
conversion (`process_clip_state_dict_for_saving`, run on meta tensors), so the solver sees the keys a
checkpoint saved by ComfyUI would have: U-Net or transformer `model.diffusion_model.*` ⇄ ComfyUI
`diffusion_model.*`; text encoders `cond_stage_model.*` / `conditioner.embedders.*` ⇄ `clip_l.*`, `clip_h.*`,
`clip_g.*` (OpenCLIP's fused q/k/v `in_proj_weight` ⇄ three projections, `text_projection` ⇄ its transpose);
Flux's and SD3's `text_encoders.*` ⇄ `clip_l.*`, `clip_g.*`, `t5xxl.*` (the same names behind a prefix).

ComfyUI modules are imported inside functions: this file must import without the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..concept_eraser.denoiser import ModuleDenoiser, alphas_from_sigmas, ldm_inputs, training_size
from ..concept_eraser.encoding import EncodedPrompts, Segment
from ..concept_eraser.errors import InvalidParameterError, UnsupportedModelError
from ..concept_eraser.models.arch import (CONTEXT, FAMILIES, UNET_PREFIX, ArchSpec, EncoderSpec, TransformerFamily,
                                          detect)
from ..concept_eraser.models.text_encoders import hf_state_dict
from ..concept_eraser.patch import DeltaEdit, ErasurePatch, LowRankEdit, check_finite

log = logging.getLogger("concept_eraser")

COMFY_UNET = "diffusion_model."
# ModelPatcher attachments (copied by clone()): where the model came from, and the provenance of the
# erasures already on it, oldest first -- what the Save node writes into a checkpoint. A CLIP's patcher
# records the erasures that edit its text encoder.
SOURCE_ATTACHMENT = "concept_eraser.source"
STEPS_ATTACHMENT = "concept_eraser.steps"
# the folder ComfyUI ships CLIP's vocabulary in (beside comfy/sd1_clip.py)
HOST_VOCABULARY = "sd1_tokenizer"
HOST_T5_TOKENIZER = ("text_encoders", "t5_tokenizer", "tokenizer.json")  # T5's, beside it
# each text encoder's key in the token dict ComfyUI's tokenizers return (`clip.tokenize`)
TOKEN_SLOTS = {"clip_l": "l", "clip_g": "g", "clip_h": "h", "t5xxl": "t5xxl"}
# The text encoders ComfyUI's transformer models read, by the host's model class: its text-encoder class, the
# slots that must hold an encoder, what reads them, and the loader that makes such a CLIP.
TRANSFORMER_CLIPS = {
    "Flux": ("comfy.text_encoders.flux", "FluxClipModel", ("clip_l", "t5xxl"),
             "T5-XXL's features (txt_in) and CLIP-L's pooled output (vector_in)",
             "load clip_l and t5xxl with DualCLIPLoader (type flux)"),
    "SD3": ("comfy.text_encoders.sd3_clip", "SD3ClipModel", ("clip_l", "clip_g", "t5xxl"),
            "CLIP-L ⊕ CLIP-G and T5-XXL features (context_embedder) and CLIP-L ⊕ CLIP-G pooled (y_embedder)",
            "load clip_l, clip_g and t5xxl with TripleCLIPLoader"),
}
ENCODER_SLOTS = ("clip_l", "clip_h", "clip_g", "t5xxl")


def use_host_vocabulary() -> None:
    """Tokenize with ComfyUI's own copies of CLIP's vocabulary and T5's tokenizer.json (the solver needs them for
    token counts, and to rebuild the encoders it edits: ErasePro)."""
    import os

    import comfy.sd1_clip

    from ..concept_eraser import tokenizer

    root = os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__))
    if tokenizer._VOCABULARY_FILES is None:
        folder = os.path.join(root, HOST_VOCABULARY)
        tokenizer.use_vocabulary_files(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    if tokenizer._T5_TOKENIZER_FILE is None:
        tokenizer.use_t5_tokenizer(os.path.join(root, *HOST_T5_TOKENIZER))


def literal(text: str) -> str:
    """Escape ComfyUI's weighting syntax: erasure prompts are plain text, as on the command line."""
    return text.replace("(", "\\(").replace(")", "\\)")


@dataclass(frozen=True)
class TextKey:
    """Where a checkpoint text-encoder tensor lives in ComfyUI's CLIP: one or more keys stacked on
    dim 0 (OpenCLIP's fused q/k/v), or one transposed key (OpenCLIP's text_projection)."""

    comfy: tuple[str, ...]
    transpose: bool = False


def _text_keys(arch: ArchSpec, saved: dict[str, torch.Tensor],
               comfy_shapes: dict[str, torch.Size]) -> dict[str, TextKey]:
    """Checkpoint text-encoder key → ComfyUI key(s), through the solver's checkpoint → transformers naming."""
    out: dict[str, TextKey] = {}
    for key, tensor in saved.items():
        # Flux, SD3: the host saves its own names behind a prefix (`text_encoders.`)
        bare = key.split(".", 1)[-1]
        if key.startswith("text_encoders.") and bare in comfy_shapes:
            if tensor.is_floating_point():
                out[key] = TextKey((bare,))
            continue
        spec = next((e for e in arch.encoders if key.startswith(e.prefix)), None)
        if spec is None or not tensor.is_floating_point():
            continue
        if spec.layout == "open_clip" and key == spec.prefix + "text_projection":
            target = f"{spec.name}.transformer.text_projection.weight"
            if target in comfy_shapes:
                out[key] = TextKey((target,), transpose=True)
            continue
        names = hf_state_dict(spec, [key], lambda _k, t=tensor: t)
        targets = tuple(f"{spec.name}.transformer.text_model.{name}" for name in names)
        if targets and all(t in comfy_shapes for t in targets):
            out[key] = TextKey(targets)
    return out


class ComfyTextEncoder:
    """Per-token features through the host's own CLIP (`tokenize` + `encode_from_tokens`): exactly the
    context ComfyUI's CLIPTextEncode gives the denoiser, clip skip (CLIPSetLastLayer) and patches included,
    cut into the family's segments (SD3: the CLIP tokens, then T5's), and the pooled output it gives too."""

    def __init__(self, clip, arch: ArchSpec):
        self.clip = clip
        self.pooled = any(e.pooled for e in arch.encoders)
        groups: dict[int, EncoderSpec] = {}
        for spec in arch.encoders:
            if spec.context:
                groups.setdefault(spec.segment, spec)
        self.segments = [groups[k] for k in sorted(groups)]  # the first encoder of each segment
        # one erase encodes the same prompts several times (method, probe); the CLIP does not change meanwhile
        self._cache: dict[str, tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None]] = {}

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None]:
        tokens = self.clip.tokenize(literal(prompt), return_word_ids=True)
        first = {slot: chunks[:1] for slot, chunks in tokens.items()}
        out = self.clip.encode_from_tokens(first, return_pooled=True, return_dict=True)
        cond = out["cond"][0]
        parts, lengths, start = [], [], 0
        for spec in self.segments:
            slot = TOKEN_SLOTS.get(spec.name, next(iter(first)))
            chunk = first[slot][0]
            bos = spec.tokenizer != "t5"  # T5 has no BOS: words, EOS
            words = sum(1 for t in chunk if len(t) > 2 and t[2] > 0)
            if len(tokens[slot]) > 1 or words + 1 + bos > spec.window:
                log.warning("prompt %r is longer than %d %s tokens; only the first %d are used", prompt[:40],
                            spec.window - 1 - bos, spec.name, spec.window - 1 - bos)
            parts.append(cond[start:start + spec.window])
            lengths.append(min(words + 1 + bos, spec.window))
            start += len(chunk)  # where the host put the next encoder's tokens
        pooled = out["pooled_output"][0].float() if self.pooled else None
        return torch.cat(parts).float(), tuple(lengths), pooled

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        rows = []
        for prompt in prompts:
            if prompt not in self._cache:
                self._cache[prompt] = self._encode_one(prompt)
            rows.append(self._cache[prompt])
        segments, start = [], 0
        for k, spec in enumerate(self.segments):
            segments.append(Segment(start, spec.window, tuple(r[1][k] for r in rows), spec.tokenizer != "t5"))
            start += spec.window
        features = torch.stack([r[0] for r in rows]) if rows else torch.zeros(0, start, 0)
        pooled = torch.stack([r[2] for r in rows]) if rows and self.pooled else None
        return EncodedPrompts(tuple(prompts), features, segments[0].lengths, pooled, tuple(segments))


def _clip_layer_encoders(arch: ArchSpec, clip) -> ArchSpec:
    """The encoders' feature layer as this CLIP computes it (CLIPSetLastLayer changes it), so methods
    that rebuild the text encoder (ErasePro) read the same layer the host feeds the U-Net."""
    if getattr(clip, "layer_idx", None) is None:
        return arch
    encoders = []
    for spec in arch.encoders:
        module = getattr(clip.cond_stage_model, spec.name, None)
        if module is None or not hasattr(module, "set_clip_options"):
            encoders.append(spec)
            continue
        module.reset_clip_options()
        module.set_clip_options({"layer": clip.layer_idx})
        layer, index, norm, depth = module.layer, module.layer_idx, module.layer_norm_hidden_state, module.num_layers
        module.reset_clip_options()
        if layer == "last":
            encoders.append(replace(spec, hidden_layer=-1, final_norm=True))
        elif layer == "hidden":
            # ComfyUI counts the output of block i (0-based) as i; transformers' hidden_states[i + 1]
            encoders.append(replace(spec, hidden_layer=index if index < 0 else index - depth, final_norm=bool(norm)))
        else:
            encoders.append(spec)
    return replace(arch, encoders=tuple(encoders))


def check_transformer_clip(model, clip) -> None:
    """A Flux or SD3 MODEL needs the CLIP of its own kind (ComfyUI encodes each family's prompts its own way):
    refuse another, naming the CLIP that was connected and the loader that makes the right one."""
    import importlib

    needs = TRANSFORMER_CLIPS.get(type(model.model).__name__)
    if needs is None:
        return
    module, class_name, slots, reads, loader = needs
    encoder = clip.cond_stage_model
    found = [s for s in ENCODER_SLOTS if getattr(encoder, s, None) is not None]
    missing = [s for s in slots if s not in found]
    if isinstance(encoder, getattr(importlib.import_module(module), class_name)) and not missing:
        return
    held = f"holding {', '.join(found)}" if found else "holding no text encoder Concept Eraser knows"
    lacking = f", without {' and '.join(missing)}" if missing else ""
    raise InvalidParameterError(
        # (the loaders make subclasses named <class>_ of the host's text-encoder classes)
        "clip", f"this CLIP is ComfyUI's {type(encoder).__name__.rstrip('_')} ({held}{lacking}), but this "
        f"{type(model.model).__name__} model reads {reads} through ComfyUI's {class_name}: {loader}, or connect its "
        "checkpoint's own CLIP")


class ComfyModel:
    """`EditableModel` over a ComfyUI MODEL (ModelPatcher) and CLIP; reads only, never modifies them."""

    def __init__(self, model, clip, device: torch.device | None = None):
        import comfy.model_management

        if not hasattr(model, "get_key_patches") or not hasattr(getattr(model, "model", None), "model_config"):
            raise UnsupportedModelError("this MODEL is not a checkpoint model ComfyUI loaded (no model config)")
        if clip is None or not hasattr(clip, "patcher"):
            raise InvalidParameterError("clip", "a CLIP (text encoder) is needed: connect the checkpoint's CLIP")
        check_transformer_clip(model, clip)
        use_host_vocabulary()
        self.patcher = model
        self.clip = clip
        self.device = torch.device(device) if device is not None else comfy.model_management.get_torch_device()
        self.host_model = type(model.model).__name__
        config = model.model.model_config

        unet = model.model_state_dict(filter_prefix=COMFY_UNET)
        self.unet_shapes = {k: v.shape for k, v in unet.items()}
        shapes = {UNET_PREFIX + k[len(COMFY_UNET):]: tuple(v.shape) for k, v in unet.items()}
        clip_sd = clip.patcher.model_state_dict()
        self.clip_shapes = {k: v.shape for k, v in clip_sd.items()}
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in clip_sd.items()}
        try:
            saved = config.process_clip_state_dict_for_saving(meta)
        except Exception as exc:  # noqa: BLE001 - a model family whose CLIP layout the host saves differently
            raise UnsupportedModelError(
                f"ComfyUI loaded this as {self.host_model} ({type(config).__name__}), whose text encoders are not "
                f"laid out like Stable Diffusion 1.x/2.x/XL ones ({type(exc).__name__}: {exc})") from None
        shapes |= {k: tuple(v.shape) for k, v in saved.items()}
        # a CLIP from another family (SD1.5's with an SDXL model) is the CLIP's fault, not the model's
        context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        width = sum(s[0] for k, s in self.clip_shapes.items() if k.endswith("final_layer_norm.weight"))
        if context and width and context != width:
            raise InvalidParameterError(
                "clip", f"this CLIP gives {width}-wide text features, the model reads {context}-wide ones: it belongs "
                "to another model family; connect the checkpoint's own CLIP")
        try:
            arch = detect(shapes)
        except UnsupportedModelError as exc:
            loaded = f"{self.host_model} ({type(config).__name__})"
            known = any(f.claims(list(shapes), {}) for f in FAMILIES if issubclass(f, TransformerFamily))
            if not known and not any(".attn2." in k for k in shapes):  # neither a U-Net nor a transformer we know
                first = ", ".join(k[len(UNET_PREFIX):] for k in list(shapes)[:3])
                raise UnsupportedModelError(
                    f"ComfyUI loaded this as {loaded}, a denoiser Concept Eraser does not know (it edits Stable "
                    f"Diffusion 1.x/2.x/XL U-Nets and Flux.1 / SD3 transformers; this one's first tensors: {first})"
                ) from None
            raise UnsupportedModelError(f"ComfyUI loaded this as {loaded}: {exc}") from None
        self.text_keys = _text_keys(arch, saved, self.clip_shapes)
        missing = [k for k in saved if k.startswith(tuple(e.prefix for e in arch.encoders)) and k not in self.text_keys
                   and saved[k].is_floating_point() and not k.endswith(("logit_scale", "position_ids"))]
        if missing:
            raise UnsupportedModelError(f"the CLIP's tensor {missing[0]} has no counterpart in ComfyUI's CLIP")
        self.arch = _clip_layer_encoders(arch, clip)
        self._unet_patches: dict | None = None
        self._clip_patches: dict | None = None
        self._text_encoder = ComfyTextEncoder(clip, self.arch)

    # ---- EditableModel -------------------------------------------------------------------------
    @property
    def text_encoder(self) -> ComfyTextEncoder:
        return self._text_encoder

    def keys(self) -> list[str]:
        return [UNET_PREFIX + k[len(COMFY_UNET):] for k in self.unet_shapes] + list(self.text_keys)

    def weight(self, key: str) -> torch.Tensor:
        parts = [(self._effective(k, clip), dtype) for k, clip, dtype in self._sources(key)]
        tensor = parts[0][0] if len(parts) == 1 else torch.cat([p for p, _ in parts])
        if key in self.text_keys and self.text_keys[key].transpose:
            tensor = tensor.T.contiguous()
        return tensor.to(parts[0][1])

    def source(self) -> dict:
        source = self.patcher.get_attachment(SOURCE_ATTACHMENT) if hasattr(self.patcher, "get_attachment") else None
        return dict(source) if source else {"name": f"ComfyUI {self.host_model}", "host": "ComfyUI"}

    def prior_steps(self) -> tuple[dict, ...]:
        return recorded_steps(self.patcher)

    def weight_shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key` in checkpoint layout (KeyError when the model has no such tensor)."""
        if key.startswith(UNET_PREFIX):
            return tuple(self.unet_shapes[COMFY_UNET + key[len(UNET_PREFIX):]])
        mapped = self.text_keys[key]
        shapes = [tuple(self.clip_shapes[k]) for k in mapped.comfy]
        if mapped.transpose:
            return (shapes[0][1], shapes[0][0])
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def denoiser(self, resolution: int | None = None) -> ModuleDenoiser:
        """The host's own U-Net for gradient methods: ComfyUI loads it (with this MODEL's pending patches, e.g.
        earlier erase nodes) onto its device and manages the memory; the solver runs it with its trainable
        tensors swapped in per call, so the shared module is never written."""
        import comfy.model_base
        import comfy.model_management

        base = self.patcher.model
        kinds = {comfy.model_base.ModelType.EPS: "eps", comfy.model_base.ModelType.V_PREDICTION: "v"}
        if base.model_type not in kinds:
            raise UnsupportedModelError(
                f"gradient methods need an ε- or v-prediction model, not {base.model_type.name}")
        comfy.model_management.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        dtype = base.manual_cast_dtype or base.get_dtype()
        size = training_size(resolution, self.arch.family, kinds[base.model_type])
        inputs = ldm_inputs(self.arch.family, size, transformer_options={})
        return ModuleDenoiser(base.diffusion_model, UNET_PREFIX, inputs, device=device, dtype=dtype,
                              latent_shape=(base.latent_format.latent_channels, size // 8, size // 8),
                              alphas_cumprod=alphas_from_sigmas(base.model_sampling.sigmas),
                              prediction=kinds[base.model_type])

    # ---- host weights --------------------------------------------------------------------------
    def effective_float(self, key: str) -> torch.Tensor:
        """The weight under checkpoint key `key` as ComfyUI would patch it, float32 before rounding."""
        parts = [self._effective(k, clip) for k, clip, _ in self._sources(key)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if key in self.text_keys and self.text_keys[key].transpose:
            tensor = tensor.T.contiguous()
        return tensor

    def _sources(self, key: str) -> list[tuple[str, bool, torch.dtype]]:
        if key.startswith(UNET_PREFIX):
            name = COMFY_UNET + key[len(UNET_PREFIX):]
            if name not in self.unet_shapes:
                raise KeyError(key)
            return [(name, False, self._dtype(name, False))]
        if key not in self.text_keys:
            raise KeyError(key)
        return [(name, True, self._dtype(name, True)) for name in self.text_keys[key].comfy]

    def _key_patches(self, clip: bool) -> dict:
        if clip:
            if self._clip_patches is None:
                self._clip_patches = self.clip.patcher.get_key_patches()
            return self._clip_patches
        if self._unet_patches is None:
            self._unet_patches = self.patcher.get_key_patches(COMFY_UNET)
        return self._unet_patches

    def _dtype(self, name: str, clip: bool) -> torch.dtype:
        dtype = self._key_patches(clip)[name][0][0].dtype
        return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float16

    def _effective(self, name: str, clip: bool) -> torch.Tensor:
        import comfy.lora
        import comfy.model_management

        entry = self._key_patches(clip)[name]
        base, convert = entry[0]
        weight = comfy.model_management.cast_to_device(base, self.device, torch.float32, copy=True)
        weight = convert(weight, inplace=True)
        if len(entry) > 1:
            weight = comfy.lora.calculate_weight(entry[1:], weight, name)
        return weight


# ---- applying an erasure ---------------------------------------------------------------------------

def _lora(up: torch.Tensor, down: torch.Tensor):
    """A host LoRA patch computing exactly up @ down (alpha = None: scale 1), strength applied by the host."""
    from comfy.weight_adapter import LoRAAdapter

    return LoRAAdapter(set(), (up.float().cpu(), down.float().cpu(), None, None, None, None))


def host_patches(model: ComfyModel, patch: ErasurePatch) -> tuple[dict, dict]:
    """(U-Net patches, CLIP patches) in ComfyUI's formats: a low-rank erasure as the host's LoRA patch, a
    dense or sparse one as a "diff" against the weight the model has now (so strength s gives W + s·ΔW), a
    stored change (`DeltaEdit`) as that "diff"."""
    unet, text = {}, {}
    for key, stages in patch.edits.items():
        if key.startswith(UNET_PREFIX):
            name = COMFY_UNET + key[len(UNET_PREFIX):]
            if name not in model.unet_shapes:
                raise InvalidParameterError("model", f"the erasure edits {key}, which this model does not have")
            targets, transpose, into = [name], False, unet
            shapes = [model.unet_shapes[name]]
        else:
            mapped = model.text_keys.get(key)
            if mapped is None:
                raise InvalidParameterError(
                    "clip", f"the erasure edits the text-encoder tensor {key}, which has no counterpart in this CLIP")
            targets, transpose, into = list(mapped.comfy), mapped.transpose, text
            shapes = [model.clip_shapes[t] for t in targets]
        rows = [s[1] if transpose else s[0] for s in shapes]
        if all(isinstance(s, LowRankEdit) for s in stages):
            up, down = (torch.cat([s.up for s in stages], 1), torch.cat([s.down for s in stages], 0))
            if transpose:
                up, down = down.T, up.T
            for target, part in zip(targets, up.split(rows, 0) if not transpose else [up]):
                into[target] = _lora(part.contiguous(), down.contiguous())
            continue
        if all(isinstance(s, DeltaEdit) for s in stages):  # stored as a change: added as it is
            delta = sum((s.delta for s in stages[1:]), stages[0].delta)
        else:
            current = model.effective_float(key)
            delta = patch.apply_to(key, current) - current
        check_finite(key, delta)
        delta = delta.T if transpose else delta
        for target, part in zip(targets, delta.split(rows, 0)):
            into[target] = ("diff", (part.contiguous().cpu(),))
    return unet, text


def recorded_steps(patcher) -> tuple[dict, ...]:
    """The provenance of the erasures on a ModelPatcher (a MODEL, or a CLIP's `patcher`), oldest first."""
    steps = patcher.get_attachment(STEPS_ATTACHMENT) if hasattr(patcher, "get_attachment") else None
    return tuple(steps or ())


def apply_erasure(model, clip, adapter: ComfyModel, patch: ErasurePatch, strength: float, steps: Sequence[dict] = ()):
    """Clones of MODEL (and of CLIP when the text encoder is edited) with `patch` at `strength`; the
    provenance `steps` are added to each clone's record. The inputs are not modified."""
    unet, text = host_patches(adapter, patch)
    new_model = model.clone()
    accepted = set(new_model.add_patches(unet, strength)) if unet else set()
    new_clip = clip
    if text:
        new_clip = clip.clone()
        accepted |= set(new_clip.add_patches(text, strength))
    refused = sorted((set(unet) | set(text)) - accepted)
    if refused:
        raise InvalidParameterError("model", f"ComfyUI did not accept the patch for {refused[0]} "
                                    f"({len(refused)} of {len(unet) + len(text)} tensors); nothing was applied")
    if hasattr(new_model, "set_attachments"):
        new_model.set_attachments(STEPS_ATTACHMENT, tuple(adapter.prior_steps()) + tuple(steps))
    if text and hasattr(new_clip.patcher, "set_attachments"):  # Save Erasure checks the CLIP carries its edit
        new_clip.patcher.set_attachments(STEPS_ATTACHMENT, recorded_steps(clip.patcher) + tuple(steps))
    return new_model, new_clip


class HostProgress:
    """The solver's progress(done, total, message) as a ComfyUI progress bar. Every call is an
    interruption point (cancel raises the host's InterruptProcessingException before anything is
    patched); the bar itself is updated at most ten times a second."""

    def __init__(self):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(1)
        self.last = 0.0
        self.message = ""

    def __call__(self, done: int, total: int, message: str) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        now = time.monotonic()
        if done >= total or message != self.message or now - self.last > 0.1:
            self.bar.update_absolute(min(done, max(total, 1)), max(total, 1))
            self.last, self.message = now, message


def reserve_device_memory(adapter: ComfyModel, text_encoder: bool) -> None:
    """Ask ComfyUI to make room on the device for the solve (float32 K/V copies and, for methods that
    rebuild the text encoder, the encoder itself), as its own nodes do before heavy work."""
    import comfy.model_management

    if adapter.device.type == "cpu":
        return
    need = 2 * sum(4 * adapter.unet_shapes[COMFY_UNET + k[len(UNET_PREFIX):]].numel() for k in adapter.arch.map_keys())
    if text_encoder:
        need += sum(4 * s.numel() for s in adapter.clip_shapes.values())
    comfy.model_management.free_memory(need + (512 << 20), adapter.device)


def describe_layout(arch: ArchSpec, unet_shapes: dict[str, Any]) -> str:
    """The architecture and its text-conditioning maps: one cross-attention K/V pair per line for a U-Net, each
    entry projection for a transformer (Flux, SD3)."""
    lines = [arch.describe(), "", f"text encoders (features the {'U-Net' if arch.denoiser == 'unet' else 'transformer'}"
             " reads):"]
    for e in arch.encoders:
        where = "last layer" if e.hidden_layer == -1 else f"hidden layer {e.hidden_layer}"
        read = [f"{where}{', final norm' if e.final_norm else ''}"] if e.context else []
        read += ["pooled output" if e.context else "pooled output only"] if e.pooled else []
        lines.append(f"  {e.name}: {e.layers} blocks × {e.width}, {', '.join(read)}")
    if arch.denoiser != "unet":
        lines += ["", f"text-conditioning maps ({len(arch.maps)}, out × in):"]
        lines += [f"  {m.key[len(arch.denoiser_prefix):]}: {m.shape[0]}×{m.shape[1]}, reads the "
                  f"{'per-token features' if m.reads == CONTEXT else 'pooled output'}" for m in arch.maps]
        return "\n".join(lines)
    lines += ["", f"cross-attention K/V ({len(arch.map_keys())} matrices, out × context):"]
    for key in arch.map_keys():
        if key.endswith("to_k.weight"):
            name = key[len(UNET_PREFIX):-len(".attn2.to_k.weight")]
            shape = tuple(unet_shapes.get(COMFY_UNET + key[len(UNET_PREFIX):], ()))
            lines.append(f"  {name}: K,V {'×'.join(str(n) for n in shape)}")
    return "\n".join(lines)
