"""Per-token text features: what cross-attention K/V projections read for a prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .models.arch import ArchSpec
from .models.layerwise import LayerwiseEncoder


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: tuple[str, ...]
    features: torch.Tensor  # [n, 77, context_dim], float32
    lengths: tuple[int, ...]  # BOS + words + EOS per prompt; the last word sits at length - 2
    # SDXL only: the pooled bigG embedding [n, 1280] the U-Net also reads (through label_emb); None elsewhere
    pooled: torch.Tensor | None = None


class TextEncoder(Protocol):
    """What a method needs from a model's text side; hosts provide their own. On SDXL, `pooled` is
    filled (the host's pooled output, e.g. ComfyUI's `return_pooled`) for the `pooled_edit` option."""

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...


class CheckpointTextEncoder:
    """The checkpoint's own text encoder(s), features as the hosts compute them: SD1 the final
    layer-normed output; SD2 the penultimate layer, normed; SDXL CLIP-L penultimate ⊕ bigG
    penultimate, not normed. Only the blocks whose outputs are read are built, on `device`, in
    float32 (cast there from the checkpoint's dtype: fp16 passes move CLIP's features by ~1e-3,
    more than the hosts' float32 agree with each other). Every prompt is encoded once: a run's
    prompts go in one batch, and later requests (the probe's targets) are answered from it."""

    def __init__(self, arch: ArchSpec, keys: list[str], load: Callable[[str], torch.Tensor], device="cpu"):
        self.arch = arch
        self.device = torch.device(device)
        self.encoders = [LayerwiseEncoder(spec, keys, load, self.device) for spec in arch.encoders]
        # prompt → (features, length, pooled) of every prompt encoded so far
        self._known: dict[str, tuple[torch.Tensor, int, torch.Tensor | None]] = {}

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        prompts = tuple(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._known]
        if new:
            parts, pooled = [], None
            for encoder in self.encoders:
                context, pooled_here = encoder.encode(new)
                parts.append(context.float())
                if pooled_here is not None:
                    pooled = pooled_here.float()
            lengths = encoder.tokens(new)[1]
            features = torch.cat(parts, dim=-1)
            for i, p in enumerate(new):
                self._known[p] = (features[i], lengths[i], None if pooled is None else pooled[i])
        rows = [self._known[p] for p in prompts]
        if not rows:
            width = self.arch.context_dim
            return EncodedPrompts((), torch.zeros(0, self.arch.encoders[0].window, width, device=self.device), ())
        pooled = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
        return EncodedPrompts(prompts, torch.stack([r[0] for r in rows]), tuple(r[1] for r in rows), pooled)
