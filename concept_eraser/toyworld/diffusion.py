"""Noise schedule, training loss and a deterministic DDIM sampler with classifier-free guidance.

Pixel-space ε-prediction on images scaled to [-1, 1], cosine schedule (Nichol & Dhariwal 2021)
over T = 1000 steps; the loss is weighted by min(SNR, 5) / SNR ("min-SNR-γ", Hang et al. 2023),
which spends the training budget on the noise levels where shapes form rather than on denoising
nearly clean images.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..denoiser import ddim_step

T = 1000
MIN_SNR = 5.0
X0_CLIP = 1.0  # images live in [-1, 1]: the sampler clips its x0 prediction there


def alphas_cumprod(steps: int = T) -> torch.Tensor:
    s = 0.008
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


ALPHA_BAR = alphas_cumprod()


def loss(unet, x0: torch.Tensor, context: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """min-SNR-weighted ε-prediction loss on one batch; noise and timesteps drawn from `gen`."""
    t = torch.randint(0, T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = ALPHA_BAR[t][:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    snr = ALPHA_BAR[t] / (1 - ALPHA_BAR[t])
    weight = snr.clamp(max=MIN_SNR) / snr
    per_sample = (unet(xt, t, context) - noise).pow(2).mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


@torch.no_grad()
def ddim_sample(
    eps: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    uncond: torch.Tensor,
    gen: torch.Generator,
    steps: int,
    guidance: float,
    size: int = 16,
) -> torch.Tensor:
    """DDIM (η = 0) from seeded noise; returns images in [0, 1].

    `eps(x, t, context)` is the noise predictor, `context` [n, tokens, d] the prompt features and
    `uncond` [1, tokens, d] the empty prompt's; guidance ε = ε_u + s (ε_c − ε_u)."""
    n = context.shape[0]
    x = torch.randn(n, 3, size, size, generator=gen)
    times = torch.linspace(T - 1, 0, steps).round().long()
    both = torch.cat([context, uncond.expand(n, -1, -1)])
    for i, t in enumerate(times):
        e_c, e_u = eps(torch.cat([x, x]), t.repeat(2 * n), both).chunk(2)
        e = e_u + guidance * (e_c - e_u)
        a_next = ALPHA_BAR[times[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        x = ddim_step(x, e, ALPHA_BAR[t], a_next, X0_CLIP)
    return (x.clamp(-1, 1) + 1) / 2
