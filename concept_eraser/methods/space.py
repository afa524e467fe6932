"""SPACE — SParse cross-Attention-based Concept Erasure (Novello & Tonello, arXiv 2605.10198).

UCE's loss plus an entry-wise L1 norm of the edited matrix itself (not of the change), for every
cross-attention K and V matrix:

    min_W  F(W) = f(W) + μ ‖W‖₁                                                    (SPACE Eq. 5)
    f(W) = s_e ‖W C_E − W_o C_G‖² + s_p ‖W C_P − W_o C_P‖² + λ ‖W − W_o‖²          (UCE loss, Eq. 2)

With U = [√s_e C_E, √s_p C_P] and V = [√s_e C_G, √s_p C_P] (d × r, r = n_e + n_p columns):

    f(W) = ‖W U − W_o V‖² + λ ‖W − W_o‖²,   ∇f(W) = 2 (W M − B),   M = λ I + U Uᵀ       (Eq. 8)

F decouples over the ROWS of W: each row is a Lasso with the Gram matrix M, the same for every row of every
matrix. The optimum depends on U, V only through U Uᵀ and U Vᵀ, so they are first replaced by Ũ, Ṽ with the
same products and k ≤ min(r, d) orthogonal columns (`reduce_operands`).

Why not FISTA (the paper's solver, `solver=fista`, kept with O'Donoghue & Candès' adaptive restart): its
iteration count grows with √κ, κ = σ_max(M)/λ, and with 77-token columns κ is 2e5 (SD1.5) to 7e6 (SDXL,
real-size encoders): thousands of iterations, and 1000 ended unconverged on SDXL with 9–14 % zeros.

Default solver: semismooth Newton on the dual. Per row (w, w_o, v = Ṽᵀw_o), with φ(x) = λ (x − w_o)² + μ|x|
entry-wise and g(z) = ‖z − v‖², Fenchel duality gives a dual in y ∈ ℝᵏ that is smooth and strongly concave:

    D(y) = −⟨y, v⟩ − ‖y‖²/4 − λ Σ_j S_τ(c_j)² + λ ‖w_o‖²,   c = w_o − Ũ y/(2λ),   τ = μ/(2λ)
    x(y) = S_τ(c)   (the primal point of y; x(y*) = W*'s row),   S_τ(x) = sign(x) max(|x| − τ, 0)   (Eq. 6)
    ∇(−D)(y) = y/2 + v − Ũᵀ x(y),   generalised Hessian H = I/2 + Ũᵀ diag(|c| > τ) Ũ/(2λ)

Each Newton step solves H Δ = −∇(−D) for all rows at once by preconditioned conjugate gradients (one product
of the n × d rows with Ũᵀ and one with Ũ per CG iteration, the cost of one FISTA iteration; preconditioner:
H with the active mask replaced by the row's active share, diagonal because Ũ's columns are orthogonal: it
leaves a condition number of ~3 where H's own is 6e6 on SDXL), to 10 % and, near the optimum, to √distance
(superlinear convergence), then backtracks per row on −D (Armijo). The Hessian's spread is absorbed by the
k-dimensional solve, so the step count does not grow with κ: 5–6 steps, ~25 passes over the weights on
SD1.5/SDXL with 77-token columns at the default sparsity. Start: the dual point of the UCE solution
(``start=uce``, the μ = 0 optimum: for μ = 0 it is exact at once) or of W_o (``start=original``).

Certified stop. For any primal W and dual point y the duality gap F(W) − D(y) ≥ F(W) − F* is the sum of
‖W Ũ − W_o Ṽ − y/2‖² and non-negative entry terms φ(x) + φ*(s) − s x (s = −Ũ y); since F is 2λ-strongly
convex, ‖W − W*‖/‖W‖ ≤ √(gap/λ)/‖W‖ =: distance. Newton pairs W = x(y) with its own y: the entry terms then
vanish and the gap is ‖∇(−D)(y)‖², free at every step; the stop is confirmed with the entry terms computed
(float64, so rounding in c cannot fake it). FISTA, which has no dual iterate, uses y = 2 (W Ũ − W_o Ṽ), whose
gap is ~κ times larger near the optimum. The solve stops when distance ≤ ``tol`` (1e-4: below the fp16
rounding of the written weights); a `ConvergenceWarning` (not an error: the command line prints it as a
warning line, hosts show it) and ``converged: false`` in the report say when ``iterations`` ran out first.
Precision: the products over the weights run in ``solve_dtype`` (float32); c and y are float64, and so is the
residual R = W Ũ − W_o Ṽ (it cancels: a float32 product of W is off by eps·√κ in the certificate). R is
updated by the float32 product of each step's change of W, which shrinks as the solve converges, and
recomputed by a float64 product before a stop is certified.

Computation. The matrices are solved in chunks of whole matrices of one width (at most 4 M entries on CPU,
16 M on CUDA, and 1/64 of all K/V entries), read from the model one chunk at a time; element-wise work and
float64 copies go a block of 256 k entries at a time, and each matrix's result is stored in the model's dtype at
once, in the smaller of its two forms (below). Memory is the result (at most the K/V weights' own size) plus ~45
bytes per chunk entry; the measured peak on SDXL is in the README's Benchmarks.

Variables → paper symbols: ``mu`` μ (sparsity weight), ``lam`` the ridge weight of UCE's Eq. 2,
``erase_scale`` / ``preserve_scale`` the weights of its erase / preserve sums, ``U``/``V``/``M`` as above.

Defaults, and why (the paper's μ, λ and iteration count were lost from its text; its code is not public).
λ = 0.5 and scales 1 as in UCE's current script, which SPACE builds on. Tokens: ``last_word_to_end`` with the
empty prompt preserved (the guidance's unconditional branch). The paper's one column per prompt (``last_word``,
no empty prompt) barely erased attribute and multi-word concepts on ToyWorld and moved the empty prompt's K/V by
74 %; the 77-token columns are what made FISTA slow, and they do not slow Newton. μ: a fixed μ gives a different
sparsity on every model and column set (an entry becomes zero roughly where |W_o| < μ/(2λ), but the columns'
constraints W Ũ ≈ W_o Ṽ keep more entries of each row non-zero the more columns there are: 2λ × the 80th
percentile of |W_o| gave 78 % zeros with one column, 59–70 % with 77-token columns). So the default μ is the one
whose optimum has ``sparsity`` zeros on 512 rows sampled evenly from
all K/V matrices, found by bisection in log μ (a few Newton solves on the sample); the μ used is reported, and a
number for ``mu`` overrides the search. ``iterations`` 500 is a cap (convergence took 21–25 passes with features
from real-size text encoders, ~60 on synthetic ones); ``start = uce`` (the μ = 0 optimum). ``sparsity`` 0.4 by
default, chosen on ToyWorld (48 samples per set, preserved on the four tasks): 0.8 — the paper's regime, 80–90 %
on SDXL — kept 53 / 33 / 27 / 29 %, 0.5 kept 96 / 81 / 83 / 92 %, 0.4 kept 100 / 90 / 96 / 98 % while erasing no
less than UCE (100 / 81 / 60 / 73 % against 100 / 65 / 38 / 73 %); ``sparsity=0.8`` gives the paper's sparsity.

The result is a sparse W per matrix, stored as its CSR (`SparseEdit`: only the non-zeros) when that takes fewer
bytes than the dense matrix, else dense (`DenseEdit`): CSR costs a value and a column index (int16) per non-zero,
so it is the larger below ~50 % zeros in fp16 (~33 % in fp32; the paper notes the same), and at the default 40 %
an fp16 model's matrices are stored dense. Checkpoints are written dense either way, and `--format patch` files
hold the change W − W_o (float32, so a patch stays a change on another checkpoint). The report gives per matrix
and in total the sparsity (also per width; the per-tensor zeros of `layers` too, whatever the form), the
objective F before and after, the passes, Newton steps, the duality gap and distance bound, plus the storage of
the edited matrices (the paper's figures, whatever form is stored): dense (the model's dtype), sparse (CSR) and
that CSR deflated (the paper's ZIP "storage" column), and the bytes actually stored. Not low-rank: it cannot be
saved as a LoRA.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..concepts import Columns, Concepts
from ..editable import EditableModel, Progress
from ..errors import ConvergenceWarning
from ..linalg import uce_factors
from ..params import Param, Values
from ..patch import Edit, SparseEdit, check_written_finite, edit_nbytes
from ..safetensors_io import tensor_bytes
from .base import ErasureMethod, MethodOutput
from .uce import SOLVE_DTYPES, UCE_PARAMS, gather_columns

SOLVERS = ("newton", "fista")
STARTS = ("uce", "original")
CHECK_EVERY = 10  # FISTA iterations between certificate / restart checks
CG_RTOL = 0.1  # inexact Newton: each system to 10 % at most (the certificate, not CG, decides when to stop)
CG_FORCING = 1.0  # ... and to √(distance) × this near the optimum (superlinear convergence)
CG_MAX = 10  # CG iterations per Newton step at most (50 went into over-long first steps from UCE: t ≈ 0.05)
LINE_SEARCH_HALVINGS = 20  # then a row keeps its point for this step (float round-off floor)
CHUNK_ENTRIES = {"cpu": 2 ** 22, "cuda": 2 ** 24}  # rows solved together: memory stays a few chunk-sized buffers
CHUNK_SHARE = 64  # ... and at most this share of all K/V entries (at least one matrix): ~0.3× the fp16 weights
BLOCK_ENTRIES = 2 ** 18  # element-wise work and float64 copies a block of rows at a time
MU_SAMPLE_ROWS = 512  # rows (evenly strided over every K/V) on which the automatic μ is searched
MU_SEARCH_TOL = 0.01  # the automatic μ hits the target sparsity of the sample within this

_UCE = {p.name: p for p in UCE_PARAMS}


@dataclass(frozen=True)
class Operands:
    """The text side of the loss, reduced. The optimum depends on U and V only through U Uᵀ and U Vᵀ, so
    they are replaced by Ũ, Ṽ (d × k, k ≤ min(r, d)) with the same two products and orthogonal columns
    Ũ_j of squared norms `eig`: Ũ = U P, Ṽ = V P with P the eigenvectors of Uᵀ U (r ≤ d), or Ũ = Q Λ^½,
    Ṽ = V Uᵀ Q Λ^−½ from U Uᵀ = Q Λ Qᵀ (r > d). Float64; directions with eigenvalue < 1e-13 × the largest
    (numerically null) are dropped. ‖W_o V‖² is not kept: `lost` (d × m) has V Vᵀ − Ṽ Ṽᵀ = lost lostᵀ, so
    F = ‖W Ũ − W_o Ṽ‖² + ‖W_o lost‖² + λ‖W − W_o‖² + μ‖W‖₁ (m = 0 when no direction was dropped, r ≤ d)."""

    U: torch.Tensor
    V: torch.Tensor
    eig: torch.Tensor
    lost: torch.Tensor


def space_operands(columns: Columns, erase_scale: float, preserve_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U = [√s_e C_E, √s_p C_P] and V = [√s_e C_G, √s_p C_P] (d × r, float64; module docstring)."""
    e, p = math.sqrt(erase_scale), math.sqrt(preserve_scale)
    U = torch.cat([e * columns.erase, p * columns.preserve], 1).double()
    V = torch.cat([e * columns.guide, p * columns.preserve], 1).double()
    return U, V


def reduce_operands(U: torch.Tensor, V: torch.Tensor) -> Operands:
    U, V = U.double(), V.double()
    d, r = U.shape
    if r <= d:
        eig, P = torch.linalg.eigh(U.T @ U)
        keep = eig > 1e-13 * eig[-1].clamp_min(1e-300)
        return Operands(U @ P[:, keep], V @ P[:, keep], eig[keep], V @ P[:, ~keep])  # P orthogonal
    eig, Q = torch.linalg.eigh(U @ U.T)
    keep = eig > 1e-13 * eig[-1].clamp_min(1e-300)
    eig, Q = eig[keep], Q[:, keep]
    V_r = (V @ (U.T @ Q)) / eig.sqrt()
    rest, basis = torch.linalg.eigh(V @ V.T - V_r @ V_r.T)  # positive semi-definite: V (I − projector) Vᵀ
    big = rest > 1e-13 * rest[-1].clamp_min(1e-300)
    return Operands(Q * eig.sqrt(), V_r, eig, basis[:, big] * rest[big].sqrt())


@dataclass(frozen=True)
class SolveResult:
    weights: torch.Tensor  # W, rows as given: float64 (Newton) or the work dtype (FISTA)
    residual: torch.Tensor  # W Ũ − W_o Ṽ, float64
    iterations: int  # passes of all rows through Ũ and Ũᵀ (what one FISTA iteration costs)
    newton_steps: int  # 0 for FISTA
    converged: bool
    gap: float  # certified: F(W) − min F ≤ gap
    distance: float  # √(gap/λ) / ‖W‖ ≥ ‖W − W*‖ / ‖W‖ (F is 2λ-strongly convex)


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """S_τ(x) = sign(x) max(|x| − τ, 0)  (Eq. 6)."""
    return x - x.clamp(-tau, tau)


def row_blocks(n: int, d: int):
    """Slices of at most BLOCK_ENTRIES entries of an n × d matrix (whole rows): element-wise work and float64
    copies are made a block at a time, so they cost a block of memory, not a chunk."""
    rows = max(1, BLOCK_ENTRIES // max(d, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def soft_threshold_(C: torch.Tensor, tau: float) -> torch.Tensor:
    """S_τ(C) in place, a block at a time."""
    for b in row_blocks(*C.shape):
        C[b] -= C[b].clamp(-tau, tau)
    return C


def duality_gap(X: torch.Tensor, W_o: torch.Tensor, R: torch.Tensor, U: torch.Tensor, lam: float, mu: float) -> float:
    """The duality gap of W = X for the dual point y = 2 R, R = X Ũ − W_o Ṽ (float64; module docstring).
    `U` is Ũ in W_o's dtype."""
    return entry_gap(X, lambda b: torch.addmm(W_o[b], R[b].to(U.dtype), U.T, alpha=-1.0 / lam).double(), W_o,
                     lam, mu)


def entry_gap(X: torch.Tensor, dual_c, W_o: torch.Tensor, lam: float, mu: float, x_tau: float | None = None) -> float:
    """Σ φ(x) + φ*(s) − s x over the entries, φ(x) = λ (x − w_o)² + μ |x|, for the primal W = X (with `x_tau`:
    W = S_τ(X)) and the dual slack s = 2λ (c − w_o), c = `dual_c(rows)` (float64): the part of the duality
    gap that the entries carry. For the dual point y, c = w_o − Ũ y/(2λ) and the gap is this plus
    ‖W Ũ − W_o Ṽ − y/2‖²; for y = 2R, R = W Ũ − W_o Ṽ, the latter is 0. Non-negative terms, so no large sums
    cancel; float64, a block of rows at a time."""
    total, tau = 0.0, mu / (2 * lam)
    for b in row_blocks(*X.shape):
        c = dual_c(b)
        x = X[b].double() if x_tau is None else soft_threshold(X[b], x_tau)
        x_dual = soft_threshold(c, tau)  # the minimiser of φ(x) − s x
        terms = lam * (x - x_dual) * (x + x_dual - 2 * c) + mu * (x.abs() - x_dual.abs())
        total += terms.sum().item()
    return max(total, 0.0)


def mm64(X: torch.Tensor, B: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """X B in float64 (B float64), a block of rows at a time; with `tau`, S_τ(X) B."""
    out = X.new_empty(X.shape[0], B.shape[1], dtype=torch.float64)
    for b in row_blocks(*X.shape):
        x = X[b].double()
        torch.mm(x if tau is None else soft_threshold(x, tau), B, out=out[b])
    return out


def residual(X: torch.Tensor, ops: Operands, WoV: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """R = X Ũ − W_o Ṽ (with `tau`: S_τ(X) Ũ − W_o Ṽ) in float64: the difference cancels (it is small where
    W Ũ ≈ W_o Ṽ is held), so the product is float64 whatever the work dtype."""
    return mm64(X, ops.U, tau).sub_(WoV)


def certificate(X, W_o, R, Uw, lam, mu) -> tuple[float, float]:
    gap = duality_gap(X, W_o, R, Uw, lam, mu)
    return gap, relative_distance(gap, lam, sum(X[b].double().pow(2).sum().item() for b in row_blocks(*X.shape)))


def relative_distance(gap: float, lam: float, norm2: float) -> float:
    """√(gap/λ)/‖W‖ ≥ ‖W − W*‖/‖W‖ (F is 2λ-strongly convex)."""
    return math.sqrt(gap / lam / norm2) if norm2 > 0 else (0.0 if gap == 0 else math.inf)


def dual_start(W_o: torch.Tensor, ops: Operands, uce: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """y = 2 (W_0 Ũ − W_o Ṽ) for the start W_0: W_o, or UCE's W_o + W_o A Bᵀ (= 2 W_o (Ũ + A Bᵀ Ũ − Ṽ))."""
    P = ops.U - ops.V
    if uce is not None:
        P = P + uce[0] @ (uce[1].T @ ops.U)
    return mm64(W_o, 2.0 * P)


def uce_start(W_o: torch.Tensor, uce: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """UCE's W_o + W_o A Bᵀ in float64 (a rank-n_e product): c(y) at y = `dual_start`, exactly."""
    A, B = uce
    WA = mm64(W_o, A)
    C = W_o.new_empty(W_o.shape, dtype=torch.float64)
    for b in row_blocks(*W_o.shape):
        torch.addmm(W_o[b].double(), WA[b], B.T, out=C[b])
    return C


def newton_l1(
    W_o: torch.Tensor,
    ops: Operands,
    lam: float,
    mu: float,
    Y: torch.Tensor,
    iterations: int,
    tol: float,
    C: torch.Tensor | None = None,
) -> SolveResult:
    """Minimise ‖W Ũ − W_o Ṽ‖² + λ‖W − W_o‖² + μ‖W‖₁ by semismooth Newton on its dual (module docstring),
    from the dual point `Y` (n × k float64); W_o (n × d) in the work dtype of the products. `C`: c(Y) =
    w_o − Ũ y/(2λ) when the caller has it exactly (UCE's solution; float64, used as the work buffer).
    Stops when the certified relative distance to the optimum is ≤ `tol`, or after `iterations` passes (one
    pass = two n × d × k products in the work dtype, the cost of a FISTA iteration; a float64 one counts two).

    State: c in float64 (x = S_τ(c) is made from it when needed: a float32 W alone would be off by eps·√κ in
    the certificate), y and the residual R = x Ũ − W_o Ṽ (n × k, float64). R is updated by the float32 product
    of each step's change of x, which shrinks as the solve converges, and recomputed in float64 before a
    stop is certified. Gap: at x = x(y) the duality gap of (x, y) is exactly ‖y/2 − R‖² = ‖∇(−D)(y)‖² (the
    entry terms φ(x) + φ*(s) − s x vanish), free each step; the stop is then confirmed by the entry-wise gap of
    (x, 2R) (`duality_gap`), which does not rely on c being exactly c(y)."""
    n, d = W_o.shape
    dtype, tau = W_o.dtype, mu / (2 * lam)
    U = ops.U.to(dtype)
    WoV = mm64(W_o, ops.V)
    products = 1  # every n × d × k product counts ½ pass, whatever its dtype
    if C is None:
        C = torch.empty(n, d, dtype=torch.float64, device=W_o.device)
        for b in row_blocks(n, d):
            torch.addmm(W_o[b].double(), Y[b], ops.U.T, alpha=-0.5 / lam, out=C[b])
        products += 1
    R = residual(C, ops, WoV, tau)  # x = S_τ(c)
    norm2 = torch.zeros(n, dtype=torch.float64, device=W_o.device)  # ‖x‖² per row
    for b in row_blocks(n, d):
        norm2[b] = soft_threshold(C[b], tau).pow(2).sum(1)
    products += 1
    steps, converged, exact_r = 0, False, True
    dX = torch.empty(n, d, dtype=dtype, device=W_o.device)  # the change of x in a step
    while True:
        G = Y / 2 - R  # ∇(−D)(y) = y/2 + Ṽᵀw_o − Ũᵀx
        distance = relative_distance(G.pow(2).sum().item(), lam, norm2.sum().item())
        remaining = 2 * iterations - products
        last = remaining < 5  # no room for a step (CG, the update of R) and the stop (R in float64, the gap)
        if distance <= tol or last:
            if not exact_r:  # R drifted by the float32 rounding of its updates: recompute it in float64
                R, exact_r = residual(C, ops, WoV, tau), True
                products += 1
                G = Y / 2 - R
            # The gap of (x, y): ‖R − y/2‖² plus the entry terms, which vanish but for rounding (c = c(y)).
            gap = G.pow(2).sum().item() + entry_gap(
                C, lambda b, Y=Y: torch.addmm(W_o[b].double(), Y[b], ops.U.T, alpha=-0.5 / lam), W_o, lam, mu, tau)
            distance = relative_distance(gap, lam, norm2.sum().item())
            products += 1
            if distance <= tol or last:
                converged = distance <= tol
                break
        # Inexact Newton: systems to rtol, tightened near the optimum (superlinear convergence).
        rtol = min(CG_RTOL, math.sqrt(distance) * CG_FORCING)
        active = torch.empty(n, d, dtype=dtype, device=W_o.device)  # the generalised Jacobian of x(y): |c| > τ
        for b in row_blocks(n, d):
            torch.gt(C[b].abs(), tau, out=active[b])
        step, UD, cg_products = newton_direction(G.to(dtype), active, U, ops.eig.to(dtype), lam, rtol,
                                                 min(CG_MAX, (remaining - 3) // 2))
        del active
        step = step.double()
        t = line_search(C, UD, G, step, WoV, Y, lam, tau, dX, norm2)  # c moves by −t Ũ Δ/(2λ), row-wise
        del UD
        R += torch.mm(dX, U).double()
        products += cg_products + 1
        exact_r = False
        Y = Y + t * step
        steps += 1
    return SolveResult(soft_threshold_(C, tau), R, math.ceil(products / 2), steps, converged, gap, distance)


def line_search(C, UD, G, step, WoV, Y, lam, tau, dX, norm2) -> torch.Tensor:
    """Backtracking per row on −D(y) = ⟨y, Ṽᵀw_o⟩ + ‖y‖²/4 + λ Σ S_τ(c)² (+ const), by exact differences,
    a block of rows at a time. Moves c in place to c − t UD, writes the change of x = S_τ(c) into `dX` and
    the new ‖x‖² per row into `norm2`; returns t (n × 1)."""
    n, d = C.shape
    slope = (G * step).sum(1)
    linear, quadratic = (step * (WoV + Y / 2)).sum(1), step.pow(2).sum(1) / 4
    t = torch.ones(n, 1, dtype=torch.float64, device=C.device)
    for b in row_blocks(n, d):
        c, ud = C[b], UD[b].double()
        x = soft_threshold(c, tau)
        tb = t[b]
        for _ in range(LINE_SEARCH_HALVINGS):
            x_t = soft_threshold(torch.addcmul(c, tb, ud, value=-1.0), tau)
            s = tb[:, 0]
            ok = s * linear[b] + s * s * quadratic[b] + lam * ((x_t - x) * (x_t + x)).sum(1) <= 1e-4 * s * slope[b]
            if bool(ok.all()):
                break
            tb[~ok] /= 2
        else:
            tb[~ok] = 0.0  # no decrease measurable for these rows: they keep their point
            x_t = soft_threshold(torch.addcmul(c, tb, ud, value=-1.0), tau)
        c.addcmul_(tb, ud, value=-1.0)
        torch.sub(x_t, x, out=dX[b]) if dX.dtype == torch.float64 else dX[b].copy_(x_t - x)
        norm2[b] = x_t.pow(2).sum(1)
    return t


def newton_direction(G: torch.Tensor, active: torch.Tensor, U: torch.Tensor, eig: torch.Tensor, lam: float,
                     rtol: float, most: int = CG_MAX):
    """Solve H Δ = −G row by row, H = I/2 + Ũᵀ diag(active) Ũ/(2λ), to relative residual `rtol`, by
    preconditioned conjugate gradients on all rows at once (one n × d × k product pair per iteration).
    Preconditioner: H with diag(active) replaced by the row's active share times I, diagonal since Ũ's columns
    are orthogonal (it leaves a condition number of ~3 on SDXL's features). At most `most` iterations. Returns
    (Δ, Δ Ũᵀ/(2λ), products made): Δ Ũᵀ is summed from the iterations' own p Ũᵀ, so it costs no product."""
    scale = G.norm(dim=1, keepdim=True)
    live = scale > 0
    B = -G / torch.where(live, scale, torch.ones_like(scale))  # unit rows: one relative tolerance for all
    inv_diag = 1.0 / (0.5 + active.mean(1, keepdim=True) * eig / (2 * lam))
    x = torch.zeros_like(B)
    xU = torch.zeros_like(active)
    r = B.clone()
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    products = 0
    for _ in range(most):
        pU = torch.mm(p, U.T)
        Hp = torch.mm(pU * active, U).mul_(0.5 / lam).add_(p, alpha=0.5)
        products += 2
        pHp = (p * Hp).sum(1, keepdim=True)
        alpha = torch.where(pHp > 0, rz / pHp.clamp_min(torch.finfo(B.dtype).tiny), torch.zeros_like(pHp))
        x.addcmul_(alpha, p)
        xU.addcmul_(alpha, pU)
        del pU
        r.addcmul_(alpha, Hp, value=-1.0)
        if bool((r.norm(dim=1) <= rtol).all()):
            break
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(B.dtype).tiny), torch.zeros_like(rz))
        p = z.addcmul_(beta, p)
        rz = rz_next
    return x * scale, xU.mul_(scale * (0.5 / lam)), products


def fista_l1(
    W_o: torch.Tensor,
    ops: Operands,
    lam: float,
    mu: float,
    start: torch.Tensor,
    iterations: int,
    tol: float,
    restart: bool = True,
) -> SolveResult:
    """The paper's solver: FISTA (Eqs. 7–9) on ‖W Ũ − W_o Ṽ‖² + λ‖W − W_o‖² + μ‖W‖₁ from W_0 = `start` (used
    as a work buffer), with O'Donoghue & Candès' adaptive restart when `restart`; every CHECK_EVERY iterations
    the restart test and the certificate (the same stopping rule as Newton's). The gradient's product over the
    weights is (Y Ũ − W_o Ṽ) Ũᵀ, two n × d × k products, or (Y Ũ Ũᵀ − W_o Ṽ Ũᵀ) with Ũ Ũᵀ (d × d) formed once, one
    n × d × d product: whichever costs less for this width (the second when k > d/2)."""
    dtype = W_o.dtype
    U = ops.U.to(dtype)
    sigma = lam + ops.eig.max().item() if len(ops.eig) else lam  # σ_max(M); L = 2σ
    step, tau = 1.0 / sigma, mu / (2.0 * sigma)  # ∇f/L = (Y M − B)/σ;  threshold μ/L
    WoV = mm64(W_o, ops.V)
    dense = 2 * U.shape[1] > U.shape[0]
    if dense:
        UUt, target = (ops.U @ ops.U.T).to(dtype), (WoV @ ops.U.T).to(dtype)  # Ũ Ũᵀ and W_o Ṽ Ũᵀ
    else:
        target, small = WoV.to(dtype), W_o.new_empty(W_o.shape[0], U.shape[1])
    W_prev, Y = start, start.clone()
    W, Z = torch.empty_like(Y), torch.empty_like(Y)
    t, gap, distance, converged, k = 1.0, math.inf, math.inf, False, 0
    for k in range(1, iterations + 1):
        torch.lerp(W_o, Y, 1.0 - step * lam, out=Z)  # Y − λ (Y − W_o)/σ
        if dense:
            Z.add_(target, alpha=step).addmm_(Y, UUt, alpha=-step)  # − (Y Ũ Ũᵀ − W_o Ṽ Ũᵀ)/σ, no n × d buffer
        else:
            torch.addmm(target, Y, U, beta=-1.0, out=small)  # Y Ũ − W_o Ṽ
            Z.addmm_(small, U.T, alpha=-step)  # − (Y Ũ − W_o Ṽ) Ũᵀ/σ
        torch.clamp(Z, -tau, tau, out=W)
        torch.sub(Z, W, out=W)  # W_k = S_τ(Z)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_next
        check = k % CHECK_EVERY == 0 or k == iterations
        if check:
            R = residual(W, ops, WoV)
            gap, distance = certificate(W, W_o, R, U, lam, mu)
            torch.sub(W, W_prev, out=Z)
            z = Z.reshape(-1)
            # Uphill momentum, ⟨Y_k − W_k, W_k − W_{k−1}⟩ > 0: drop it and restart t.
            if restart and torch.dot(Y.reshape(-1), z) > torch.dot(W.reshape(-1), z):
                beta, t_next = 0.0, 1.0
        torch.lerp(W_prev, W, 1.0 + beta, out=Y)  # W_k + ((t_k − 1)/t_{k+1})(W_k − W_{k−1})
        W_prev, W = W, W_prev
        t = t_next
        if check and distance <= tol:
            converged = True
            break
    return SolveResult(W_prev, R, k, 0, converged, gap, distance)  # the last check was at iteration k


def objective_rows(X: torch.Tensor, W_o: torch.Tensor, R: torch.Tensor, ops: Operands, lam: float,
                   mu: float) -> torch.Tensor:
    """F(W) row by row, float64: ‖W Ũ − W_o Ṽ‖² (from the residual R) + ‖W_o lost‖² + λ‖W − W_o‖² + μ‖W‖₁ (Eq. 5;
    `Operands`), a block of rows at a time."""
    F = R.pow(2).sum(1)
    if ops.lost.shape[1]:
        F += mm64(W_o, ops.lost).pow(2).sum(1)
    for b in row_blocks(*X.shape):
        x = X[b].double()
        F[b] += lam * (x - W_o[b].double()).pow(2).sum(1) + mu * x.abs().sum(1)
    return F


SPACE_PARAMS = (
    Param("mu", float, None,
          "μ: weight of ‖W‖₁; larger = sparser (0 = UCE). Empty = the μ whose optimum has `sparsity` zeros on a "
          "sample of 512 K/V rows (found by bisection; the μ used is reported)", min=0.0, max=1e3, step=0.005,
          nullable=True),
    Param("sparsity", float, 0.4,
          "share of zero entries the automatic μ aims at (0.4 kept ≥ 90 % of other concepts on ToyWorld, 0.8 about "
          "30-50 %; the paper reports 80-90 % on SDXL); ignored when mu is set",
          min=0.0, min_exclusive=True, max=0.99, step=0.05),
    Param("solver", str, "newton",
          "newton: semismooth Newton on the dual (tens of passes, whatever the conditioning); fista: the paper's "
          "FISTA (with `restart`), thousands of passes on 77-token columns", choices=SOLVERS),
    Param("iterations", int, 500,
          "most passes over the weights (a Newton step takes a few; a FISTA iteration one); a warning says when "
          "they run out before tol", min=1, max=100000),
    Param("tol", float, 1e-4,
          "stop when the duality gap certifies ‖W − W*‖/‖W‖ ≤ tol (W* the exact optimum)",
          min=0.0, min_exclusive=True, max=1.0, step=1e-5),
    _UCE["lam"],
    replace(_UCE["erase_scale"], help="s_e: weight of the erase term (target → guide); UCE's current script: 1"),
    Param("preserve_scale", float, 1.0, "s_p: weight of the preserve term (UCE's current script: 1)",
          min=0.0, max=1e4, step=0.05),
    replace(_UCE["token_policy"], help="which token features stand for a prompt: last_word_to_end (UCE paper; "
            "default), last_word (UCE's current script, which SPACE builds on: one column per prompt), all_tokens"),
    replace(_UCE["preserve_empty"],
            help="also preserve the empty prompt, the guidance's unconditional branch (UCE's paper code does)"),
    Param("restart", bool, True,
          "solver=fista: adaptive momentum restart (O'Donoghue & Candès 2015); false = the paper's plain FISTA"),
    Param("start", str, "uce", "starting point: uce (the μ = 0 solution) or original (W_o)", choices=STARTS),
    replace(_UCE["solve_dtype"], default="float32",
            help="precision of the products over the weights (the certificate's residual is always float64)"),
)


def sample_rows(weights: Iterable[torch.Tensor], total: int, dtype: torch.dtype) -> torch.Tensor:
    """MU_SAMPLE_ROWS rows evenly strided over the matrices (`total` rows in all), read one matrix at a time."""
    stride = max(1, total // MU_SAMPLE_ROWS)
    rows, offset = [], 0
    for w in weights:
        first = (-offset) % stride
        rows.append(w[first::stride].to(dtype))
        offset += w.shape[0]
    return torch.cat(rows)


def auto_mu(W_s: torch.Tensor, ops: Operands, lam: float, uce, sparsity: float) -> tuple[float, float]:
    """(μ, sparsity reached on the sample): the μ whose optimum has `sparsity` zeros on the sample rows W_s
    (bracketed from 2λ × that quantile of |W_o|, then bisected in log μ)."""
    Y = dual_start(W_s, ops, uce)

    def zeros(mu: float) -> float:
        result = newton_l1(W_s, ops, lam, mu, Y, 200, 1e-3, None if uce is None else uce_start(W_s, uce))
        return (result.weights == 0).double().mean().item()

    mu = 2.0 * lam * torch.quantile(W_s.abs().float().reshape(-1), sparsity).item()
    reached = zeros(mu)
    lo, hi = (mu, None) if reached < sparsity else (None, mu)
    for _ in range(40):  # bracket
        if lo is not None and hi is not None:
            break
        mu = mu * 2 if hi is None else mu / 2
        reached = zeros(mu)
        lo, hi = (mu, hi) if reached < sparsity else (lo, mu)
    for _ in range(20):  # bisect
        if abs(reached - sparsity) <= MU_SEARCH_TOL:
            break
        mu = math.sqrt(lo * hi)
        reached = zeros(mu)
        lo, hi = (mu, hi) if reached < sparsity else (lo, mu)
    return mu, reached


class StorageSizes:
    """Bytes of the edited matrices, counted one matrix at a time as it is stored (only the stored form of each
    is kept): dense (the model's dtype), sparse (its CSR) and that CSR deflated (ZIP's compression), the paper's
    storage figures whatever form is stored, and what is stored (the smaller of the two). Deflate level 1: on
    weight data it compresses within 1 % of level 6 at several times the speed (SDXL's CSR is ~200 MB)."""

    def __init__(self):
        self.dense = self.sparse = self.compressed = self.stored = 0
        self.packer = zlib.compressobj(1)

    def add(self, csr: SparseEdit, stored: Edit) -> None:
        self.dense += math.prod(csr.shape) * csr.values.element_size()
        self.stored += edit_nbytes(stored)
        for tensor in csr.tensors().values():
            data = tensor_bytes(tensor)
            self.sparse += len(data)
            self.compressed += len(self.packer.compress(data))

    def figures(self) -> dict[str, Any]:
        compressed, dense = self.compressed + len(self.packer.flush()), self.dense
        return {"dense_bytes": dense, "sparse_bytes": self.sparse, "compressed_bytes": compressed,
                "stored_bytes": self.stored, "sparse_vs_dense": round(self.sparse / dense, 4) if dense else 0.0,
                "compressed_vs_dense": round(compressed / dense, 4) if dense else 0.0}


class SPACE(ErasureMethod):
    name = "space"
    title = "SPACE"
    summary = ("Sparse cross-attention erasure: UCE's loss plus an L1 penalty on the weights, solved to a certified "
               "optimum; sparse K/V, stronger on SDXL")
    params = SPACE_PARAMS
    sparse = True

    def run(
        self, model: EditableModel, concepts: Concepts, values: Values, progress: Progress
    ) -> MethodOutput:
        lam, s_e, s_p = values.lam, values.erase_scale, values.preserve_scale
        iterations, tol = values.iterations, values.tol
        dtype = SOLVE_DTYPES[values.solve_dtype]
        progress(0, 1, "encoding prompts")
        columns = gather_columns(model, concepts, values)
        ops = reduce_operands(*space_operands(columns, s_e, s_p))
        uce = None
        if values.start == "uce":
            uce = uce_factors(columns.erase, columns.guide, columns.preserve, lam, s_e, s_p)  # float64

        # The weights are read one chunk at a time and each result is stored in the model's dtype at once (CSR
        # or dense, the smaller): memory is the result plus a few chunk-sized buffers, not a copy of every K/V.
        keys = model.arch.map_keys()
        layout = {}  # key → (shape, dtype)
        for key in keys:
            w = model.weight(key)
            layout[key] = (tuple(w.shape), w.dtype)
            del w
        reached, search_seconds = None, 0.0
        if values.mu is None:
            progress(0, 1, f"choosing μ for {values.sparsity:.0%} zeros")
            started = time.perf_counter()
            W_s = sample_rows((model.weight(key) for key in keys), sum(layout[k][0][0] for k in keys), dtype)
            mu, reached = auto_mu(W_s, ops, lam, uce, values.sparsity)
            search_seconds = time.perf_counter() - started
            del W_s
        else:
            mu = values.mu
        total_entries = sum(math.prod(shape) for shape, _ in layout.values())
        chunks = weight_chunks({k: shape for k, (shape, _) in layout.items()},
                               min(CHUNK_ENTRIES.get(model.device.type, CHUNK_ENTRIES["cpu"]),
                                   total_entries // CHUNK_SHARE))

        edits, matrices, groups, storage = {}, {}, {}, StorageSizes()
        gap, norm2, steps, passes, converged = 0.0, 0.0, 0, 0, True
        for done, keys in enumerate(chunks):
            width = layout[keys[0]][0][0]
            progress(done, len(chunks), f"SPACE on the {width}-wide matrices")
            W_o = torch.cat([model.weight(key).to(dtype) for key in keys])
            Y = dual_start(W_o, ops, uce)
            start = W_o if uce is None else uce_start(W_o, uce)  # W_0: float64 for UCE, c(Y) exactly
            objective_start = objective_rows(start, W_o, Y / 2, ops, lam, mu)  # R = Y/2 at the start point
            if values.solver == "newton":
                result = newton_l1(W_o, ops, lam, mu, Y, iterations, tol, None if uce is None else start)
            else:
                result = fista_l1(W_o, ops, lam, mu, start.to(dtype, copy=True), iterations, tol, values.restart)
            del start, Y
            objective = objective_rows(result.weights, W_o, result.residual, ops, lam, mu)
            gap += result.gap
            steps, passes = max(steps, result.newton_steps), max(passes, result.iterations)
            converged = converged and result.converged
            row = 0
            for key in keys:
                shape, model_dtype = layout[key]
                rows = slice(row, row + shape[0])
                row += shape[0]
                new = result.weights[rows].to(model_dtype)
                check_written_finite(key, new)
                norm2 += torch.linalg.vector_norm(new.float(), dtype=torch.float64).item() ** 2  # fp8 has no norm
                csr = SparseEdit.from_dense(new)
                del new
                edits[key] = csr.smaller()
                storage.add(csr, edits[key])
                matrices[key] = {
                    "sparsity": 1.0 - csr.nnz / math.prod(shape),
                    "objective": objective[rows].sum().item(),
                    "objective_start": objective_start[rows].sum().item(),
                    # the solve of this matrix's chunk (one width, solved together)
                    "iterations": result.iterations,
                    "newton_steps": result.newton_steps,
                }
                group = groups.setdefault(width, {"width": width, "matrices": 0, "zeros": 0, "entries": 0})
                group["matrices"] += 1
                group["zeros"] += math.prod(shape) - csr.nnz
                group["entries"] += math.prod(shape)
                del csr
            del W_o, result
        progress(len(chunks), len(chunks), "SPACE done")
        distance = math.sqrt(gap / lam / norm2) if norm2 > 0 else 0.0
        if not converged:
            warnings.warn(
                f"SPACE stopped at iterations={iterations} before its tolerance: the duality gap bounds the distance "
                f"to the exact optimum by {distance:.1e} (relative) > tol={tol:g}; the result is usable but not the "
                "optimum: raise iterations (or tol)", ConvergenceWarning)

        by_width = {str(g["width"]): round(g["zeros"] / g["entries"], 4) for g in groups.values()}
        storage = storage.figures()
        totals = {
            "sparsity": sum(g["zeros"] for g in groups.values()) / sum(g["entries"] for g in groups.values()),
            "sparsity_by_width": by_width,
            "objective": sum(m["objective"] for m in matrices.values()),
            "objective_start": sum(m["objective_start"] for m in matrices.values()),
            "iterations": passes,
            "newton_steps": steps,
            "converged": converged,
            "duality_gap": gap,
            "distance_bound": distance,
        }
        return MethodOutput(
            {key: (edit,) for key, edit in edits.items()},
            {"space": {"mu": mu, "mu_sample_sparsity": reached, "mu_search_seconds": round(search_seconds, 3),
                       "solver": values.solver, "total": totals,
                       "matrices": matrices, "storage": storage, "condition": 1.0 + ops.eig.max().item() / lam,
                       "columns": {"erase": columns.erase.shape[1], "preserve": columns.preserve.shape[1],
                                   "rank": len(ops.eig)}}},
            {"mu": mu, "sparsity": round(totals["sparsity"], 4), "sparsity_by_width": by_width,
             "iterations": passes, "converged": converged, "distance_bound": float(f"{distance:.2e}"),
             "storage": {k: storage[k] for k in ("dense_bytes", "sparse_bytes", "compressed_bytes", "stored_bytes")}},
        )


def weight_chunks(shapes: Mapping[str, tuple[int, int]], entries: int) -> list[list[str]]:
    """Consecutive matrices of one width, grouped up to `entries` entries (at least one matrix each)."""
    chunks: list[list[str]] = []
    size, width = 0, None
    for key in sorted(shapes, key=lambda k: shapes[k][0]):
        numel = math.prod(shapes[key])
        if not chunks or shapes[key][0] != width or size + numel > entries:
            chunks.append([])
            size, width = 0, shapes[key][0]
        chunks[-1].append(key)
        size += numel
    return chunks
