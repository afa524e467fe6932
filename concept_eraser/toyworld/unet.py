"""ToyWorld's U-Net: a small pixel-space configuration of the LDM U-Net (`models.unet.LDMUNet`).

Three input channels (RGB, no VAE), one residual block per level and, on the levels with attention, a
self- and cross-attention transformer of depth one after every residual block (SD1 likewise leaves one
level without attention); linear proj_in/proj_out as in SD2/SDXL. Its state-dict keys are LDM's, e.g.
``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``, the names the solver's adapters read.
`UNetConfig` is this model's own description, stored in the checkpoint's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..encoding import EncodedPrompts
from ..models.unet import LDMConfig, LDMUNet
from . import diffusion


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    channels: tuple[int, ...] = (16, 32, 64)  # per resolution level (16×16, 8×8, 4×4)
    attention: tuple[bool, ...] = (False, True, True)  # a spatial transformer after each res block of the level
    context_dim: int = 128
    head_dim: int = 32
    ff_mult: int = 2
    groups: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        return cls(**{**data, "channels": tuple(data["channels"]), "attention": tuple(data["attention"])})


def ldm_config(cfg: UNetConfig) -> LDMConfig:
    """The LDM U-Net layout this ToyWorld configuration describes."""
    base = cfg.channels[0]
    if any(width % base for width in cfg.channels):
        raise ValueError(f"every level's width must be a multiple of the first's: {cfg.channels}")
    depth = tuple(int(a) for a in cfg.attention)
    return LDMConfig(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        model_channels=base,
        channel_mult=tuple(width // base for width in cfg.channels),
        num_res_blocks=(1,) * len(cfg.channels),
        transformer_depth=depth,
        transformer_depth_middle=1,
        transformer_depth_output=tuple(d for d in depth for _ in range(2)),  # two output blocks per level
        context_dim=cfg.context_dim,
        num_head_channels=cfg.head_dim,
        use_linear_in_transformer=True,
        norm_groups=cfg.groups,
        ff_mult=cfg.ff_mult,
    )


class ToyUNet(LDMUNet):
    """ε-prediction U-Net: forward(x [b,3,H,W], t [b], context [b, tokens, context_dim])."""

    GUIDANCE = 5.0  # classifier-free guidance scale: shapes crisper than at 3

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__(ldm_config(cfg))
        self.cfg = cfg

    @classmethod
    def from_metadata(cls, config: dict) -> "ToyUNet":
        return cls(UNetConfig.from_dict(config["unet"]))

    def sample(self, cond: EncodedPrompts, uncond: EncodedPrompts, gen, steps: int, guidance: float) -> torch.Tensor:
        """DDIM with classifier-free guidance, images in [0, 1]."""
        return diffusion.ddim_sample(self, cond.features, uncond.features, gen, steps, guidance)
