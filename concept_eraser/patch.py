"""Erasure patches: the changed tensors of an erasure plus where they came from.

A patch maps checkpoint keys to a sequence of stages applied in order (one per erasure step),
each stage either new dense values, an exact low-rank update ``W ← W + up @ down``, or new
values stored sparsely (only the non-zeros, CSR). Untouched tensors are not stored. ``then``
composes two patches (erasing again on an erased model).
"""

from __future__ import annotations

import datetime as _dt
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

import torch

from .errors import InvalidParameterError, NonFiniteResultError
from .models.arch import ArchSpec, canonical_key


@dataclass(frozen=True)
class DenseEdit:
    """The tensor's new values, in the model's dtype."""

    new: torch.Tensor

    kind = "dense"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.new.shape)

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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1])

    def delta(self) -> torch.Tensor:
        return self.up @ self.down

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        # float32 for half-precision and fp8 models; float64 factors or weights keep float64
        dtype = compute_dtype(weight.dtype, self.up.dtype)
        up, down = self.up.to(weight.device, dtype), self.down.to(weight.device, dtype)
        return torch.addmm(weight.to(dtype), up, down).to(weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"up": self.up, "down": self.down}


@dataclass(frozen=True)
class SparseEdit:
    """The tensor's new values, most of them zero, stored as CSR in the model's dtype.

    ``crow_indices`` (int32, rows + 1) and ``col_indices`` (int16 when the width allows, else int32)
    locate the ``values``; ``size`` (int64, 2) is the matrix shape. All fields are tensors, so patch
    files store them like any other edit and hold only the non-zeros.
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    size: torch.Tensor

    kind = "sparse"

    @classmethod
    def from_dense(cls, new: torch.Tensor) -> "SparseEdit":
        """CSR of `new` (already in the model's dtype): exactly its non-zero entries, row-major."""
        mask = new != 0
        crow = torch.zeros(new.shape[0] + 1, dtype=torch.int64, device=new.device)
        torch.cumsum(mask.sum(1), 0, out=crow[1:])
        col_dtype = torch.int16 if new.shape[1] - 1 <= torch.iinfo(torch.int16).max else torch.int32
        # nonzero() lists entries row by row, the order `values` is taken in.
        cols = mask.nonzero()[:, 1].to(col_dtype)
        return cls(crow.to(torch.int32), cols, new[mask], torch.tensor(new.shape, dtype=torch.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.size)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=self.values.dtype, device=self.values.device)
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        row = torch.repeat_interleave(torch.arange(rows, device=out.device), counts)
        out[row, self.col_indices.long()] = self.values
        return out

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return self.dense().to(device=weight.device, dtype=weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values,
                "size": self.size}

    def smaller(self) -> "SparseEdit | DenseEdit":
        """This CSR, or the same matrix dense when that takes no more bytes: CSR costs a value and a column index
        per non-zero, so in fp16 with int16 columns it is larger than the dense matrix below ~50 % zeros."""
        dense_bytes = math.prod(self.shape) * self.values.element_size()
        return self if edit_nbytes(self) < dense_bytes else DenseEdit(self.dense())


@dataclass(frozen=True)
class DeltaEdit:
    """``W ← W + delta``: a dense or sparse edit stored relative to the weights it was solved on (float32, or
    float64 for float64 models), so that applied to other weights it is still a change, not their replacement."""

    delta: torch.Tensor

    kind = "delta"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.delta.shape)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(weight.dtype, self.delta.dtype)
        return (weight.to(dtype) + self.delta.to(weight.device, dtype)).to(weight.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}


Edit = Union[DenseEdit, LowRankEdit, SparseEdit, DeltaEdit]
EDIT_KINDS = {"dense": DenseEdit, "low_rank": LowRankEdit, "sparse": SparseEdit, "delta": DeltaEdit}


def edit_nbytes(edit: Edit) -> int:
    """Bytes of the tensors an edit stores (a patch file holds these plus its header)."""
    return sum(t.numel() * t.element_size() for t in edit.tensors().values())


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The precision to compute edits in: float64 if any input is, else float32 (also for fp8, which torch
    does not promote)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_written_finite(key: str, tensor: torch.Tensor) -> None:
    """`tensor` as it is written (in the model's dtype): NaN or Inf there (float16 overflows to Inf above 65504)
    would poison every image."""
    values = tensor.float() if tensor.element_size() == 1 else tensor  # torch has no isfinite for fp8
    if not torch.isfinite(values).all():
        raise NonFiniteResultError(
            f"{key} would contain NaN or Inf as written in {str(tensor.dtype).replace('torch.', '')} (the edit is "
            "too large for the dtype, or the patch or model holds NaN/Inf: raise lam, lower erase_scale, or check "
            "the model's weights); nothing was written")


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

    def relative(self, weight: Callable[[str], torch.Tensor]) -> ErasurePatch:
        """This patch with the stages of every key that has dense or sparse ones as one `DeltaEdit` from
        `weight(key)`, the weights it was solved on (on the CPU). Low-rank stages are changes already."""
        edits = {}
        for key, stages in self.edits.items():
            if all(isinstance(s, (LowRankEdit, DeltaEdit)) for s in stages):
                edits[key] = stages
                continue
            base = weight(key)
            dtype = compute_dtype(base.dtype)
            delta = self.apply_to(key, base).to(dtype) - base.to(dtype)
            check_finite(key, delta)
            edits[key] = (DeltaEdit(delta.cpu()),)
        return ErasurePatch(self.architecture, edits, self.steps)

    def in_layout(self, arch: ArchSpec) -> ErasurePatch:
        """This patch with its keys named as `arch`'s file names them: a Flux or SD3 patch made on an all-in-one
        checkpoint (or in ComfyUI) applies to a diffusion-model-only file, and the other way round."""
        edits = {arch.own_key(canonical_key(key)): stages for key, stages in self.edits.items()}
        return ErasurePatch(self.architecture, edits, self.steps)

    def is_low_rank(self) -> bool:
        return all(isinstance(s, LowRankEdit) for stages in self.edits.values() for s in stages)

    def low_rank_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked factors of every stage: their sum is the whole update (stages add up exactly)."""
        stages = self.edits[key]
        return torch.cat([s.up for s in stages], 1), torch.cat([s.down for s in stages], 0)

    def nbytes(self) -> int:
        return sum(edit_nbytes(s) for stages in self.edits.values() for s in stages)


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


EDIT_PARTS = {"dense": {"new"}, "low_rank": {"up", "down"}, "sparse": {"crow_indices", "col_indices", "values", "size"},
              "delta": {"delta"}}


def edit_from_parts(kind: str, parts: Mapping[str, torch.Tensor]) -> Edit:
    """An edit read back from a patch file, checked (a hand-edited or damaged file raises ValueError that says
    what is wrong): known kind, exactly its parts, consistent shapes and index ranges, finite values."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r} (known: {', '.join(EDIT_KINDS)})")
    missing, extra = EDIT_PARTS[kind] - set(parts), set(parts) - EDIT_PARTS[kind]
    if missing or extra:
        raise ValueError(f"a {kind} edit has the parts {', '.join(EDIT_PARTS[kind])}; "
                         + (f"missing {', '.join(sorted(missing))}" if missing else f"unexpected {', '.join(extra)}"))
    floats = {"dense": ("new",), "low_rank": ("up", "down"), "sparse": ("values",), "delta": ("delta",)}[kind]
    for name in floats:
        if not parts[name].is_floating_point():
            raise ValueError(f"{name} is {parts[name].dtype}, not floating point")
        if not torch.isfinite(parts[name].float()).all():
            raise ValueError(f"{name} contains NaN or Inf")
    if kind == "dense":  # any shape (KPOP also trains biases); the model's shape is checked when it is applied
        return DenseEdit(parts["new"])
    if kind == "delta":
        return DeltaEdit(parts["delta"])
    if kind == "low_rank":
        up, down = parts["up"], parts["down"]
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"up {list(up.shape)} and down {list(down.shape)} are not out × r and r × in")
        return LowRankEdit(up, down)
    crow, cols, values, size = (parts[n] for n in ("crow_indices", "col_indices", "values", "size"))
    if any(t.is_floating_point() or t.dim() != 1 for t in (crow, cols, size)) or size.numel() != 2 or values.dim() != 1:
        raise ValueError("crow_indices, col_indices and size must be integer vectors (size of 2), values a vector")
    rows, width = (int(n) for n in size)
    counts = crow[1:].long() - crow[:-1].long()
    if (rows < 0 or width < 0 or crow.numel() != rows + 1 or int(crow[0]) != 0 or bool((counts < 0).any())
            or int(crow[-1]) != values.numel() or cols.numel() != values.numel()
            or bool(((cols.long() < 0) | (cols.long() >= width)).any())):
        raise ValueError(f"its sparse indices do not describe a {rows} × {width} matrix with {values.numel()} values")
    return SparseEdit(crow, cols, values, size)


# ---- which checkpoint a patch fits -------------------------------------------------------------------------

FINGERPRINT_SIZE = 8
# Relative distance under which two fingerprints are the same checkpoint. Measured on an fp16 SD1-layout file:
# read as fp32 0, as bf16 1.3e-3, as fp8 e4m3 1.9e-2 (e5m2 4.9e-2: fp8 weights need `force`); its weights
# × (1 + 1 % noise) 6.2e-3, × 1.01 1.0e-2; another seed 0.92. A fine-tune or merge moves it by its own change.
FINGERPRINT_TOLERANCE = 1e-2


def source_fingerprint(arch: ArchSpec, weight: Callable[[str], torch.Tensor]) -> list[float]:
    """What identifies the weights a patch is solved on in every host, whatever dtype it reads them in:
    FINGERPRINT_SIZE numbers Σ_k u_kᵢᵀ W_k v_kᵢ over the model's per-token text maps (cross-attention K/V),
    with Gaussian u, v seeded by each key's name (a file's SHA-256 is not known to hosts that load it)."""
    out = torch.zeros(FINGERPRINT_SIZE, dtype=torch.float64)
    for key in arch.map_keys():
        w = weight(key).detach().to("cpu", torch.float64)
        rng = torch.Generator().manual_seed(zlib.crc32(canonical_key(key).encode()))  # the same in any layout
        u = torch.randn(FINGERPRINT_SIZE, w.shape[0], generator=rng, dtype=torch.float64)
        v = torch.randn(w.shape[1], FINGERPRINT_SIZE, generator=rng, dtype=torch.float64)
        out += ((u @ w) * v.T).sum(1)
    return [float(f"{x:.8g}") for x in out]


def check_fits(patch: ErasurePatch, arch: ArchSpec, weight: Callable[[str], torch.Tensor],
               shape: Callable[[str], tuple | None], force: bool, field: str, force_hint: str) -> None:
    """Refuse a patch that cannot be applied to a model (another architecture, a tensor the model lacks or
    shapes apart) and, unless `force`, one made for another checkpoint: the source fingerprint recorded in
    the patch's first step (`fingerprint` of the model it was solved on) against the model's own. `shape(key)`
    is the model's shape of a tensor (None: no such tensor); errors name `field`; `force_hint` says how to force."""
    if patch.architecture and patch.architecture != arch.family:
        raise InvalidParameterError(field, f"the patch was made for {patch.architecture}, the model is {arch.family}")
    for key, stages in patch.edits.items():
        have = shape(key)
        if have is None:
            raise InvalidParameterError(field, f"the patch edits {key}, which this model does not have")
        for stage in stages:
            if tuple(stage.shape) != tuple(have):
                raise InvalidParameterError(field, f"{key} has shape {list(have)} in the model, "
                                            f"{list(stage.shape)} in the patch")
    source = patch.steps[0].get("source", {}) if patch.steps else {}
    expected = source.get("fingerprint")
    if force or not expected:
        return
    got = torch.tensor(source_fingerprint(arch, weight), dtype=torch.float64)
    want = torch.tensor(expected, dtype=torch.float64)
    distance = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not distance <= FINGERPRINT_TOLERANCE:  # NaN (weights that are not finite) is no match either
        after = source.get("after") or []
        made_for, that_model = source.get("name", "unnamed"), "that model"
        if after:
            made_for += f" after {len(after)} earlier erasure{'s' * (len(after) > 1)} ({'; '.join(map(str, after))})"
            that_model += " with them applied"
        raise InvalidParameterError(
            field, f"the patch was made for another checkpoint, {made_for} (its cross-attention weights differ from "
            f"this model's by {distance:.1%} in the source fingerprint); connect {that_model}, or {force_hint} to "
            "apply it anyway as a change to this model's weights")
