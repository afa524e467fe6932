"""Per-token text features: what the CONTEXT maps (cross-attention K/V, MMDiT entry projections) read for a prompt."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch

from .models.arch import ArchSpec, EncoderSpec
from .models.layerwise import LayerwiseEncoder


@dataclass(frozen=True)
class Segment:
    """The tokens of one text encoder (or of encoders concatenated along the features) inside a prompt's features:
    positions [start, start + window). SD: one segment; SD3: CLIP-L ⊕ CLIP-G's 77, then T5's 77."""

    start: int
    window: int
    lengths: tuple[int, ...]  # per prompt: BOS + words + EOS (T5: words + EOS); the last word sits at length - 2
    bos: bool = True  # position `start` is a BOS token, the same in every prompt


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: tuple[str, ...]
    features: torch.Tensor  # [n, tokens, context_dim], float32 (tokens: 77 for SD, 256 Flux, 154 SD3)
    lengths: tuple[int, ...]  # BOS + words + EOS per prompt in the first segment; the last word sits at length - 2
    # the pooled embedding [n, width] that POOLED maps read (SDXL's bigG, Flux's CLIP-L, SD3's CLIP-L ⊕ CLIP-G);
    # None where the host gives none
    pooled: torch.Tensor | None = None
    segments: tuple[Segment, ...] | None = None  # None: one segment holding every token, with a BOS

    @property
    def parts(self) -> tuple[Segment, ...]:
        return self.segments or (Segment(0, self.features.shape[1], self.lengths),)

    def select(self, rows: Sequence[int]) -> EncodedPrompts:
        """These prompts only, in this order."""
        rows = list(rows)
        return EncodedPrompts(
            tuple(self.prompts[r] for r in rows), self.features[rows], tuple(self.lengths[r] for r in rows),
            None if self.pooled is None else self.pooled[rows],
            None if self.segments is None else tuple(replace(s, lengths=tuple(s.lengths[r] for r in rows))
                                                     for s in self.segments))

    def shared_positions(self) -> list[int]:
        """Positions whose features are the same for every prompt (the BOS tokens): they carry no concept."""
        return [s.start for s in self.parts if s.bos]


class TextEncoder(Protocol):
    """What a method needs from a model's text side; hosts provide their own. `pooled` is filled where the
    model reads a pooled embedding (the host's pooled output, e.g. ComfyUI's `return_pooled`)."""

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...


def checkpoint_encoder(spec: EncoderSpec, keys, load: Callable[[str], torch.Tensor], device):
    """The encoder of one `EncoderSpec`: CLIP towers run block by block, T5 as transformers' model."""
    if spec.layout == "t5":
        from .models.text_encoders import T5TextEncoder

        return T5TextEncoder(spec, keys, load, device)
    return LayerwiseEncoder(spec, keys, load, device)


class CheckpointTextEncoder:
    """The checkpoint's own text encoder(s), features as the hosts compute them: SD1 the final
    layer-normed output; SD2 the penultimate layer, normed; SDXL CLIP-L penultimate ⊕ bigG
    penultimate, not normed; Flux T5's last layer (final RMSNorm); SD3 [CLIP-L ⊕ CLIP-G penultimate,
    zero-padded to 4096 | T5] along the tokens (`EncoderSpec.segment`). Pooled: the encoders whose `pooled` is
    set, concatenated. Only the blocks whose outputs are read are held, on `device` as stored, and run in
    float32 (each weight cast as it is used: fp16 passes move CLIP's features by ~1e-3, more than the
    hosts' float32 agree with each other). Every prompt is encoded once: a run's
    prompts go in one batch, and later requests (the probe's targets) are answered from it."""

    def __init__(self, arch: ArchSpec, keys: list[str], load: Callable[[str], torch.Tensor], device="cpu"):
        self.arch = arch
        self.device = torch.device(device)
        self.encoders = [checkpoint_encoder(spec, keys, load, self.device) for spec in arch.encoders]
        groups: dict[int, list[EncoderSpec]] = {}
        for spec in arch.encoders:
            if spec.context:
                groups.setdefault(spec.segment, []).append(spec)
        self.segments = [groups[s] for s in sorted(groups)]  # the encoders of each segment, in order
        # prompt → (features, lengths per segment, pooled) of every prompt encoded so far
        self._known: dict[str, tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None]] = {}

    def _encode_new(self, prompts: list[str]) -> None:
        contexts, lengths, pooled = {}, {}, []
        for spec, encoder in zip(self.arch.encoders, self.encoders):
            context, pooled_here = encoder.encode(prompts)
            if spec.context:
                contexts[spec.name] = context.float()
                lengths.setdefault(spec.segment, encoder.tokens(prompts)[1])
            if pooled_here is not None:
                pooled.append(pooled_here.float())
        parts = []
        for specs in self.segments:
            part = torch.cat([contexts[s.name] for s in specs], dim=-1)
            parts.append(torch.nn.functional.pad(part, (0, self.arch.context_dim - part.shape[-1])))
        features = torch.cat(parts, dim=1)
        pooled_all = torch.cat(pooled, dim=-1) if pooled else None
        for i, p in enumerate(prompts):
            self._known[p] = (features[i], tuple(lengths[specs[0].segment][i] for specs in self.segments),
                              None if pooled_all is None else pooled_all[i])

    def encode_through_eos(self, prompts: Sequence[str]) -> EncodedPrompts:
        """The first segment's features up to each prompt's EOS, with only as many token positions run as the
        longest prompt has (CLIP attends causally: the values `encode` gives there; SD1.5, 600 short prompts:
        ~8 positions of 77), no other segment and no pooled embedding. For the concept expansion, which reads a
        prompt's last word and EOS. Not remembered: `encode` still runs whole windows."""
        specs = self.segments[0]
        if specs[0].tokenizer == "t5":  # T5 attends both ways: every position counts
            return self.encode(prompts)
        encoders = {spec.name: encoder for spec, encoder in zip(self.arch.encoders, self.encoders)}
        lengths = encoders[specs[0].name].tokens(prompts)[1]
        positions = max(lengths, default=1)
        part = torch.cat([encoders[s.name].encode(prompts, positions)[0].float() for s in specs], dim=-1)
        features = torch.nn.functional.pad(part, (0, self.arch.context_dim - part.shape[-1]))
        return EncodedPrompts(tuple(prompts), features, tuple(lengths), segments=(Segment(0, positions, lengths),))

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        prompts = tuple(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._known]
        if new:
            self._encode_new(new)
        rows = [self._known[p] for p in prompts]
        segments, start = [], 0
        for k, specs in enumerate(self.segments):
            window = specs[0].window
            segments.append(Segment(start, window, tuple(r[1][k] for r in rows), specs[0].tokenizer != "t5"))
            start += window
        if not rows:
            features = torch.zeros(0, start, self.arch.context_dim, device=self.device)
            return EncodedPrompts((), features, (), segments=tuple(segments))
        pooled = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
        return EncodedPrompts(prompts, torch.stack([r[0] for r in rows]), segments[0].lengths, pooled,
                              tuple(segments))
