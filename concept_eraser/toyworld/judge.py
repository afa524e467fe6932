"""The judge: a small CNN that reads a 16×16 image's shape, colour and background, or says "none".

Each head has one class more than its attribute has values: "none". It is trained on clean
renders and on degraded ones whose labels say what is no longer there — a blurred or shapeless
blob, two shapes ghosted over each other, no object at all, an object in an in-between colour,
pure noise — because erasure produces exactly such images and a judge without that outcome
calls most blobs circles. Predictions under a confidence threshold also count as "none".
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import world

HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "background": world.BACKGROUNDS}
NONE = "none"
THRESHOLD = 0.5  # below this probability a verdict is "none"
STEPS, BATCH, LR = 1200, 128, 2e-3


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.ReLU(),  # 8×8
            nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.ReLU(),  # 4×4
            nn.Flatten(), nn.Linear(96 * 16, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values) + 1) for name, values in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images [n, 3, 16, 16] in [0, 1]."""
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def verdicts(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Per image {"shape": ..., "colour": ..., "background": ...}, each a value or "none"."""
        out = [dict() for _ in range(len(images))]
        for name, logits in self(images).items():
            prob, index = logits.softmax(-1).max(-1)
            for i, (p, k) in enumerate(zip(prob.tolist(), index.tolist())):
                values = HEADS[name]
                out[i][name] = values[k] if k < len(values) and p >= THRESHOLD else NONE
        return out


def _blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a supersampled mask; `sigma` in output pixels."""
    s = sigma * world.SUPERSAMPLE
    radius = int(3 * s)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-x**2 / (2 * s * s))
    k = k / k.sum()
    m = F.conv2d(mask[None, None], k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(m, k.view(1, 1, -1, 1), padding=(radius, 0))[0, 0]


def degraded_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images and labels (index len(values) = "none"): about half clean, half degraded."""
    px, py = world.supersampled_grid()
    scenes = world.random_scenes(gen, n)
    others = world.random_scenes(gen, n)
    kinds = torch.randint(0, 12, (n,), generator=gen).tolist()
    u = torch.rand(n, 8, generator=gen).tolist()
    images = torch.empty(n, 3, world.SIZE, world.SIZE)
    labels = {name: torch.empty(n, dtype=torch.long) for name in HEADS}
    for i, (s, o, kind, r) in enumerate(zip(scenes, others, kinds, u)):
        shape, colour, background = world.SHAPES.index(s.shape), world.COLOURS.index(s.colour), \
            world.BACKGROUNDS.index(s.background)
        grey = world.background_layer(s.background, px, py)
        mask = world.object_mask(s, px, py)
        rgb = world.RGB[s.colour]
        if kind == 6:  # blurred object: colour and background still readable, shape not
            mask = _blur(mask, 1.0 + 1.5 * r[0])
            shape = len(world.SHAPES)
        elif kind == 7:  # shapeless blob: a few overlapping discs of random size
            mask = torch.zeros_like(mask)
            for j in range(3):
                cx = s.cx + (r[1 + j] - 0.5) * 6
                cy = s.cy + (r[(4 + j) % 8] - 0.5) * 6
                mask = torch.maximum(mask, ((px - cx) ** 2 + (py - cy) ** 2 <= (2 + 2.5 * r[j]) ** 2).double())
            mask = _blur(mask, 0.3 + 0.7 * r[7])
            shape = len(world.SHAPES)
        elif kind == 8:  # two different shapes ghosted over each other
            if o.shape != s.shape:
                mask = 0.5 * mask + 0.5 * world.object_mask(o, px, py)
                shape = len(world.SHAPES)
        elif kind == 9:  # no object at all
            mask = torch.zeros_like(mask)
            shape, colour = len(world.SHAPES), len(world.COLOURS)
        elif kind == 10:  # an in-between colour: halfway to another colour or to grey
            if o.colour != s.colour:
                mix = world.RGB[o.colour] if r[0] < 0.6 else (0.46, 0.46, 0.46)
                rgb = tuple(0.5 * a + 0.5 * b for a, b in zip(rgb, mix))
                colour = len(world.COLOURS)
        images[i] = world.composite(grey, mask, rgb)
        if kind == 11:  # noise: nothing recognisable
            images[i] = torch.rand(3, world.SIZE, world.SIZE, generator=gen)
            shape, colour, background = len(world.SHAPES), len(world.COLOURS), len(world.BACKGROUNDS)
        labels["shape"][i], labels["colour"][i], labels["background"][i] = shape, colour, background
    # Samples are never exactly clean renders: a little pixel noise keeps the judge from relying on it.
    noise = torch.randn(images.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.04
    return (images + noise).clamp(0, 1), labels


def train(seed: int, steps: int = STEPS, log=print) -> Judge:
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed + 7)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, labels = degraded_batch(gen, BATCH)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"judge step {step}: loss {loss.item():.4f}")
    return judge.eval()


def accuracy(judge: Judge, seed: int, n: int = 1000) -> dict[str, float]:
    """Share of fresh clean renders whose verdict is exactly right, per head and for all three."""
    gen = torch.Generator().manual_seed(seed)
    scenes = world.random_scenes(gen, n)
    verdicts = judge.verdicts(world.render(scenes))
    right = {k: [getattr(s, k) == v[k] for s, v in zip(scenes, verdicts)] for k in HEADS}
    right["all"] = [all(r) for r in zip(*right.values())]
    return {k: sum(v) / n for k, v in right.items()}


def stage_judge(out: Path, seed: int, log) -> Judge:
    """Build stage: train (or reload) the judge and log its held-out accuracy."""
    path = out / "judge.pt"
    judge = Judge()
    if path.exists():
        judge.load_state_dict(torch.load(path))
        return judge.eval()
    start = time.time()
    judge = train(seed, log=log)
    torch.save(judge.state_dict(), path)
    log(f"judge trained in {time.time() - start:.0f} s; held-out accuracy {accuracy(judge, seed + 1)}")
    return judge


def load(path: str | Path | None = None) -> Judge:
    """The judge shipped with the package (or the one at `path`)."""
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path or Path(__file__).parent / "weights" / "judge.safetensors")))
    return judge.eval()
