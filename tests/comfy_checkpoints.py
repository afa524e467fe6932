"""Tiny random checkpoints that ComfyUI itself loads: its detector recognises them as SD1.5 / SD2 / SDXL.

ComfyUI matches a checkpoint to a model class by fixed U-Net fields (comfy/supported_models.py:
model channels 320, context 768 / 1024 / 2048, conv or linear proj_in, SDXL's ADM width 2816 and its
input transformer depths [0, 0, 2, 2, 10, 10]) and builds the rest of the U-Net from the shapes it
finds; its text encoders and VAE have fixed configurations. So the U-Nets here keep every level 320
wide with few blocks (SD1.5, SD2: 7 cross-attention layers; SDXL: 31), while CLIP-L, OpenCLIP ViT-H
and bigG and the VAE are full size. Every name and shape comes from the host's own classes built on the meta
device: its U-Net and VAE, and its text encoders written out by its own saving conversion
(`process_clip_state_dict_for_saving`), so the files have exactly the layout the host writes.

Values are seeded random fp16, LeCun-scaled, drawn from one shared pool of normal numbers (cheap
to write: ~0.5 GB for SD1.5, ~2 GB for SDXL) -- the networks only have to run, not to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd2", "sdxl")
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
UNET_CONFIGS = {
    "sd15": dict(num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1], context_dim=768,
                 use_linear_in_transformer=False, num_heads=8, transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1]),
    "sd2": dict(num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1], context_dim=1024,
                use_linear_in_transformer=True, num_head_channels=64, num_heads=-1, transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1]),
    "sdxl": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 context_dim=2048, use_linear_in_transformer=True, num_head_channels=64, num_heads=-1,
                 transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
                 adm_in_channels=2816, num_classes="sequential"),
}
POOL = 1 << 24
OUT_SCALE = 0.005


def _host_layout(family: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as a meta tensor (or a real one for integer buffers), by the
    names ComfyUI saves: U-Net, VAE and text encoders from its own classes (ComfyUI must be importable)."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config_class, clip_class = {"sd15": (comfy.supported_models.SD15, comfy.sd1_clip.SD1ClipModel),
                                "sd2": (comfy.supported_models.SD20, comfy.text_encoders.sd2_clip.SD2ClipModel),
                                "sdxl": (comfy.supported_models.SDXL, comfy.sdxl_clip.SDXLClipModel)}[family]
    with torch.device("meta"):
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                         legacy=False, operations=comfy.ops.disable_weight_init, **UNET_CONFIGS[family])
        vae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
        clip = clip_class(device="meta", dtype=torch.float16)
    layout = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    layout |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    config = config_class(dict(config_class.unet_config))
    layout |= config.process_clip_state_dict_for_saving(dict(clip.state_dict()))
    return layout


def _value(name: str, like: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shape = like.shape
    if like.device.type != "meta":  # integer buffers such as position_ids are real already
        return like.clone()
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=torch.float16)
    if len(shape) == 1 and name.endswith("weight"):  # every 1-d weight is a norm's scale (GroupNorm out.0 too)
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith("bias") or len(shape) <= 1:
        return torch.zeros(shape, dtype=torch.float16)
    n = shape.numel()
    start = int(torch.randint(0, POOL, (1,), generator=gen))
    parts, left = [], n
    while left:
        take = min(left, POOL - start)
        parts.append(pool[start:start + take])
        left, start = left - take, 0
    values = parts[0] if len(parts) == 1 else torch.cat(parts)
    # LeCun scaling keeps the activations of the random nets finite; the U-Net's residual stack still
    # grows them (~10²), so its last conv is scaled down to predict noise of order one.
    scale = shape[1:].numel() ** -0.5 * (OUT_SCALE if name == "model.diffusion_model.out.2.weight" else 1.0)
    return (values.view(shape) * scale).to(torch.float16)


def host_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen)
    return {name: _value(name, like, pool, gen) for name, like in _host_layout(family).items()}


def make_host_checkpoint(path: str | Path, family: str, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    sd = host_state_dict(family, seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"modelspec.title": f"tiny {family}"})
    return path


def make_flux_like_file(path: str | Path) -> Path:
    """A small safetensors file whose keys say Flux (double/single stream blocks): not an SD checkpoint."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    names = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
             "model.diffusion_model.single_blocks.0.linear1.weight", "model.diffusion_model.img_in.weight"]
    save_file({n: torch.randn(8, 8, generator=gen).half() for n in names}, str(path))
    return Path(path)
