"""ToyWorld-Flux's denoiser: a small Flux-style MMDiT with Black Forest Labs' key names.

The structure of Flux.1 (ComfyUI `comfy/ldm/flux`), scaled down: 2×2 patches of the 16×16 RGB image
→ `img_in`; the timestep's sinusoidal embedding → `time_in`; the pooled text embedding → `vector_in`
(their sum is the modulation vector); per-token text features → `txt_in`; double-stream blocks (image
and text each with their own modulation, QKV, QK-RMSNorm, projection and MLP, one joint attention),
then single-stream blocks over [text, image] (fused `linear1` = QKV + MLP in, `linear2`), then
`final_layer`. RoPE on (0, row, column) positions, text at position 0, as Flux does. No guidance
embedding (Flux-dev's `guidance_in`): guidance here is classifier-free, as in Flux-schnell's training
and SD3. Modulations and the output layer start at zero (adaLN-Zero, DiT), so every block starts as the
identity; that is what lets a model this small train in minutes.

Key names, e.g. ``double_blocks.0.txt_attn.qkv.weight``, ``single_blocks.1.linear1.weight``,
``vector_in.in_layer.weight``, are the ones the solver and the hosts read in real Flux files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..encoding import EncodedPrompts
from . import flow


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 3
    patch: int = 2
    hidden: int = 96
    heads: int = 3
    depth: int = 2  # double-stream blocks
    depth_single: int = 2  # single-stream blocks
    mlp_ratio: float = 4.0
    context_dim: int = 128  # per-token text features (txt_in's input)
    vec_dim: int = 128  # pooled text embedding (vector_in's input)
    axes_dim: tuple[int, ...] = (8, 12, 12)  # RoPE widths for (index, row, column); sum = hidden / heads
    theta: int = 10_000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FluxConfig":
        return cls(**{**data, "axes_dim": tuple(data["axes_dim"])})


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Flux's sinusoidal embedding of t ∈ [0, 1] scaled by 1000: [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_rotations(positions: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Per position and rotated pair (cos, sin) [tokens, head_dim / 2, 2]: each axis's coordinate turns
    its own slice of the head's pairs at frequencies theta^(-2i/d)."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = positions[:, axis, None].double() * omega[None]
        parts.append(torch.stack([angle.cos(), angle.sin()], dim=-1))
    return torch.cat(parts, dim=1).float()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [b, heads, tokens, head_dim] by rot's angles."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = rot[..., 0], rot[..., 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Holds the weights only (`qkv`, `norm`, `proj`): the double block runs the joint attention."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)


class Modulation(nn.Module):
    """shift, scale, gate (×2 in a double block) from the modulation vector; zero at initialisation."""

    def __init__(self, hidden: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(hidden, 3 * sets * hidden)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec))[:, None].chunk(3 * self.sets, dim=-1)


def _heads(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, tokens, 3·hidden] → [3, b, heads, tokens, head_dim]."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _attention(q, k, v, rot) -> torch.Tensor:
    q, k = apply_rope(q, rot), apply_rope(k, rot)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.heads = cfg.heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(cfg.hidden, 2))
            setattr(self, f"{stream}_attn", SelfAttention(cfg.hidden, cfg.heads))
            setattr(self, f"{stream}_mlp", _mlp(cfg.hidden, cfg.mlp_ratio))

    def forward(self, img, txt, vec, rot):
        streams = {"txt": txt, "img": img}
        mods, qkv = {}, []
        for name, x in streams.items():
            mods[name] = getattr(self, f"{name}_mod")(vec)
            shift, scale = mods[name][0], mods[name][1]
            attn = getattr(self, f"{name}_attn")
            q, k, v = _heads(attn.qkv(_norm(x) * (1 + scale) + shift), self.heads)
            qkv.append((attn.norm.query_norm(q), attn.norm.key_norm(k), v))
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkv))  # text first, as Flux
        joint = _attention(q, k, v, rot)
        outs = {"txt": joint[:, :txt.shape[1]], "img": joint[:, txt.shape[1]:]}
        for name, x in streams.items():
            _, _, gate1, shift2, scale2, gate2 = mods[name]
            x = x + gate1 * getattr(self, f"{name}_attn").proj(outs[name])
            streams[name] = x + gate2 * getattr(self, f"{name}_mlp")(_norm(x) * (1 + scale2) + shift2)
        return streams["img"], streams["txt"]


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.hidden, self.heads = cfg.hidden, cfg.heads
        self.mlp_hidden = int(cfg.hidden * cfg.mlp_ratio)
        self.linear1 = nn.Linear(cfg.hidden, 3 * cfg.hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(cfg.hidden + self.mlp_hidden, cfg.hidden)
        self.norm = QKNorm(cfg.hidden // cfg.heads)
        self.modulation = Modulation(cfg.hidden, 1)

    def forward(self, x, vec, rot):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_norm(x) * (1 + scale) + shift).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        attn = _attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rot)
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.linear = nn.Linear(cfg.hidden, cfg.patch**2 * cfg.in_channels)
        for layer in (self.adaLN_modulation[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(_norm(x) * (1 + scale) + shift)


class ToyFlux(nn.Module):
    """Velocity prediction: forward(x [b,3,H,W], t [b] ∈ [0, 1] (1 = noise), context [b, tokens, context_dim],
    pooled [b, vec_dim]) → v ≈ noise − image (rectified flow, `flow`)."""

    GUIDANCE = 5.0  # classifier-free guidance; all three attributes right: 94 % against 92 % at 7 (README)

    def __init__(self, cfg: FluxConfig = FluxConfig()):
        super().__init__()
        if cfg.hidden % cfg.heads or sum(cfg.axes_dim) != cfg.hidden // cfg.heads:
            raise ValueError(f"RoPE axes {cfg.axes_dim} must add up to the head width {cfg.hidden // cfg.heads}")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels * cfg.patch**2, cfg.hidden)
        self.time_in = MLPEmbedder(256, cfg.hidden)
        self.vector_in = MLPEmbedder(cfg.vec_dim, cfg.hidden)
        self.txt_in = nn.Linear(cfg.context_dim, cfg.hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(cfg)

    @classmethod
    def from_metadata(cls, config: dict) -> "ToyFlux":
        return cls(FluxConfig.from_dict(config["flux"]))

    def sample(self, cond: EncodedPrompts, uncond: EncodedPrompts, gen, steps: int, guidance: float) -> torch.Tensor:
        """Rectified-flow Euler steps with classifier-free guidance, images in [0, 1]."""
        return flow.euler_sample(self, cond.features, cond.pooled, uncond.features, uncond.pooled, gen, steps,
                                 guidance)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[b, c, H, W] → [b, (H/p)(W/p), c·p·p], channels then patch rows then columns (ComfyUI's order)."""
        b, c, h, w = x.shape
        p = self.cfg.patch
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, p = tokens.shape[0], self.cfg.patch
        x = tokens.view(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, -1, h, w)

    def rotations(self, text_tokens: int, h: int, w: int) -> torch.Tensor:
        rows, cols = torch.meshgrid(torch.arange(h // self.cfg.patch), torch.arange(w // self.cfg.patch),
                                    indexing="ij")
        image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        positions = torch.cat([torch.zeros(text_tokens, 3, dtype=image.dtype), image])
        return rope_rotations(positions, self.cfg.axes_dim, self.cfg.theta)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        img = self.img_in(self.patchify(x))
        txt = self.txt_in(context)
        vec = self.time_in(timestep_embedding(t)) + self.vector_in(pooled)
        rot = self.rotations(txt.shape[1], h, w)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rot)
        joint = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            joint = block(joint, vec, rot)
        return self.unpatchify(self.final_layer(joint[:, txt.shape[1]:], vec), h, w)
