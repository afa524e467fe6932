"""What to erase, what to map it to, what to keep — and which token features stand for each.

Token policies (which columns of the 77 × d feature matrix represent a prompt; where the features are segments
of several encoders' tokens, as SD3's CLIP and T5 tokens, the policy applies within each segment):

- ``last_word_to_end`` (default; UCE's paper-era code, which produced its published results):
  the target's tokens from its last word through EOS and padding, aligned with the guide's from
  the guide's last word (the empty guide's "last word" is BOS), both cut to 77 − max(start);
  preserved prompts contribute all 77 tokens, and the empty prompt is always preserved.
- ``last_word`` (UCE's current script, SPEED): one column per prompt, the last word token
  (BOS for the empty prompt).
- ``all_tokens``: all 77 positions, paired position by position (RECE's derivation, SPEED for nudity).
- ``prompt_tokens`` (ErasePro): BOS, words and EOS of the longer of target and guide, position by position.
- ``first_k`` (ErasePro's implicit-nudity variants): the first k positions, BOS included.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .encoding import EncodedPrompts, TextEncoder
from .errors import InvalidParameterError

# Every token policy, defined once: which positions of a prompt's token window stand for it (see the module
# docstring). Each method offers those its paper uses (its `token_policy` choices): UCE, RECE, SPACE the first
# three, ErasePro the last three.
TOKEN_POLICIES = ("last_word_to_end", "last_word", "all_tokens", "prompt_tokens", "first_k")


def token_positions(policy: str, length_target: int, length_guide: int, window: int,
                    k: int = 1) -> tuple[list[int], list[int]]:
    """(target positions, guide positions), paired one to one, under `policy`; lengths count BOS, words, EOS."""
    if policy == "last_word":
        return [max(length_target - 2, 0)], [max(length_guide - 2, 0)]
    if policy == "last_word_to_end":
        start_e, start_g = max(length_target - 2, 0), max(length_guide - 2, 0)
        count = window - max(start_e, start_g)
        return list(range(start_e, start_e + count)), list(range(start_g, start_g + count))
    if policy == "all_tokens":
        return list(range(window)), list(range(window))
    if policy == "prompt_tokens":
        both = list(range(max(length_target, length_guide)))
        return both, both
    if policy == "first_k":
        both = list(range(min(k, window)))
        return both, both
    raise InvalidParameterError("token_policy", f"{policy!r} is not one of {', '.join(TOKEN_POLICIES)}")


def same_prompt(text: str) -> str:
    """What the text encoders see of a prompt: CLIP's tokenizer (and ToyWorld's) lower-cases text and
    collapses whitespace, so "Cat" and "cat " are one prompt."""
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Concepts:
    targets: tuple[str, ...]
    guides: tuple[str, ...]  # one per target
    preserve: tuple[str, ...]

    @classmethod
    def build(cls, targets: Sequence[str], guides: Sequence[str] = (), preserve: Sequence[str] = ()) -> Concepts:
        """Validate user lists. No guide means the empty prompt; one guide is used for every target."""
        targets = tuple(t.strip() for t in targets if t and t.strip())
        guides = tuple(g.strip() for g in guides)
        preserve = tuple(p.strip() for p in preserve if p and p.strip())
        if not targets:
            raise InvalidParameterError("erase", "give at least one concept to erase")
        if len({same_prompt(t) for t in targets}) != len(targets):
            raise InvalidParameterError("erase", "a concept is listed twice (case and spacing do not count)")
        if len(guides) > len(targets):
            raise InvalidParameterError(
                "guide",
                f"{len(guides)} guides for {len(targets)} concepts to erase: give one guide, or one per concept"
            )
        if 1 < len(guides) < len(targets):
            raise InvalidParameterError(
                "guide", f"{len(guides)} guides for {len(targets)} concepts: give one guide for all, or one per concept"
            )
        if len(guides) <= 1:
            guides = (guides[0] if guides else "",) * len(targets)
        clash = [p for p in preserve if same_prompt(p) in {same_prompt(t) for t in targets}]
        if clash:
            raise InvalidParameterError("preserve", f"{clash[0]!r} is both erased and preserved (the text encoders "
                                        "ignore case and spacing)")
        for target, guide in zip(targets, guides):
            if same_prompt(target) == same_prompt(guide):
                warnings.warn(f"guide: {target!r} is mapped to itself, so it is not erased", stacklevel=2)
        return cls(targets, guides, preserve)

    def as_dict(self) -> dict:
        return {"erase": list(self.targets), "guide": list(self.guides), "preserve": list(self.preserve)}


@dataclass(frozen=True)
class Columns:
    """Feature matrices as columns (d × n), float32: C_E paired with C_G; C_P preserved."""

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor
    erase_owner: tuple[int, ...]  # which target each erase column came from


def target_columns(targets: EncodedPrompts, guides: EncodedPrompts, policy: str):
    """(C_E, C_G, owner) for paired target/guide prompts under `policy`, applied within each segment of the
    tokens (SD3: the CLIP tokens and the T5 tokens; elsewhere one)."""
    erase, guide, owner = [], [], []
    for i in range(len(targets.prompts)):
        for seg_t, seg_g in zip(targets.parts, guides.parts):
            e, g = token_positions(policy, seg_t.lengths[i], seg_g.lengths[i], seg_t.window)
            erase.append(targets.features[i, [seg_t.start + p for p in e]])
            guide.append(guides.features[i, [seg_g.start + p for p in g]])
            owner += [i] * len(e)
    return torch.cat(erase).T, torch.cat(guide).T, tuple(owner)


def preserve_columns(preserved: EncodedPrompts, policy: str) -> torch.Tensor:
    if not preserved.prompts:
        return preserved.features.new_zeros(preserved.features.shape[-1], 0)
    if policy == "last_word":
        rows = [preserved.features[i, [s.start + max(s.lengths[i] - 2, 0) for s in preserved.parts]]
                for i in range(len(preserved.prompts))]
    else:
        rows = list(preserved.features)
    return torch.cat(rows).T


def concept_columns(encoder: TextEncoder, concepts: Concepts, policy: str, preserve_empty: bool) -> Columns:
    """Encode every prompt once and select the columns that `policy` says stand for it."""
    preserve = (("",) if preserve_empty and "" not in concepts.preserve else ()) + concepts.preserve
    unique = list(dict.fromkeys(concepts.targets + concepts.guides + preserve))
    encoded = encoder.encode(unique)
    index = {p: i for i, p in enumerate(unique)}

    def pick(prompts: Sequence[str]) -> EncodedPrompts:
        return encoded.select([index[p] for p in prompts])

    c_e, c_g, owner = target_columns(pick(concepts.targets), pick(concepts.guides), policy)
    c_p = preserve_columns(pick(preserve), policy)
    return Columns(c_e, c_g, c_p, owner)
