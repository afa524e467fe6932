"""Erasure patches: the changed tensors of an erasure plus where they came from.

A patch maps checkpoint keys to a sequence of stages applied in order (one per erasure step),
each stage either new dense values or an exact low-rank update ``W ← W + up @ down``. Untouched
tensors are not stored. ``then`` composes two patches (erasing again on an erased model).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch

from .errors import NonFiniteResultError


@dataclass(frozen=True)
class DenseEdit:
    """The tensor's new values, in the model's dtype."""

    new: torch.Tensor

    kind = "dense"

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return self.new.to(device=weight.device, dtype=weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"new": self.new}


@dataclass(frozen=True)
class LowRankEdit:
    """``W ← W + up @ down`` with float32 factors (up: out × r, down: r × in)."""

    up: torch.Tensor
    down: torch.Tensor

    kind = "low_rank"

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def delta(self) -> torch.Tensor:
        return self.up @ self.down

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        up, down = self.up.to(weight.device), self.down.to(weight.device)
        return torch.addmm(weight.float(), up, down).to(weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"up": self.up, "down": self.down}


Edit = Union[DenseEdit, LowRankEdit]
EDIT_KINDS = {"dense": DenseEdit, "low_rank": LowRankEdit}


def check_finite(key: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise NonFiniteResultError(
                f"the solution for {key} contains NaN or Inf (the problem is ill-conditioned: raise lam, "
                "lower erase_scale, or check the model's weights); nothing was changed"
            )


@dataclass(frozen=True)
class ErasurePatch:
    architecture: str
    edits: Mapping[str, tuple[Edit, ...]]
    steps: tuple[dict, ...] = field(default_factory=tuple)  # provenance, oldest first

    def apply_to(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        for stage in self.edits[key]:
            weight = stage.apply(weight)
        return weight

    def then(self, later: "ErasurePatch") -> "ErasurePatch":
        """This patch followed by `later` (which was solved on the weights this one produces)."""
        if later.architecture != self.architecture:
            raise ValueError(f"cannot compose a {self.architecture} patch with a {later.architecture} patch")
        edits = dict(self.edits)
        for key, stages in later.edits.items():
            edits[key] = edits.get(key, ()) + stages
        return ErasurePatch(self.architecture, edits, self.steps + later.steps)

    def is_low_rank(self) -> bool:
        return all(isinstance(s, LowRankEdit) for stages in self.edits.values() for s in stages)

    def low_rank_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked factors of every stage: their sum is the whole update (stages add up exactly)."""
        stages = self.edits[key]
        return torch.cat([s.up for s in stages], 1), torch.cat([s.down for s in stages], 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.edits.values() for s in st for t in s.tensors().values())


def provenance_step(method: str, params: Mapping, concepts: Mapping, source: Mapping, architecture: str) -> dict:
    from . import __version__

    return {
        "method": method,
        "params": dict(params),
        "concepts": dict(concepts),
        "architecture": architecture,
        "source": dict(source),
        "library": f"concept_eraser {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
