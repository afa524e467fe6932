"""Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3), as Flux is trained and sampled.

x_t = (1 − t) x₀ + t ε for t ∈ [0, 1] (0: the image in [-1, 1], 1: noise); the model predicts the
velocity v = ε − x₀ under a mean-squared loss, with t drawn logit-normally (SD3's default, which spends
the steps on the middle noise levels where shapes form). Sampling is Euler from t = 1 to 0 with
classifier-free guidance v = v_u + s (v_c − v_u).
"""

from __future__ import annotations

from typing import Callable

import torch


def loss(model, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Velocity-matching loss on one batch; times and noise drawn from `gen`."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = t[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    return (model(xt, t, context, pooled) - (noise - x0)).pow(2).mean()


@torch.no_grad()
def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    pooled: torch.Tensor,
    uncond: torch.Tensor,
    uncond_pooled: torch.Tensor,
    gen: torch.Generator,
    steps: int,
    guidance: float,
    size: int = 16,
) -> torch.Tensor:
    """Euler steps over t = 1, 1 − 1/steps, …, 0 from seeded noise; returns images in [0, 1].

    `velocity(x, t, context, pooled)` is the model; `context` [n, tokens, d] and `pooled` [n, d] the prompts'
    features, `uncond` [1, tokens, d] and `uncond_pooled` [1, d] the empty prompt's."""
    n = context.shape[0]
    x = torch.randn(n, 3, size, size, generator=gen)
    times = torch.linspace(1.0, 0.0, steps + 1)
    both = torch.cat([context, uncond.expand(n, -1, -1)])
    both_pooled = torch.cat([pooled, uncond_pooled.expand(n, -1)])
    for t, t_next in zip(times[:-1], times[1:]):
        v_c, v_u = velocity(torch.cat([x, x]), t.repeat(2 * n), both, both_pooled).chunk(2)
        x = x + (t_next - t) * (v_u + guidance * (v_c - v_u))
    return (x.clamp(-1, 1) + 1) / 2
