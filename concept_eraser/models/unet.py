"""The LDM/SGM `UNetModel` (openaimodel) of SD1.x, SD2.x and SDXL in plain torch, built from a checkpoint's own weights.

Gradient-based erasure backpropagates through the U-Net of a checkpoint file, with no host (ComfyUI, A1111)
to borrow it from. `LDMUNet`'s `state_dict()` names are the checkpoint's U-Net keys without the
``model.diffusion_model.`` prefix (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``,
``label_emb.0.0.weight``, ``out.2.weight``), so those tensors load with ``load_state_dict(strict=True)``,
and `config_from_shapes` reads the layout from the key names and shapes. The layers and their arithmetic
mirror openaimodel / attention.py as ComfyUI runs them (checked against ComfyUI in tests/test_ldm_unet.py);
options no SD checkpoint uses (scale-shift norm, res-block up/down sampling, video layers) are left out.

Parameters keep PyTorch's default initialisation: they are meant to be loaded. For large models, build
under ``torch.device("meta")`` and load with ``assign=True`` to skip initialising weights that are replaced.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

# What the shapes cannot tell: the attention heads (and ToyWorld's GroupNorm size) per family.
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd1": {"num_heads": 8},
    "sd2": {"num_head_channels": 64},
    "sdxl": {"num_head_channels": 64},
    "toyworld": {"num_head_channels": 32, "norm_groups": 8},  # the shipped model's (toyworld.build.UNET)
}
SDXL_SIZE_DIM = 256  # width of each size embedding in SDXL's `y`


@dataclass(frozen=True)
class LDMConfig:
    """The U-Net's layout, with ComfyUI's unet_config names and conventions.

    `transformer_depth` has one entry per input res block (levels flattened, 0 = no transformer after it);
    `transformer_depth_output` one per output block in ComfyUI's order, which mirrors the input blocks:
    the last output block first. `transformer_depth_middle`: ≥ 0 res block, transformer of that depth,
    res block; -1 a single res block; -2 no middle block. Heads: either `num_heads` per layer (SD1) or
    `num_head_channels` per head (SD2, SDXL)."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32
    ff_mult: int = 4

    def __post_init__(self):
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError("num_res_blocks needs one entry per level of channel_mult")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError("transformer_depth needs one entry per input res block")
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError("transformer_depth_output needs one entry per output block")
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError("set exactly one of num_heads and num_head_channels")

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer on `channels` channels, as openaimodel computes them."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def _depth(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Transformer blocks in the SpatialTransformer at `prefix` (0 when there is none)."""
    pattern = re.compile(re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
    found = [int(m.group(1)) for key in shapes if (m := pattern.match(key))]
    return max(found) + 1 if found else 0


def _first_shape(shapes: Mapping[str, tuple[int, ...]], suffix: str) -> tuple[int, ...]:
    for key, shape in shapes.items():
        if key.endswith(suffix):
            return shape
    raise ValueError(f"no tensor *{suffix}")


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], family: str) -> LDMConfig:
    """Derive the config from the U-Net's key names and shapes (prefix already stripped). `family` is
    "sd1" / "sd2" / "sdxl" / "toyworld" and decides only what shapes cannot tell: the attention heads
    (sd1: 8 heads; sd2/sdxl: 64 channels per head; toyworld: 32 channels per head, and 8 GroupNorm groups).
    Another ToyWorld build's own values are in its metadata (`toyworld.unet.ldm_config`)."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"family must be one of {sorted(FAMILY_DEFAULTS)}, not {family!r}")
    conv_in = shapes["input_blocks.0.0.weight"]
    model_channels = conv_in[0]
    channel_mult, num_res_blocks, depth = [], [0], []
    block = 1
    while f"input_blocks.{block}.0.op.weight" in shapes or f"input_blocks.{block}.0.in_layers.0.weight" in shapes:
        if f"input_blocks.{block}.0.op.weight" in shapes:  # a downsample closes the level
            num_res_blocks.append(0)
        else:
            mult = shapes[f"input_blocks.{block}.0.out_layers.3.weight"][0] // model_channels
            if num_res_blocks[-1] == 0:
                channel_mult.append(mult)
            num_res_blocks[-1] += 1
            depth.append(_depth(shapes, f"input_blocks.{block}.1."))
        block += 1
    outputs = sum(n + 1 for n in num_res_blocks)
    depth_output = tuple(_depth(shapes, f"output_blocks.{i}.1.") for i in reversed(range(outputs)))
    if "middle_block.1.proj_in.weight" in shapes:
        depth_middle = _depth(shapes, "middle_block.1.")
    else:
        depth_middle = -1 if "middle_block.0.in_layers.0.weight" in shapes else -2
    to_k = [shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")]
    if not to_k:
        raise ValueError("the U-Net has no cross-attention")
    proj_in, ff_out = _first_shape(shapes, ".proj_in.weight"), _first_shape(shapes, ".ff.net.2.weight")
    adm = shapes.get("label_emb.0.0.weight")
    return LDMConfig(
        in_channels=conv_in[1],
        out_channels=shapes["out.2.weight"][0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=tuple(num_res_blocks),
        transformer_depth=tuple(depth),
        transformer_depth_middle=depth_middle,
        transformer_depth_output=depth_output,
        context_dim=to_k[0][1],
        use_linear_in_transformer=len(proj_in) == 2,
        adm_in_channels=adm[1] if adm is not None else None,
        ff_mult=ff_out[1] // ff_out[0],
        **FAMILY_DEFAULTS[family],
    )


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """LDM's sinusoidal embedding [cos, sin] of (possibly fractional) timesteps [b] → [b, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_vector(pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SDXL's `y`: the pooled bigG embedding [b, 1280] ⊕ the embeddings (256 each) of the pixel sizes
    (height, width, crop top 0, crop left 0, target height, target width) → [b, 2816], as ComfyUI's
    SDXL.encode_adm computes it (target = original size, no crop)."""
    sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=pooled.device)
    sizes = timestep_embedding(sizes, SDXL_SIZE_DIM).flatten().to(pooled.dtype)
    return torch.cat([pooled, sizes.expand(pooled.shape[0], -1)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """`to_q` / `to_k` / `to_v` without bias, `to_out.0` with bias; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape

        # reshape(b, -1, ...): forward hooks on to_k / to_v may add tokens, so K/V need not have the context's length
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)  # self-attention
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)  # cross-attention: K/V read the text
        self.ff = FeedForward(dim, ff_mult)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image → tokens → transformer blocks → image, plus the input: proj_in / proj_out are 1×1 convolutions
    (SD1) or linear layers on the tokens (SD2, SDXL)."""

    def __init__(self, channels: int, depth: int, cfg: LDMConfig):
        super().__init__()
        heads, head_dim = cfg.heads(channels)
        inner = heads * head_dim
        self.linear = cfg.use_linear_in_transformer
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if self.linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, cfg.context_dim, heads, head_dim, cfg.ff_mult) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if self.linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(b, -1, height, width)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        # to the next skip connection's size: odd sizes were rounded up on the way down
        size = size or (2 * x.shape[2], 2 * x.shape[3])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """LDM's TimestepEmbedSequential: each layer gets the inputs it takes."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class LDMUNet(nn.Module):
    """ε/v-prediction U-Net: forward(x [b, c, h, w], timesteps [b] in [0, 1000), context [b, tokens, context_dim],
    y [b, adm_in_channels] for SDXL)."""

    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.config = cfg
        groups, ch = cfg.norm_groups, cfg.model_channels
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = None
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(),
                                                         nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skips, depths = [ch], iter(cfg.transformer_depth)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, mult * cfg.model_channels, emb, groups)]
                ch = mult * cfg.model_channels
                if depth := next(depths):
                    layers.append(SpatialTransformer(ch, depth, cfg))
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skips.append(ch)
        self.middle_block = None
        if cfg.transformer_depth_middle >= -1:
            middle: list[nn.Module] = [ResBlock(ch, ch, emb, groups)]
            if cfg.transformer_depth_middle >= 0:
                middle += [SpatialTransformer(ch, cfg.transformer_depth_middle, cfg), ResBlock(ch, ch, emb, groups)]
            self.middle_block = Block(*middle)
        self.output_blocks = nn.ModuleList()
        depths = reversed(cfg.transformer_depth_output)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skips.pop(), mult * cfg.model_channels, emb, groups)]
                ch = mult * cfg.model_channels
                if depth := next(depths):
                    layers.append(SpatialTransformer(ch, depth, cfg))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.label_emb is None):
            raise ValueError("y is required by, and only by, a U-Net with label_emb (SDXL)")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            hs.append(x)
        if self.middle_block is not None:
            x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, hs.pop()], dim=1)
            x = block(x, emb, context, tuple(hs[-1].shape[2:]) if hs else None)
        return self.out(x)
