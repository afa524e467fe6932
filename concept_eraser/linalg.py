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

from typing import Callable, Mapping

import torch

from .errors import NonFiniteResultError
from .patch import DenseEdit, Edit, LowRankEdit, check_finite


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with the UCE update ΔW = W_o A Bᵀ, both d × n_e, in `dtype` on the features' device."""
    c_e, c_g, c_p = (c.to(dtype) for c in (c_erase, c_guide, c_preserve))
    d = c_e.shape[0]
    M = lam * torch.eye(d, dtype=dtype, device=c_e.device)
    M = torch.addmm(M, c_e, c_e.T, alpha=erase_scale)
    if c_p.shape[1]:
        M = torch.addmm(M, c_p, c_p.T, alpha=preserve_scale)
    B = erase_scale * solve_spd(M, c_e)
    return c_g - c_e, B


def right_update_edits(
    weights: Mapping[str, torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Edit]:
    """Apply ΔW = W A Bᵀ to every matrix: low-rank factors where they are smaller than the matrix,
    otherwise new dense values (the shared d × d product A Bᵀ is then formed once)."""
    edits: dict[str, Edit] = {}
    rank, d = A.shape[1], A.shape[0]
    shared: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for i, (key, weight) in enumerate(weights.items()):
        device = weight.device
        if device not in shared:
            shared[device] = (A.to(device, torch.float32), B.T.to(device, torch.float32).contiguous(), None)
        a, bt, dense = shared[device]
        w = weight.float()
        out = w.shape[0]
        if rank * (out + d) < out * d:
            up = w @ a
            check_finite(key, up)
            edits[key] = LowRankEdit(up, bt)
        else:
            if dense is None:
                dense = (A @ B.T).to(device, torch.float32)
                shared[device] = (a, bt, dense)
            new = torch.addmm(w, w, dense)
            check_finite(key, new)
            edits[key] = DenseEdit(new.to(weight.dtype))
        if progress:
            progress(i + 1, len(weights))
    return edits
