"""Write the trained parts as one single-file checkpoint in the LDM layout, and the judge.

`toyworld.safetensors`: the U-Net under ``model.diffusion_model.`` and the text encoder under
``cond_stage_model.transformer.text_model.`` (transformers' CLIP names, as in SD1 files), float32;
its metadata carries the configuration and the vocabulary (`models.arch.TOYWORLD_META`), which
is how the solver recognises the family and tokenizes prompts. `toyworld_flux.safetensors`: the MMDiT with BFL
names under ``model.diffusion_model.``, the same text encoder under ``text_encoders.toy_clip.transformer.``
(ComfyUI's all-in-one Flux layout), metadata under `models.arch.TOYWORLD_FLUX_META`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.arch import TOYWORLD_FLUX_META, TOYWORLD_META, UNET_PREFIX
from ..safetensors_io import write_safetensors
from ..tokenizer import WordTokenizer
from . import diffusion, world
from .mmdit import FluxConfig
from .unet import UNetConfig

TEXT_PREFIX = "cond_stage_model.transformer."
FLUX_TEXT_PREFIX = "text_encoders.toy_clip.transformer."  # ComfyUI all-in-one Flux files: text_encoders.clip_l...


def checkpoint_metadata(tokenizer: WordTokenizer, unet: UNetConfig) -> dict[str, str]:
    config = {
        "unet": unet.to_dict(),
        "window": tokenizer.window,
        "vocab": list(tokenizer.vocab),
        "image_size": world.SIZE,
        "diffusion": {"timesteps": diffusion.T, "schedule": "cosine", "prediction": "epsilon"},
    }
    return {TOYWORLD_META: json.dumps(config), "modelspec.title": "ToyWorld"}


def write_checkpoint(path: Path, encoder, unet, tokenizer: WordTokenizer, unet_config: UNetConfig) -> Path:
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    # transformers' CLIPTextModel keys already start with "text_model."; position_ids is a buffer.
    tensors |= {TEXT_PREFIX + k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    return write_safetensors(path, tensors, checkpoint_metadata(tokenizer, unet_config), overwrite=True)


def write_flux_checkpoint(path: Path, encoder, model, tokenizer: WordTokenizer, config: FluxConfig) -> Path:
    """ToyWorld-Flux as a ComfyUI-style all-in-one Flux file: the MMDiT under ``model.diffusion_model.`` with BFL
    names, the text encoder under ``text_encoders.toy_clip.transformer.``, the configuration in the metadata."""
    tensors = {UNET_PREFIX + k: v for k, v in model.state_dict().items()}
    tensors |= {FLUX_TEXT_PREFIX + k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    meta = {
        "flux": config.to_dict(),
        "window": tokenizer.window,
        "vocab": list(tokenizer.vocab),
        "image_size": world.SIZE,
        "diffusion": {"schedule": "rectified flow", "prediction": "velocity (noise - image)"},
    }
    return write_safetensors(path, tensors, {TOYWORLD_FLUX_META: json.dumps(meta), "modelspec.title": "ToyWorld-Flux"},
                             overwrite=True)


def write_judge(path: Path, judge) -> Path:
    tensors = {k: v.detach().float().contiguous() for k, v in judge.state_dict().items()}
    return write_safetensors(path, tensors, {"modelspec.title": "ToyWorld judge"}, overwrite=True)
