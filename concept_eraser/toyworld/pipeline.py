"""Sample a ToyWorld checkpoint file, optionally with an erasure patch applied to its weights.

The U-Net and the text encoder are rebuilt from the file through the same `CheckpointModel` and
`CheckpointTextEncoder` the solver uses, and every weight a patch edits (cross-attention K/V, and
text-encoder projections for ErasePro) is read through `ErasurePatch.apply_to`: what is measured
is exactly the edited model that `erase --format checkpoint` would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import CheckpointModel
from ..encoding import CheckpointTextEncoder
from ..errors import UnsupportedModelError
from ..models.arch import UNET_PREFIX
from ..patch import ErasurePatch
from . import diffusion
from .unet import ToyUNet, UNetConfig

WEIGHTS = Path(__file__).parent / "weights"
CHECKPOINT = WEIGHTS / "toyworld.safetensors"
STEPS, GUIDANCE = 20, 5.0  # DDIM steps and classifier-free guidance scale (5: shapes crisper than at 3)


class ToyWorldPipeline:
    def __init__(self, model: CheckpointModel, patch: ErasurePatch | None = None):
        if model.arch.family != "toyworld":
            raise UnsupportedModelError(f"{model.path.name} is {model.arch.title}, not a ToyWorld checkpoint")
        reader = model.reader

        def load(key: str) -> torch.Tensor:
            weight = reader.get(key)
            return patch.apply_to(key, weight) if patch is not None and key in patch.edits else weight

        self.unet = ToyUNet(UNetConfig.from_dict(model.arch.extra["toyworld"]["unet"])).eval()
        self.unet.load_state_dict({k[len(UNET_PREFIX):]: load(k).float() for k in reader.keys()
                                   if k.startswith(UNET_PREFIX)})
        self.text = CheckpointTextEncoder(model.arch, reader.keys(), load)
        self.uncond = self.text.encode([""]).features

    @classmethod
    def from_file(cls, path: str | Path = CHECKPOINT, patch: ErasurePatch | None = None) -> "ToyWorldPipeline":
        return cls(CheckpointModel(path), patch)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text.encode(list(prompts)).features

    @torch.no_grad()
    def sample_features(self, context: torch.Tensor, seed: int, steps: int = STEPS,
                        guidance: float = GUIDANCE, batch: int = 64) -> torch.Tensor:
        """Images [n, 3, 16, 16] in [0, 1] for text features [n, tokens, d]; sample i's noise
        depends only on (seed, i), so the same seed compares models sample by sample."""
        images = []
        for start in range(0, len(context), batch):
            gen = torch.Generator().manual_seed(seed * 7919 + start)
            images.append(diffusion.ddim_sample(self.unet, context[start:start + batch], self.uncond, gen,
                                                steps, guidance))
        return torch.cat(images)

    def sample(self, prompts: Sequence[str], seed: int, **kwargs) -> torch.Tensor:
        return self.sample_features(self.encode(prompts), seed, **kwargs)
