"""The loaded model's tensors under checkpoint key names, read and written in place.

A `Slot` says where the tensor stored under a checkpoint key lives in the host's modules: one
parameter (A1111: the LDM modules, with the hijack's extra `.wrapped` levels removed from the name),
or several stacked on dim 0 (Forge keeps OpenCLIP's fused q/k/v `in_proj_weight` as three
transformers projections), or one transposed (OpenCLIP's `text_projection` in transformers layout).
Parameters are looked up by name on every access, never cached: Forge's LoRA loader replaces
parameter objects, A1111's offloading moves them between devices.

Also here: putting back the weight backups of A1111's builtin LoRA extension (see `settle_lora`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from concept_eraser.models.arch import UNET_PREFIX, ArchSpec, EncoderSpec
from concept_eraser.models.text_encoders import hf_state_dict, hf_to_open_clip
from concept_eraser.safetensors_io import tensor_bytes

# A1111's hijack wraps modules (cond_stage_model → .wrapped, token_embedding → .wrapped); checkpoint
# keys never have that level (sd_hijack.py; sd_models.py undoes it before saving or reloading).
_WRAPPED = re.compile(r"(^|\.)wrapped\.")
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")


@dataclass(frozen=True)
class Slot:
    """(root, parameter name) parts stacked on dim 0 in order; `transpose` for a single transposed part."""

    parts: tuple[tuple[str, str], ...]
    transpose: bool = False


def a1111_key(name: str) -> str:
    """Checkpoint key of an A1111 parameter name: the hijack's `wrapped.` levels removed."""
    return _WRAPPED.sub(r"\1", name)


class LiveTensors:
    """Checkpoint key → the host's live tensor(s). `roots()` returns the current root modules by name."""

    def __init__(self, roots: Callable[[], Mapping[str, torch.nn.Module]], slots: Mapping[str, Slot]):
        self.roots = roots
        self.slots = dict(slots)

    def keys(self) -> list[str]:
        return list(self.slots)

    def __contains__(self, key: str) -> bool:
        return key in self.slots

    def _params(self, key: str) -> list[torch.Tensor]:
        roots = self.roots()
        out = []
        for root, name in self.slots[key].parts:
            module = roots[root]
            out.append(module.get_parameter(name) if _is_parameter(module, name) else module.get_buffer(name))
        return out

    def modules(self, key: str) -> list[torch.nn.Module]:
        """The modules owning the tensor(s) of `key` (whose LoRA backups concern it)."""
        roots = self.roots()
        out = []
        for root, name in self.slots[key].parts:
            owner, _, _ = name.rpartition(".")
            out.append(roots[root].get_submodule(owner) if owner else roots[root])
        return out

    def read(self, key: str) -> torch.Tensor:
        """A copy of the current tensor under `key` (a normal tensor even where the host keeps
        inference tensors, as Forge does), on the device and in the dtype the host keeps it."""
        parts = self._params(key)
        with torch.no_grad():
            tensor = parts[0].detach().clone() if len(parts) == 1 else torch.cat([p.detach() for p in parts]).clone()
        return tensor.T.contiguous() if self.slots[key].transpose else tensor

    def shape(self, key: str) -> tuple[int, ...]:
        parts = self._params(key)
        if self.slots[key].transpose:
            return tuple(parts[0].shape[::-1])
        return (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])

    def dtype(self, key: str) -> torch.dtype:
        return self._params(key)[0].dtype

    def device(self, key: str) -> torch.device:
        return self._params(key)[0].device

    def write(self, key: str, value: torch.Tensor) -> None:
        """Copy `value` into the live tensor(s) in place (in their dtype and on their device)."""
        parts = self._params(key)
        if self.slots[key].transpose:
            value = value.T
        chunks = [value] if len(parts) == 1 else value.split([p.shape[0] for p in parts], 0)
        # Forge creates its parameters under inference mode; in-place updates to them must happen there too.
        with torch.inference_mode():
            for param, chunk in zip(parts, chunks):
                if tuple(chunk.shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {tuple(chunk.shape)} does not fit {tuple(param.shape)}")
                param.copy_(chunk.to(device=param.device, dtype=param.dtype))


def _is_parameter(root: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    return leaf in module._parameters


def digest(tensor: torch.Tensor) -> str:
    """Exact fingerprint of a tensor's bytes (dtype and shape included)."""
    data = tensor.detach()
    if data.is_inference():
        data = data.clone()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(tensor_bytes(data))
    return h.hexdigest()


# ---- A1111: LDM modules ---------------------------------------------------------------------------

def a1111_slots(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Slot]:
    """U-Net and text-encoder tensors of an A1111 model (`sd_model.named_parameters()`), by checkpoint key."""
    slots = {}
    for name, tensor in named:
        key = a1111_key(name)
        if key.startswith(UNET_PREFIX) or key.startswith(TEXT_PREFIXES):
            slots[key] = Slot((("model", name),))
    return slots


# ---- Forge: transformers text encoders, U-Net under its own root ----------------------------------

_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")

# Forge's text-encoder slot names → where the checkpoint keeps that encoder, per family
FORGE_TEXT_PREFIX = {
    "sd1": {"clip_l": ("cond_stage_model.transformer.text_model.", "hf")},
    "sd2": {"clip_h": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {"clip_l": ("conditioner.embedders.0.transformer.text_model.", "hf"),
             "clip_g": ("conditioner.embedders.1.model.", "open_clip")},
}


def forge_text_slots(family: str, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Slot]:
    """Checkpoint key → Forge text-encoder parameter(s), from the names of
    `forge_objects.clip.cond_stage_model.named_parameters()` (`clip_l.transformer.text_model.…`)."""
    layout = FORGE_TEXT_PREFIX.get(family)
    if layout is None:
        raise ValueError(f"no text-encoder layout for {family!r}")
    slots: dict[str, Slot] = {}
    fused: dict[str, dict[str, str]] = {}
    for name, _tensor in named:
        slot, _, rest = name.partition(".")
        if slot not in layout:
            continue
        prefix, kind = layout[slot]
        if rest == "transformer.text_projection.weight" and kind == "open_clip":
            slots[prefix + "text_projection"] = Slot((("clip", name),), transpose=True)
            continue
        if not rest.startswith("transformer.text_model."):
            continue  # logit_scale, position_ids: not part of what the U-Net reads
        hf = rest[len("transformer.text_model."):]
        if kind == "hf":
            slots[prefix + hf] = Slot((("clip", name),))
            continue
        m = _QKV.match(hf)
        if m:
            key = f"{prefix}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}"
            fused.setdefault(key, {})[m.group(2)] = name
            continue
        if (open_clip := hf_to_open_clip(hf)) is not None:
            slots[prefix + open_clip] = Slot((("clip", name),))
    for key, parts in fused.items():
        if set(parts) == {"q", "k", "v"}:
            slots[key] = Slot(tuple(("clip", parts[p]) for p in "qkv"))
    return slots


def check_text_slots(arch: ArchSpec, slots: Mapping[str, Slot], live: Mapping[str, str]) -> None:
    """Assert that the solver's own checkpoint → transformers naming maps every text key onto the
    parameters its slot names (the two directions agree)."""
    for key, slot in slots.items():
        spec: EncoderSpec | None = next((e for e in arch.encoders if key.startswith(e.prefix)), None)
        if spec is None or slot.transpose:
            continue
        names = list(hf_state_dict(spec, [key], lambda _k: torch.empty(3, 1)))
        expected = [f"{spec.name}.transformer.text_model.{n}" for n in names]
        got = [name for _root, name in slot.parts]
        if expected != got:
            raise AssertionError(f"{key}: slot {got} but the solver maps it to {expected}")


# ---- A1111's builtin LoRA extension ---------------------------------------------------------------

def settle_lora(modules: Iterable[torch.nn.Module]) -> int:
    """Put back the weights A1111's LoRA extension backed up and forget its cache, on every module that
    has one (extensions-builtin/Lora/networks.py: `network_weights_backup`, `network_bias_backup`,
    `network_current_names`). Afterwards each module holds its weights without any LoRA, and the
    extension takes a fresh backup (of what is there then) and re-applies the active LoRAs on the next
    generation. Done before every read or write of the weights, so that a LoRA is never baked into an
    erasure or a restore, and a stale backup never undoes an erasure. Returns how many modules had one."""
    count = 0
    for module in modules:
        weights = getattr(module, "network_weights_backup", None)
        bias = getattr(module, "network_bias_backup", None)
        names = getattr(module, "network_current_names", ())
        if weights is None and bias is None and not names:
            continue
        with torch.inference_mode():
            if weights is not None:
                if isinstance(module, torch.nn.MultiheadAttention):
                    module.in_proj_weight.copy_(weights[0])
                    module.out_proj.weight.copy_(weights[1])
                else:
                    module.weight.copy_(weights)
            if bias is not None:
                target = module.out_proj if isinstance(module, torch.nn.MultiheadAttention) else module
                target.bias.copy_(bias)
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None
        count += 1
    return count


def forge_settle_lora(patcher_models: Iterable[torch.nn.Module]) -> int:
    """Forge merges LoRAs by replacing parameters and keeps the originals in `model.lora_loader.backup`
    (backend/patcher/lora.py). Restore them (`refresh` with no patches) so the live parameters hold the
    weights without LoRA; Forge merges the LoRAs again on top of whatever is there at its next load."""
    count = 0
    for model in patcher_models:
        loader = getattr(model, "lora_loader", None)
        if loader is None or (not getattr(loader, "backup", None) and not getattr(loader, "online_backup", None)):
            continue
        loader.refresh(lora_patches={}, offload_device=torch.device("cpu"), force_refresh=True)
        count += 1
    return count
