"""The model a method edits, as every host provides it (a checkpoint file, a ComfyUI MODEL + CLIP,
the WebUI's loaded model): the architecture, current weights by checkpoint key, and a text encoder."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .encoding import TextEncoder
from .models.arch import ArchSpec

# progress(done, total, message) is called often; a host raises its own interruption from it,
# which the methods let through before anything is patched.
Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, message: str) -> None:
    return None


class EditableModel(Protocol):
    arch: ArchSpec
    device: torch.device

    @property
    def text_encoder(self) -> TextEncoder: ...

    def weight(self, key: str) -> torch.Tensor:
        """The current (effective) weight under its checkpoint key, on `device`, in the model's dtype."""
        ...

    def source(self) -> dict:
        """Identity of the model for provenance: at least a name; a SHA-256 where the host knows it."""
        ...

    def prior_steps(self) -> tuple[dict, ...]:
        """Provenance of erasures already baked into these weights, oldest first."""
        ...
