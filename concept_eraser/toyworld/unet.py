"""A small pixel-space U-Net with Stable Diffusion's module layout, so its state-dict keys are LDM's.

`input_blocks` / `middle_block` / `output_blocks`, `ResBlock` (in_layers, emb_layers, out_layers,
skip_connection), `SpatialTransformer` (norm, proj_in, transformer_blocks.N.{attn1, attn2, ff},
proj_out), `time_embed`, `out`: the key names the solver's adapters read, e.g.
``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``. One residual block per level and,
on the levels with attention, a self- and cross-attention transformer after every residual block
(SD1 likewise leaves one level without attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


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


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, context):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """`to_q` / `to_k` / `to_v` without bias and `to_out.0` with bias, as in SD's CrossAttention."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, c = x.shape
        split = lambda t: t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, head_dim)  # self-attention
        self.attn2 = Attention(dim, context_dim, head_dim)  # cross-attention: K/V read the text
        self.ff = FeedForward(dim, ff_mult)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)  # SD2/SDXL's linear projection
        block = BasicTransformerBlock(dim, cfg.context_dim, cfg.head_dim, cfg.ff_mult)
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, emb, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, emb, context):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Conv(nn.Conv2d):
    def forward(self, x, emb=None, context=None):
        return super().forward(x)


class Step(nn.Sequential):
    """LDM's TimestepEmbedSequential: every child gets (x, emb, context)."""

    def forward(self, x, emb, context):
        for layer in self:
            x = layer(x, emb, context)
        return x


class ToyUNet(nn.Module):
    """ε-prediction U-Net: forward(x [b,3,H,W], t [b], context [b, tokens, context_dim])."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        emb = 4 * ch[0]
        self.time_embed = nn.Sequential(nn.Linear(ch[0], emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Step(Conv(cfg.in_channels, ch[0], 3, padding=1))])
        skips, cur = [ch[0]], ch[0]
        for level, width in enumerate(ch):
            self.input_blocks.append(Step(ResBlock(cur, width, emb, cfg.groups),
                                          *([SpatialTransformer(width, cfg)] if cfg.attention[level] else [])))
            cur = width
            skips.append(cur)
            if level < len(ch) - 1:
                self.input_blocks.append(Step(Downsample(cur)))
                skips.append(cur)
        self.middle_block = Step(ResBlock(cur, cur, emb, cfg.groups), SpatialTransformer(cur, cfg),
                                 ResBlock(cur, cur, emb, cfg.groups))
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(ch))):
            for i in range(2):  # LDM: num_res_blocks + 1 output blocks per level
                layers = [ResBlock(cur + skips.pop(), width, emb, cfg.groups)]
                if cfg.attention[level]:
                    layers.append(SpatialTransformer(width, cfg))
                cur = width
                if level and i == 1:
                    layers.append(Upsample(cur))
                self.output_blocks.append(Step(*layers))
        self.out = nn.Sequential(nn.GroupNorm(cfg.groups, cur), nn.SiLU(),
                                 nn.Conv2d(cur, cfg.in_channels, 3, padding=1))

    def forward(self, x, t, context):
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels[0]))
        hs = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            hs.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = block(torch.cat([x, hs.pop()], dim=1), emb, context)
        return self.out(x)
