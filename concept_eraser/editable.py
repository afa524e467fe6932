"""The model a method edits, as every host provides it (a checkpoint file, a ComfyUI MODEL + CLIP,
the WebUI's loaded model): the architecture, current weights by checkpoint key, and a text encoder."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Protocol, Sequence

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
        """The current (effective) weight under its checkpoint key, on `device`, in the model's dtype.
        Read-only: it may share memory with the model (a host's live tensor, a memory-mapped file).

        Every key that `keys` lists is served: the U-Net's (cross-attention K/V, SDXL's `label_emb`) and
        the text encoders' under the checkpoint's own names (OpenCLIP fused `attn.in_proj_weight`
        included). Methods that edit the text encoder rebuild it from these and run it layer by layer
        with edited weights (`models.layerwise`), which a host's encoder object cannot be asked to do."""
        ...

    def keys(self) -> Sequence[str]:
        """The checkpoint key names `weight` serves: at least the U-Net's K/V and `label_emb` and every
        tensor of the text encoders (hosts map their own module names to these, as when they save)."""
        ...

    def source(self) -> dict:
        """Identity of the model for provenance: at least a name; a SHA-256 where the host knows it."""
        ...

    def prior_steps(self) -> tuple[dict, ...]:
        """Provenance of erasures already baked into these weights, oldest first."""
        ...


class WeightView(Mapping[str, torch.Tensor]):
    """Read-only mapping key → current weight that loads each weight only when asked, so a loop over
    it holds one matrix at a time (SDXL's K/V alone are ~0.7 GB in fp16)."""

    def __init__(self, model: EditableModel, keys: Sequence[str]):
        self.model, self.keys_ = model, tuple(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.model.weight(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)
