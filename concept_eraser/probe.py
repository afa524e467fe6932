"""Recoverability probe: can some input still make the edited K/V produce an erased concept?

RECE's derived embedding (Gong et al., ECCV 2024, arXiv 2407.12383, Eq. 8) used as a cheap white-box
test of any cross-attention edit. For a target's token features c (the columns of C), find the
feature c' that, fed to the EDITED matrices W_i, comes closest to what the ORIGINAL matrices W_{o,i}
produce for c:

    c' = argmin_c' Σ_i ‖W_i c' − W_{o,i} c‖² + λ_r ‖c'‖²
       = (λ_r I + Σ_i W_iᵀ W_i)⁻¹ (Σ_i W_iᵀ W_{o,i}) c                       (RECE Eq. 8)

with i over every cross-attention K and V matrix (edited or not: they all read the same features).
Stacking the matrices as 𝒲 = [W_1; W_2; …] (and 𝒲_o likewise), the report gives per target

    residual   = ‖𝒲 C' − 𝒲_o C‖_F / ‖𝒲_o C‖_F     0: the original keys/values are fully recoverable
    cosine     = ⟨𝒲 C', 𝒲_o C⟩ / (‖𝒲 C'‖_F ‖𝒲_o C‖_F)
    direct     = ‖(𝒲 − 𝒲_o) C‖_F / ‖𝒲_o C‖_F       the prompt itself (c' = c): what the edit moved
    norm_ratio = ‖C'‖_F / ‖C‖_F                      how far from the prompt's own features c' had to go

An edit that only re-maps the prompt's own features — UCE's W = W_o T with T invertible — stays fully
recoverable as λ_r → 0 (c' = T⁻¹ c), which is the weakness RECE attacks; λ_r keeps c' of a plausible
size, so the figures depend on it. The default, λ_r = 0.1, is RECE's published value for unsafe
concepts and the RECE method's default here: the probe then finds what RECE's next epoch would erase.

Columns: token positions 1–76 of each target prompt (its words, EOS and padding, which all carry the
prompt through CLIP's causal attention; T5, which has no BOS, all of its positions). BOS is left out: it is
the same for every prompt, so it carries no concept, and its large norm (SDXL's penultimate features) would
swamp the figures.

Cost: one pass over the K/V weights with one d × d Gram product per matrix (d = 768 / 1024 / 2048; its upper
triangle only, `linalg.add_gram`) and a d × d Cholesky solve; a fraction of a second on a GPU, seconds on a CPU
for SD1.x, about ten seconds on a 2-core CPU for SDXL's 140 matrices. The features are those of the model's text encoder
before any edit; a method that also edits the text encoder (ErasePro) is probed on its K/V edit only.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .editable import EditableModel, Progress, no_progress
from .encoding import TextEncoder
from .linalg import add_gram, solve_spd, symmetric
from .patch import ErasurePatch

DEFAULT_LAM_R = 0.1


class RecoveryProbe:
    """One pass over the K/V matrices accumulates everything the derivation and the figures need:
    G = Σ W_iᵀ W_i (d × d, summed as its upper triangle), R = Σ W_iᵀ W_{o,i} C (d × n), and per column
    ‖𝒲_o c‖² and ‖(𝒲 − 𝒲_o) c‖².

    Products are formed in `compute_dtype` (float32: fast, ample for the figures) and summed in
    float64; the solve is in float64.
    """

    def __init__(self, features: torch.Tensor, compute_dtype: torch.dtype = torch.float32):
        d, n = features.shape
        self.features = features
        self.compute_dtype = compute_dtype
        acc = dict(dtype=torch.float64, device=features.device)
        self.gram_upper = torch.zeros(d, d, **acc)
        self.cross = torch.zeros(d, n, **acc)
        self.target_sq = torch.zeros(n, **acc)
        self.direct_sq = torch.zeros(n, **acc)
        self.change_sq = torch.zeros((), **acc)
        self.original_sq = torch.zeros((), **acc)
        self._cast: torch.Tensor | None = None  # the features on the weights' device, in compute_dtype

    def add(self, weight: torch.Tensor, original: torch.Tensor) -> None:
        """Add one matrix: `weight` = W_i (edited), `original` = W_{o,i}."""
        w, w_o = weight.to(self.compute_dtype), original.to(self.compute_dtype)
        c = self._columns(w.device)
        target = w_o @ c  # W_o c: what the concept produced before the edit
        delta = w - w_o
        # float32 products added into the float64 sums as they are: the addition widens them, with no float64 copy
        # of each d × d product first
        add_gram(self.gram_upper, w)
        self.cross += w.T @ target
        self.target_sq += target.double().pow(2).sum(0)
        self.direct_sq += (delta @ c).double().pow(2).sum(0)
        # whole-matrix norms in the compute dtype (a float64 copy of every matrix costs more than its Gram)
        self.change_sq += torch.linalg.vector_norm(delta).double() ** 2
        self.original_sq += torch.linalg.vector_norm(w_o).double() ** 2

    def _columns(self, device: torch.device) -> torch.Tensor:
        if self._cast is None or self._cast.device != device:
            self._cast = self.features.to(device, self.compute_dtype)
        return self._cast

    @classmethod
    def from_right_map(cls, features: torch.Tensor, gram_o: torch.Tensor, transform: torch.Tensor) -> RecoveryProbe:
        """The probe of edited weights W_i = W_{o,i} 𝒯 (one d × d map for every matrix, as UCE and RECE
        apply) from G_o = Σ W_{o,i}ᵀ W_{o,i} alone: every sum is then a d × d product, in G_o's dtype."""
        probe = cls(features, gram_o.dtype)
        c = features.to(gram_o)
        moved = transform - torch.eye(transform.shape[0], dtype=gram_o.dtype, device=gram_o.device)
        cross_gram = transform.T @ gram_o  # Σ W_iᵀ W_{o,i}
        change = moved.T @ gram_o @ moved  # Σ (W_i − W_{o,i})ᵀ (W_i − W_{o,i})
        probe.gram_upper = (cross_gram @ transform).double()  # whole: only its upper triangle is read
        probe.cross = (cross_gram @ c).double()
        probe.target_sq = (c * (gram_o @ c)).sum(0).double()
        probe.direct_sq = (c * (change @ c)).sum(0).double()
        probe.change_sq, probe.original_sq = change.trace().double(), gram_o.trace().double()
        return probe

    @property
    def gram(self) -> torch.Tensor:
        """G = Σ W_iᵀ W_i (float64)."""
        return symmetric(self.gram_upper)

    @property
    def weight_change(self) -> float:
        """‖𝒲 − 𝒲_o‖_F / ‖𝒲_o‖_F over the matrices added."""
        return (self.change_sq / self.original_sq).sqrt().item() if self.original_sq > 0 else 0.0

    def derive(self, lam_r: float) -> torch.Tensor:
        """C' = (λ_r I + G)⁻¹ R: RECE's derived features for every column (d × n, float64)."""
        gram = self.gram
        return solve_spd(gram + lam_r * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), self.cross)

    def measure(self, derived: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float]]:
        """The figures of the module docstring for each named group of columns, from the accumulated sums:
        ‖W c' − W_o c‖² = c'ᵀ G c' − 2 c'ᵀ R_c + ‖W_o c‖², summed over matrices."""
        out = {}
        gram = self.gram
        for name, cols in groups.items():
            cols = list(cols)
            c_new, cross = derived[:, cols], self.cross[:, cols]
            produced_sq = (c_new * (gram @ c_new)).sum()  # ‖𝒲 C'‖²
            inner = (c_new * cross).sum()  # ⟨𝒲 C', 𝒲_o C⟩
            target_sq = self.target_sq[cols].sum()
            residual_sq = (produced_sq - 2 * inner + target_sq).clamp_min(0)
            base = self.features[:, cols].double().norm()
            out[name] = {
                "residual": (residual_sq / target_sq).sqrt().item(),
                "cosine": (inner / (produced_sq * target_sq).sqrt()).item() if produced_sq > 0 else 0.0,
                "direct": (self.direct_sq[cols].sum() / target_sq).sqrt().item(),
                "norm_ratio": (c_new.norm() / base).item() if base > 0 else 0.0,
            }
        return out


def probe_columns(encoder: TextEncoder, targets: Sequence[str]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Features of every token position of each target but BOS (SD: positions 1–76; d × 76·n) and which columns
    are whose."""
    encoded = encoder.encode(list(targets))
    shared = set(encoded.shared_positions())
    features = encoded.features[:, [p for p in range(encoded.features.shape[1]) if p not in shared]]
    per = features.shape[1]
    groups = {t: list(range(i * per, (i + 1) * per)) for i, t in enumerate(targets)}
    return features.reshape(-1, features.shape[-1]).T, groups


def recoverability(
    model: EditableModel,
    patch: ErasurePatch,
    targets: Sequence[str],
    lam_r: float = DEFAULT_LAM_R,
    progress: Progress = no_progress,
    each_edit: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """The probe for each target on `model` with `patch` applied (the model itself is not changed).
    `each_edit(key, new, original)` sees every edited tensor as the patch is applied for the probe — the edited
    maps and any other edited tensor (a text encoder's) — so a caller's per-layer figures need no second
    application of the patch."""
    features, groups = probe_columns(model.text_encoder, targets)
    probe = RecoveryProbe(features.to(model.device))
    maps = model.arch.map_keys()
    mapped = set(maps)
    keys = [*maps, *(key for key in patch.edits if key not in mapped)] if each_edit else list(maps)
    for i, key in enumerate(keys):
        original = model.weight(key)
        new = patch.apply_to(key, original) if key in patch.edits else original
        if each_edit is not None and key in patch.edits:
            each_edit(key, new, original)
        if i < len(maps):
            probe.add(new, original)
        progress(i + 1, len(keys), "probing recoverability")
    return {
        "lam_r": lam_r,
        "tokens": "every position of each target but BOS",
        "weight_change": probe.weight_change,
        "targets": probe.measure(probe.derive(lam_r), groups),
    }


def brief(report: Mapping) -> dict:
    """The probe's figures rounded for file metadata: {target: {residual, cosine}}."""
    return {t: {k: round(v, 4) for k, v in f.items() if k in ("residual", "cosine")}
            for t, f in report["targets"].items()}
