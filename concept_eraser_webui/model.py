"""The WebUI's loaded model as the solver's `EditableModel`.

Weights come from the live modules by checkpoint key (`live.LiveTensors`); text features from the
host's own text encoder objects, called the way the host calls them for a prompt's first chunk
(BOS, up to 75 tokens, EOS, padding), without the prompt-syntax layer (emphasis, textual-inversion
names): erasure prompts are plain text, as on the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from concept_eraser.denoiser import Denoiser
from concept_eraser.encoding import EncodedPrompts
from concept_eraser.errors import UnsupportedModelError
from concept_eraser.models.arch import ArchSpec, detect

from .live import LiveTensors

log = logging.getLogger("concept_eraser")


class TextEngine(Protocol):
    """One text encoder as the host drives it: A1111's `FrozenCLIPEmbedderWithCustomWords` family,
    Forge's `ClassicTextProcessingEngine` (both have these members)."""

    id_start: int
    id_end: int
    id_pad: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, window] token ids → ([n, window, width] features, pooled [n, width] or None)."""
        ...


class HostTextEncoder:
    """Per-token features from the host's encoders, concatenated in checkpoint order (SDXL: CLIP-L, bigG)."""

    def __init__(self, engines: Sequence[TextEngine], pooled: Sequence[bool], window: int):
        self.engines = list(engines)
        self.pooled = list(pooled)
        self.window = window  # the family's token window (`EncoderSpec.window`)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        prompts = tuple(prompts)
        parts, lengths, pooled = [], (), None
        for engine, wants_pooled in zip(self.engines, self.pooled):
            rows, counts = [], []
            for text, ids in zip(prompts, engine.tokenize(list(prompts))):
                ids = list(ids)
                if len(ids) > self.window - 2:
                    log.warning("concept_eraser: prompt %r is longer than %d tokens; only the first %d are used",
                                text[:40], self.window - 2, self.window - 2)
                    ids = ids[:self.window - 2]
                rows.append([engine.id_start] + ids + [engine.id_end] + [engine.id_pad] * (self.window - 2 - len(ids)))
                counts.append(len(ids) + 2)
            features, pool = engine.encode(torch.tensor(rows, dtype=torch.long))
            parts.append(features.float().clone())
            lengths = tuple(counts)
            if wants_pooled:
                pooled = pool.float().clone() if pool is not None else None
        device = parts[0].device
        return EncodedPrompts(prompts, torch.cat([p.to(device) for p in parts], dim=-1), lengths,
                              pooled.to(device) if pooled is not None else None)


@dataclass(frozen=True)
class EncoderLayer:
    """Which hidden state of an encoder the host feeds the U-Net (clip skip), as the solver describes it."""

    hidden_layer: int
    final_norm: bool


def host_arch(tensors: LiveTensors, layers: Sequence[EncoderLayer] | None = None) -> ArchSpec:
    """The architecture from the live tensors' keys and shapes, with the encoders' feature layers set to
    what the host computes now (A1111's "Clip skip", Forge's clip_skip), so methods that rebuild the
    text encoder read the layer the U-Net is fed."""
    from dataclasses import replace

    shapes = {k: tensors.shape(k) for k in tensors.keys()}  # noqa: SIM118 - not a dict
    arch = detect(shapes)
    if layers:
        if len(layers) != len(arch.encoders):
            raise UnsupportedModelError(
                f"the host has {len(layers)} text encoders, the checkpoint layout {len(arch.encoders)}")
        arch = replace(arch, encoders=tuple(replace(e, hidden_layer=layer.hidden_layer, final_norm=layer.final_norm)
                                            for e, layer in zip(arch.encoders, layers)))
    return arch


class WebUIModel:
    """`EditableModel` over the live tensors of the loaded model; reads only (the session writes)."""

    def __init__(self, tensors: LiveTensors, arch: ArchSpec, text_encoder: HostTextEncoder, source: dict,
                 prior_steps: Sequence[dict] = (), unet: Callable[[int | None], Denoiser] | None = None):
        self.tensors = tensors
        self._unet = unet
        self.arch = arch
        self._text_encoder = text_encoder
        self._source = dict(source)
        self._prior = tuple(prior_steps)
        self.device = tensors.device(arch.map_keys()[0])

    @property
    def text_encoder(self) -> HostTextEncoder:
        return self._text_encoder

    def weight(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(key)
        return self.tensors.read(key).to(self.device)

    def keys(self) -> list[str]:
        return self.tensors.keys()

    def source(self) -> dict:
        return dict(self._source)

    def prior_steps(self) -> tuple[dict, ...]:
        return self._prior

    def denoiser(self, resolution: int | None = None) -> Denoiser:
        """The loaded U-Net for gradient methods (KPOP), as the host provides it (`host.py`)."""
        if self._unet is None:
            raise UnsupportedModelError("this WebUI's U-Net cannot be trained by Concept Eraser")
        return self._unet(resolution)
