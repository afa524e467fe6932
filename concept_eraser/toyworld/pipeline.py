"""Sample a ToyWorld checkpoint file, optionally with an erasure patch applied to its weights.

The denoiser (ToyWorld's U-Net or ToyWorld-Flux's MMDiT) and the text encoder are rebuilt from the file through
the same `CheckpointModel` and `CheckpointTextEncoder` the solver uses, and every weight a patch edits
(cross-attention K/V or the MMDiT's `txt_in` / `vector_in`, and text-encoder projections for ErasePro) is read
through `ErasurePatch.apply_to`: what is measured is exactly the edited model that `erase --format checkpoint`
would write.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import CheckpointModel
from ..encoding import CheckpointTextEncoder, EncodedPrompts
from ..errors import UnsupportedModelError
from ..models.arch import UNET_PREFIX
from ..patch import ErasurePatch
from .mmdit import ToyFlux
from .unet import ToyUNet

WEIGHTS = Path(__file__).parent / "weights"
CHECKPOINT = WEIGHTS / "toyworld.safetensors"
FLUX_CHECKPOINT = WEIGHTS / "toyworld_flux.safetensors"
STEPS = 20  # sampler steps (DDIM for the U-Net, Euler for the MMDiT)
# Each ToyWorld family's denoiser: built from the checkpoint's metadata, sampled by its own `sample`
# (its sampler and default guidance are properties of the model, as its training objective is).
DENOISERS = {"toyworld": ToyUNet, "toyworld_flux": ToyFlux}


class ToyWorldPipeline:
    def __init__(self, model: CheckpointModel, patch: ErasurePatch | None = None):
        denoiser = DENOISERS.get(model.arch.family)
        if denoiser is None:
            raise UnsupportedModelError(f"{model.path.name} is {model.arch.title}, not a ToyWorld checkpoint")
        reader = model.reader

        def load(key: str) -> torch.Tensor:
            weight = reader.get(key)
            return patch.apply_to(key, weight) if patch is not None and key in patch.edits else weight

        self.denoiser = denoiser.from_metadata(model.arch.extra[model.arch.family]).eval()
        self.denoiser.load_state_dict({k[len(UNET_PREFIX):]: load(k).float() for k in reader.keys()
                                       if k.startswith(UNET_PREFIX)})
        self.text = CheckpointTextEncoder(model.arch, reader.keys(), load)
        self.uncond = self.text.encode([""])

    @classmethod
    def from_file(cls, path: str | Path = CHECKPOINT, patch: ErasurePatch | None = None) -> "ToyWorldPipeline":
        return cls(CheckpointModel(path), patch)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        return self.text.encode(list(prompts))

    @torch.no_grad()
    def sample_features(self, encoded: EncodedPrompts, seed: int, steps: int = STEPS,
                        guidance: float | None = None, batch: int = 64) -> torch.Tensor:
        """Images [n, 3, 16, 16] in [0, 1] for encoded prompts (features [n, tokens, d], and the pooled embedding
        [n, d] where the model reads one); sample i's noise depends only on (seed, i), so the same seed compares
        models sample by sample. `guidance`: the denoiser's own default when None."""
        guidance = self.denoiser.GUIDANCE if guidance is None else guidance
        images = []
        for start in range(0, len(encoded.features), batch):
            part = slice(start, start + batch)
            gen = torch.Generator().manual_seed(seed * 7919 + start)
            images.append(self.denoiser.sample(
                replace(encoded, features=encoded.features[part],
                        pooled=None if encoded.pooled is None else encoded.pooled[part]),
                self.uncond, gen, steps, guidance))
        return torch.cat(images)

    def sample(self, prompts: Sequence[str], seed: int, **kwargs) -> torch.Tensor:
        return self.sample_features(self.encode(prompts), seed, **kwargs)
