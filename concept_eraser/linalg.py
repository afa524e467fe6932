"""Shared numerics of the closed-form methods.

UCE (Gandikota et al., WACV'24), with C_E, C_G paired target/guide columns, C_P preserved columns:

    min_W  s_e‖W C_E − W_o C_G‖² + s_p‖W C_P − W_o C_P‖² + λ‖W − W_o‖²
    M  = λ I + s_e C_E C_Eᵀ + s_p C_P C_Pᵀ                      (d × d, SPD for λ > 0)
    W  = W_o + W_o (C_G − C_E) · s_e C_Eᵀ M⁻¹  =  W_o + W_o A Bᵀ

M depends only on the text features, so one Cholesky factorisation serves every K/V matrix of
the same context width d, and the update has rank ≤ n_e: ``up = W_o A`` (d_out × n_e),
``down = Bᵀ`` (n_e × d).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from .errors import NonFiniteResultError
from .patch import DenseEdit, Edit, LowRankEdit, check_finite, compute_dtype


# Σ WᵀW is symmetric: formed by row blocks of this width on and above the diagonal, about half the products of
# a full WᵀW (the SDXL probe's 140 K/V matrices, float32, 2-core CPU, under cProfile: 19 s → 9.5 s; README)
GRAM_BLOCK = 256


def add_gram(upper: torch.Tensor, w: torch.Tensor) -> None:
    """upper += WᵀW on and above the diagonal blocks (`symmetric(upper)` completes it); the products are formed
    in w's dtype and added into upper's."""
    for start in range(0, w.shape[1], GRAM_BLOCK):
        upper[start:start + GRAM_BLOCK, start:] += w[:, start:start + GRAM_BLOCK].T @ w[:, start:]


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix with `upper`'s upper triangle."""
    return upper.triu() + upper.triu(1).T


def gram_sum(weights: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """G = Σ WᵀW over `weights` (matrices of one input width) on `device`: float32 products (float64 for float64
    weights) summed in float64, as the probe sums them. Products in float64 changed RECE's edit of a real-size SD1.5
    by 2e-5 of ΔW (far below the fp16 rounding of what is written) and cost twice the time on a CPU, 64 times on a
    consumer GPU's float64 units."""
    upper = None
    for w in weights:
        w = w.to(device, compute_dtype(w.dtype))
        if upper is None:
            upper = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=device)
        add_gram(upper, w)
    return symmetric(upper)


def solve_spd(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """M⁻¹ rhs for symmetric positive definite M (Cholesky; eigen-decomposition if that fails)."""
    factor, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    values, vectors = torch.linalg.eigh(M)
    if values.min() <= 0:
        raise NonFiniteResultError("the feature matrix M is not positive definite: raise lam")
    return vectors @ ((vectors.T @ rhs) / values[:, None])


def uce_factors(
    c_erase: torch.Tensor,
    c_guide: torch.Tensor,
    c_preserve: torch.Tensor,
    lam: float,
    erase_scale: float,
    preserve_scale: float,
    dtype: torch.dtype = torch.float64,
    preserve_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the UCE update ΔW = W_o A Bᵀ, both d × n_e, in `dtype` on the features' device.

    `preserve_target` (d × n_p, T_P): what the preserved columns must map to, W C_P ≈ W_o T_P, when an
    earlier edit moved the features (C_P ≠ T_P); then ΔW = W_o [(C_G − C_E) s_e C_Eᵀ + (T_P − C_P) s_p C_Pᵀ] M⁻¹
    and A, B gain n_p columns. None means T_P = C_P, UCE's own case."""
    # Memory grows with the column count (100 concepts × 77 tokens on SDXL: 116 MiB per d × n
    # float64 array), so temporaries are dropped as soon as possible and scaled in place.
    c_e, c_p = c_erase.to(dtype), c_preserve.to(dtype)
    d = c_e.shape[0]
    M = lam * torch.eye(d, dtype=dtype, device=c_e.device)
    M = torch.addmm(M, c_e, c_e.T, alpha=erase_scale)
    if c_p.shape[1]:
        M = torch.addmm(M, c_p, c_p.T, alpha=preserve_scale)
    A = c_guide.to(dtype) - c_e
    if preserve_target is None or not c_p.shape[1]:
        return A, solve_spd(M, c_e).mul_(erase_scale)
    A = torch.cat([A, preserve_target.to(dtype) - c_p], 1)
    return A, solve_spd(M, torch.cat([erase_scale * c_e, preserve_scale * c_p], 1))


def right_update_edits(
    weights: Mapping[str, torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Edit]:
    """Apply ΔW = W A Bᵀ to every matrix: low-rank factors where they are smaller than the matrix,
    otherwise new dense values (the shared d × d product A Bᵀ is then formed once).

    Factors are float32, float64 for float64 weights (so exact checks keep their precision)."""
    edits: dict[str, Edit] = {}
    rank, d = A.shape[1], A.shape[0]
    factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, dtype) → (A, Bᵀ), made on first use
    dense: dict[tuple, torch.Tensor] = {}  # (device, dtype) → A Bᵀ, made on first use
    finite: list[torch.Tensor] = []  # checked once at the end: one device sync, not one per matrix
    for i, (key, weight) in enumerate(weights.items()):
        where = (weight.device, compute_dtype(weight.dtype))
        w = weight.to(where[1])
        out = w.shape[0]
        if rank * (out + d) < out * d:
            if where not in factors:
                factors[where] = (A.to(*where), B.T.to(*where).contiguous())
            a, bt = factors[where]
            up = w @ a
            finite.append(torch.isfinite(up).all())
            edits[key] = LowRankEdit(up, bt)
        else:
            if where not in dense:
                dense[where] = (A @ B.T).to(*where)
            new = torch.addmm(w, w, dense[where])
            finite.append(torch.isfinite(new).all())
            edits[key] = DenseEdit(new.to(weight.dtype))
        del w
        if progress:
            progress(i + 1, len(weights))
    if finite and not bool(torch.stack([f.to(finite[0].device) for f in finite]).all()):
        bad = next(k for k, f in zip(edits, finite) if not bool(f))
        check_finite(bad, *edits[bad].tensors().values())
    return edits


def default_rcond(d: int, n: int, feature_dtype: torch.dtype) -> float:
    """max(d, N) · eps of the dtype the features were computed in: the pseudo-inverse cut-off of
    NumPy and torch.linalg.pinv, taken at the features' own precision so that columns equal in exact
    arithmetic (BOS in every prompt, shared prefixes) but not bit for bit are not inverted as noise."""
    return max(d, n) * torch.finfo(feature_dtype).eps


def zero_residual_factors(
    X: torch.Tensor, Y: torch.Tensor, rcond: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ErasePro's constrained update ΔW = W_o A Bᵀ (Chen et al. 2025, eq. 4–5, App. A):

        min_W ‖W − W_o‖²_F  s.t.  W X = W_o Y    ⇒    W* = W_o + W_o (Y − X)(XᵀX)⁻¹Xᵀ = W_o + W_o (Y − X) X⁺

    X, Y (d × N): paired target and anchor features as columns. With the thin SVD X = U S Vᵀ and
    the r singular values above rcond · s_max kept, X⁺ = V_r S_r⁻¹ U_rᵀ is the Moore–Penrose
    pseudo-inverse: exactly (XᵀX)⁻¹Xᵀ when X has full column rank, otherwise the minimum-norm
    least-squares W (still zero residual when the constraints agree, e.g. repeated columns with
    the same anchor). The SVD avoids forming XᵀX, whose condition number is cond(X)².
    A = (Y − X) V_r S_r⁻¹ and B = U_r are d × r with r ≤ min(d, N): ΔW has rank ≤ N, and the same
    factors serve every matrix that reads these features."""
    x, y = X.to(dtype), Y.to(dtype)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    keep = S > rcond * S[0] if S.numel() else S > 0
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    return ((y - x) @ Vh.T) / S, U
