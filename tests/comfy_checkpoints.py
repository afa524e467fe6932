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


# ---- Flux.1 and SD3.5 (MMDiT) ----------------------------------------------------------------------------
# ComfyUI fixes part of these models' configurations: Flux's transformer is 3072 wide with 24 heads of 128 and reads
# 4096-wide T5 features (comfy/model_detection.py), so the tiny Flux keeps those widths with one double-stream block
# and no single-stream one (ComfyUI counts them from the keys); SD3's width is 64 × depth, so depth 2 gives a
# 128-wide MMDiT with two joint blocks. The text encoders are ComfyUI's own classes shrunk through its own model
# options (comfy/sd1_clip.py `SDClipModel` overrides its fixed JSON configuration with `<encoder>_model_config`;
# for separate files `load_clip` rebuilds the CLIP ones from `model_config`, comfy/text_encoders/long_clipl.py):
# T5-XXL keeps its 4096 width (what both transformers read) with two blocks of two heads; CLIP-L and CLIP-G keep
# their depths (the host's loaders tell CLIP-G from CLIP-L by its layer 30) at width 64, one head of 64 as theirs,
# so Flux's vector_in reads 64 values and SD3's y_embedder 128 (read from the files' shapes, as ComfyUI does).
NARROW_CLIP = {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 64, "projection_dim": 64}
TINY_TEXT_ENCODERS = {
    "model_config": NARROW_CLIP, "clip_l_model_config": NARROW_CLIP, "clip_g_model_config": NARROW_CLIP,
    "t5xxl_model_config": {"num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 32},
}
FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=64,
                   context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0,
                   axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
SD3_CONFIG = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=128,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 128}},
                  pos_embed_max_size=32, num_patches=1024, qk_norm="rms", pos_embed_scaling_factor=None,
                  x_block_self_attn_layers=[])
# file name (the releases') → what it holds; the text encoders serve both transformers, as users share them
MMDIT_FILES = {"flux1-dev.safetensors": "flux", "sd3.5_large.safetensors": "sd3", "clip_l.safetensors": "clip_l",
               "clip_g.safetensors": "clip_g", "t5xxl_fp16.safetensors": "t5xxl", "ae.safetensors": "flux_vae"}


def tiny_text_encoder_options() -> dict:
    """The model options that shrink Flux's and SD3's text encoders (copies: the host's loader writes into them)."""
    return {k: dict(v) for k, v in TINY_TEXT_ENCODERS.items()}


def _layout(what: str) -> dict[str, torch.Tensor]:
    """The tensors of one file, as meta tensors by the names ComfyUI loads: a transformer bare (diffusion-model
    files), a text encoder as ComfyUI's CLIPSave writes one (transformers' names), Flux's VAE in TAESD's layout
    with 16 latent channels (the host loads it as a VAE)."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.taesd.taesd import TAESD

    ops, options = comfy.ops.disable_weight_init, tiny_text_encoder_options()
    encoders = {"clip_l": comfy.sd1_clip.SDClipModel, "clip_g": comfy.sdxl_clip.SDXLClipG,
                "t5xxl": comfy.text_encoders.sd3_clip.T5XXLModel}
    if what in encoders:
        state = encoders[what](device="meta", dtype=torch.float16, model_options=options).transformer.state_dict()
        return {k: v for k, v in state.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        module = {"flux": lambda: Flux(operations=ops, **FLUX_CONFIG),
                  "sd3": lambda: MMDiT(operations=ops, **SD3_CONFIG),
                  "flux_vae": lambda: TAESD(latent_channels=16)}[what]()
    return module.state_dict()


def _values(layout: dict[str, torch.Tensor], dtype, gen: torch.Generator, pool: torch.Tensor) -> dict:
    """As `_value`, in `dtype` (the pool cast once: these files are large), with RMSNorm scales at one."""
    cast = pool.to(dtype)
    out = {}
    for name, like in layout.items():
        shape = like.shape
        if len(shape) <= 1 or like.device.type != "meta":
            out[name] = (torch.ones(shape) if name.endswith(".scale") else _value(name, like, pool, gen)).to(dtype)
            continue
        start, left, parts = int(torch.randint(0, POOL, (1,), generator=gen)), shape.numel(), []
        while left:
            parts.append(cast[start:start + left])
            left, start = left - len(parts[-1]), 0
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        out[name] = values.view(shape).mul(shape[1:].numel() ** -0.5)
    return out


def make_mmdit_files(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """The files a Flux or SD3 user has, in `folder` (MMDIT_FILES): the diffusion models alone, with bare BFL / SAI
    names (ComfyUI's UNETLoader, models/diffusion_models), the text encoders as files of their own (DualCLIPLoader,
    TripleCLIPLoader, models/text_encoders) and Flux's VAE (VAELoader). Returns {name: path}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen)
    # as the releases are: Flux in bf16, SD3.5 and the text encoders in fp16
    dtypes = {"flux": torch.bfloat16, "flux_vae": torch.float32}
    out = {}
    for name, what in MMDIT_FILES.items():
        tensors = _values(_layout(what), dtypes.get(what, torch.float16), gen, pool)
        path = folder / name
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
                  metadata={"modelspec.title": f"tiny {what}"})
        partial.rename(path)
        out[name] = path
    return out
