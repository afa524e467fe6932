"""SPACE — SParse cross-Attention-based Concept Erasure (Novello & Tonello, arXiv 2605.10198).

UCE's loss plus an entry-wise L1 norm of the edited matrix itself (not of the change), solved with
FISTA (Beck & Teboulle 2009) for every cross-attention K and V matrix:

    min_W  F(W) = f(W) + μ ‖W‖₁                                                    (SPACE Eq. 5)
    f(W) = s_e ‖W C_E − W_o C_G‖² + s_p ‖W C_P − W_o C_P‖² + λ ‖W − W_o‖²          (UCE loss, Eq. 2)

With U = [√s_e C_E, √s_p C_P] and V = [√s_e C_G, √s_p C_P] (d × r, r = n_e + n_p columns):

    f(W)  = ‖W U − W_o V‖² + λ ‖W − W_o‖²
    ∇f(W) = 2 (W M − B),   M = λ I + U Uᵀ,   B = λ W_o + (W_o V) Uᵀ                (Eq. 8)
    L     = 2 σ_max(M) = 2 (λ + σ_max(Uᵀ U))                                       (Theorem 3.1)
    S_τ(x) = sign(x) max(|x| − τ, 0)                                               (Eq. 6)

FISTA from W_0 = Y_1 (``start``), t_1 = 1:                                        (Eqs. 7, 9)

    W_k     = S_{μ/L}(Y_k − ∇f(Y_k) / L)
    t_{k+1} = (1 + √(1 + 4 t_k²)) / 2
    Y_{k+1} = W_k + ((t_k − 1) / t_{k+1}) (W_k − W_{k−1})

with, by default (``restart``), the adaptive restart of O'Donoghue & Candès (2015): when the momentum
points uphill, ⟨Y_k − W_k, W_k − W_{k−1}⟩ > 0, it is dropped (Y_{k+1} = W_k, t_{k+1} = 1); tested
every 10 iterations, with the stopping rule (as often as every iteration gives the same iteration
counts here, at twice the cost). The iteration and its optimum are FISTA's; the restart removes
FISTA's oscillation on this strongly convex problem (Hessian ≥ 2λ I), so it converges linearly: on
SD1.5-shaped weights the objective is within 3e-6 of the optimum after 300 iterations, where plain
FISTA is at 2e-3 (5e-6 after 1000), and tol = 1e-5 is reached in ~420 iterations instead of ~1700.

Variables → paper symbols: ``mu`` μ (sparsity weight), ``lam`` the ridge weight of UCE's Eq. 2,
``erase_scale`` / ``preserve_scale`` the weights of its erase / preserve sums, ``iterations`` the
FISTA iteration count, ``U``/``V``/``M``/``B`` as above.

Computation. F decouples over the ROWS of W (each row is a Lasso with Gram matrix M), and M, L are
the same for every matrix, so all matrices of one output width are stacked row-wise and iterated
together: one GEMM per iteration and width. Per iteration the cheaper of ``Y (I − M/σ) + B/σ``
(one n × d × d product) and ``λ``-form ``Y − (λ (Y − W_o) + (Y U − W_o V) Uᵀ)/σ`` (two n × d × r
products; chosen when 2r < d) is used, σ = σ_max(M) from the r × r (or d × d) eigenproblem. The
stopping rule is the relative change ‖W_k − W_{k−1}‖_F / ‖W_k‖_F ≤ ``tol``, checked every 10
iterations; a `ConvergenceWarning` (not an error) says when ``iterations`` ran out first. Memory:
five copies of the largest width's stacked matrices in the solve precision (six with the dense form;
SDXL: ≈ 6.3 GB in float32, the paper reports 8 GB).

Defaults, and why (the paper's μ, λ and iteration count were lost from its text; its code is not
public). SPACE runs on UCE's current script (SDXL support, the anchor "art" for styles is that script's
default), so its loss settings follow that script: λ = 0.5, erase and preserve scales 1, the
``last_word`` token (one column per prompt) and no implicit empty-prompt preservation (the paper's
"no preserved concepts" runs). That choice also keeps M well conditioned: σ_max(M)/λ, which sets how
many iterations FISTA needs, grows with every column, and the 77-token policies put tens of highly
correlated high-norm columns in U. μ: away from the concepts' directions an entry becomes zero
roughly when |W_o| < μ / (2λ) (where the λ term's pull 2λ|W_o| is weaker than μ), so a fixed μ gives a
different sparsity on every model (weight scales differ between SD1.5, SDXL and fine-tunes). The default,
``mu`` empty, sets μ = 2λ × the 80th percentile of |W_o| over all K/V entries (from a fixed sample of
them): about 75–80 % zeros, near the paper's 80–90 % on SDXL (it grid-searched μ per task). The μ used
is reported; give a number to choose it. 1000 iterations at most, tolerance 1e-5: with the restart this
converges in a few hundred iterations on SD1.5- and SDXL-shaped weights (the paper notes that sparsity
plateaus early and the preserved concepts need more iterations to settle, so the iterations are not cut
at the plateau). ``start = uce``: the μ = 0 optimum, where the quadratic part is already solved, so
FISTA only has to add the sparsity (and μ = 0 returns UCE at once); ``original`` starts from W_o.

CSR costs a value and a column index (int16) per non-zero, so below ~50 % sparsity it is larger than
the dense matrix (the paper notes the same); checkpoints are written dense either way.

The result is a sparse W per matrix (`SparseEdit`: only the non-zeros are stored). The report gives
per matrix and in total the sparsity, the objective F before and after, and the iterations, plus the
storage of the edited matrices dense, sparse (CSR, as stored) and deflated (the paper's ZIP "storage"
column). Not low-rank: it cannot be saved as a LoRA.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import torch

from ..concepts import Columns, Concepts
from ..editable import EditableModel, Progress
from ..errors import ConvergenceWarning
from ..linalg import uce_factors
from ..params import Param
from ..patch import SparseEdit, check_finite
from ..safetensors_io import tensor_bytes
from .base import ErasureMethod, MethodOutput
from .uce import SOLVE_DTYPES, UCE_PARAMS, gather_columns

CHECK_EVERY = 10  # iterations between convergence / restart checks (a few passes over W and a device sync)
AUTO_QUANTILE = 0.8  # default μ zeroes about this share of the entries (see the module docstring)
STARTS = ("uce", "original")
GRADIENT_FORMS = ("auto", "low_rank", "dense")

_UCE = {p.name: p for p in UCE_PARAMS}

SPACE_PARAMS = (
    Param("mu", float, None,
          "μ: weight of ‖W‖₁; larger = sparser (0 = UCE). Away from the concepts an entry becomes zero roughly when "
          "|W_o| < μ/(2λ). Empty = 2λ × the 80th percentile of |W_o| (about 75-80% zeros; the paper grid-searches "
          "μ per task and reports 80-90% on SDXL)", min=0.0, max=1e3, step=0.005, nullable=True),
    Param("iterations", int, 1000, "most FISTA iterations (stops earlier once the change is below tol)",
          min=1, max=100000, step=100),
    Param("tol", float, 1e-5, "stop when ‖W_k − W_k−1‖/‖W_k‖ falls below this (checked every 10 iterations); "
          "a warning says when iterations ran out first", min=0.0, min_exclusive=True, max=1.0, step=1e-6),
    _UCE["lam"],
    replace(_UCE["erase_scale"], help="s_e: weight of the erase term (target → guide); UCE's current script: 1"),
    Param("preserve_scale", float, 1.0, "s_p: weight of the preserve term (UCE's current script: 1)",
          min=0.0, max=1e4, step=0.05),
    replace(_UCE["token_policy"], default="last_word",
            help="which token features stand for a prompt: last_word (UCE's current script, which SPACE builds "
                 "on; few columns keep FISTA fast), last_word_to_end (UCE paper), all_tokens"),
    replace(_UCE["preserve_empty"], default=False,
            help="also preserve the empty prompt (UCE's paper code does; its current script and SPACE do not)"),
    Param("restart", bool, True,
          "adaptive momentum restart (O'Donoghue & Candès 2015): the same optimum in several times fewer "
          "iterations; false = the paper's plain FISTA"),
    Param("start", str, "uce", "FISTA's starting point: uce (the μ = 0 solution; converges sooner) or original (W_o)",
          choices=STARTS),
    replace(_UCE["solve_dtype"], default="float32",
            help="precision of the iterations (float32: half the memory and twice the speed of float64)"),
)


@dataclass(frozen=True)
class FistaResult:
    weights: torch.Tensor  # the last iterate W_k, rows as given
    iterations: int
    converged: bool
    relative_change: float  # ‖W_k − W_{k−1}‖ / ‖W_k‖ at the last check
    form: str  # "low_rank" or "dense": how ∇f was applied


def space_operands(columns: Columns, erase_scale: float, preserve_scale: float, dtype: torch.dtype):
    """U = [√s_e C_E, √s_p C_P] and V = [√s_e C_G, √s_p C_P] (d × r) in `dtype`."""
    e, p = math.sqrt(erase_scale), math.sqrt(preserve_scale)
    U = torch.cat([e * columns.erase, p * columns.preserve], 1).to(dtype)
    V = torch.cat([e * columns.guide, p * columns.preserve], 1).to(dtype)
    return U, V


def top_eigenvalue(U: torch.Tensor) -> float:
    """σ_max(U Uᵀ) = σ_max(Uᵀ U), from the smaller of the two Gram matrices, in float64."""
    u = U.double()
    if u.shape[1] == 0:
        return 0.0
    gram = u.T @ u if u.shape[1] <= u.shape[0] else u @ u.T
    return torch.linalg.eigvalsh(gram)[-1].item()


def fista_l1(
    W_o: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    lam: float,
    mu: float,
    iterations: int,
    tol: float,
    start: torch.Tensor | None = None,
    restart: bool = True,
    form: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> FistaResult:
    """Minimise ‖W U − W_o V‖² + λ‖W − W_o‖² + μ‖W‖₁ over W (n × d) by FISTA (module docstring).

    All tensors share one dtype and device; `start` (default W_o) is W_0 and is used as a work buffer
    (overwritten), which saves one copy of the largest operand. `restart` drops the momentum when it
    points uphill at a check (module docstring). `form` forces the dense or low-rank application of
    ∇f (``auto``: low-rank when 2r < d). `progress(k)` is called at each check with the iteration
    count reached.
    """
    if form not in GRADIENT_FORMS:
        raise ValueError(f"form {form!r} is not one of {', '.join(GRADIENT_FORMS)}")
    n, d = W_o.shape
    r = U.shape[1]
    sigma = lam + top_eigenvalue(U)  # σ_max(M); L = 2σ
    step, tau = 1.0 / sigma, mu / (2.0 * sigma)  # ∇f/L = (Y M − B)/σ;  threshold μ/L
    if form == "auto":
        form = "low_rank" if 2 * r < d else "dense"
    if form == "low_rank":
        Ut = U.T.contiguous()
        WoV = W_o @ V  # W_o V (n × r)
        small = W_o.new_empty(n, r)
    else:
        eye = torch.eye(d, dtype=W_o.dtype, device=W_o.device)
        K = (1.0 - step * lam) * eye - step * (U @ U.T)  # I − M/σ
        offset = step * torch.addmm(W_o, W_o @ V, U.T, beta=lam)  # B/σ

    W_prev = W_o.clone() if start is None else start  # W_{k−1}
    Y = W_prev.clone()
    W, Z = torch.empty_like(Y), torch.empty_like(Y)
    t, change, converged, k = 1.0, math.inf, False, 0
    for k in range(1, iterations + 1):
        # Z = Y − ∇f(Y)/L, written into preallocated buffers (no per-iteration allocation).
        if form == "low_rank":
            torch.addmm(WoV, Y, U, beta=-1.0, out=small)  # Y U − W_o V
            torch.lerp(W_o, Y, 1.0 - step * lam, out=Z)  # Y − λ (Y − W_o)/σ
            Z.addmm_(small, Ut, alpha=-step)  # − (Y U − W_o V) Uᵀ/σ
        else:
            torch.addmm(offset, Y, K, out=Z)
        # W_k = S_τ(Z) = Z − clamp(Z, −τ, τ)
        torch.clamp(Z, -tau, tau, out=W)
        torch.sub(Z, W, out=W)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_next
        check = k % CHECK_EVERY == 0 or k == iterations
        if check:
            torch.sub(W, W_prev, out=Z)  # W_k − W_{k−1} (Z is free once W_k is formed)
            norm = W.norm().item()
            change = Z.norm().item() / norm if norm > 0 else 0.0
            z = Z.reshape(-1)
            # Uphill momentum, ⟨Y_k − W_k, W_k − W_{k−1}⟩ > 0: drop it and restart t.
            if restart and torch.dot(Y.reshape(-1), z) > torch.dot(W.reshape(-1), z):
                beta, t_next = 0.0, 1.0
        torch.lerp(W_prev, W, 1.0 + beta, out=Y)  # W_k + ((t_k − 1)/t_{k+1})(W_k − W_{k−1})
        W_prev, W = W, W_prev
        t = t_next
        if check:
            if progress:
                progress(k)
            if change <= tol:
                converged = True
                break
    return FistaResult(W_prev, k, converged, change, form)


def auto_mu(weights: Iterable[torch.Tensor], lam: float, quantile: float = AUTO_QUANTILE) -> float:
    """μ = 2λ × the `quantile` of |W_o| over the K/V entries, from an evenly strided sample of each
    matrix (≤ ~20 000 entries each: deterministic and cheap)."""
    sample = torch.cat([w.reshape(-1)[:: max(1, w.numel() // 20_000)].float().abs() for w in weights])
    return 2.0 * lam * torch.quantile(sample, quantile).item()


def space_objective(W, W_o, U, V, lam: float, mu: float) -> float:
    """F(W) = ‖W U − W_o V‖² + λ‖W − W_o‖² + μ‖W‖₁, in float64."""
    W, W_o, U, V = (x.double() for x in (W, W_o, U, V))
    return ((W @ U - W_o @ V).pow(2).sum() + lam * (W - W_o).pow(2).sum() + mu * W.abs().sum()).item()


def storage_sizes(edits: Mapping[str, SparseEdit], itemsize: int) -> dict[str, Any]:
    """Bytes of the edited matrices: dense (``itemsize`` per entry), sparse (the CSR tensors as stored)
    and that CSR deflated (ZIP's compression), the paper's storage figures. Deflate level 1: on weight
    data it compresses within 1 % of level 6 at several times the speed (SDXL's CSR is ~200 MB)."""
    dense = sum(math.prod(e.shape) for e in edits.values()) * itemsize
    sparse, packer, compressed = 0, zlib.compressobj(1), 0
    for edit in edits.values():
        for tensor in edit.tensors().values():
            data = tensor_bytes(tensor)
            sparse += len(data)
            compressed += len(packer.compress(data))
    compressed += len(packer.flush())
    return {"dense_bytes": dense, "sparse_bytes": sparse, "compressed_bytes": compressed,
            "sparse_vs_dense": round(sparse / dense, 4) if dense else 0.0,
            "compressed_vs_dense": round(compressed / dense, 4) if dense else 0.0}


class SPACE(ErasureMethod):
    name = "space"
    title = "SPACE"
    summary = ("Sparse cross-attention erasure: UCE's loss plus an L1 penalty on the weights, solved by FISTA; "
               "sparse K/V (smaller files), stronger on SDXL; tens of seconds on a GPU")
    params = SPACE_PARAMS

    def run(
        self, model: EditableModel, concepts: Concepts, values: Mapping[str, Any], progress: Progress
    ) -> MethodOutput:
        lam, s_e, s_p = values["lam"], values["erase_scale"], values["preserve_scale"]
        iterations, tol = values["iterations"], values["tol"]
        dtype = SOLVE_DTYPES[values["solve_dtype"]]
        progress(0, 1, "encoding prompts")
        columns = gather_columns(model, concepts, values)
        U, V = space_operands(columns, s_e, s_p, dtype)
        uce = None
        if values["start"] == "uce":
            uce = [f.to(dtype) for f in uce_factors(columns.erase, columns.guide, columns.preserve, lam, s_e, s_p)]

        weights = {key: model.weight(key) for key in model.arch.kv_keys}
        mu = auto_mu(weights.values(), lam) if values["mu"] is None else values["mu"]
        widths: dict[int, list[str]] = {}
        for key, w in weights.items():
            widths.setdefault(w.shape[0], []).append(key)
        total, base = iterations * len(widths), 0

        edits, matrices, groups = {}, {}, []
        for width, keys in sorted(widths.items()):
            # Rows decouple: stack every matrix of this width and iterate them together.
            W_o = torch.cat([weights[key].to(dtype) for key in keys])
            start = W_o.clone() if uce is None else torch.addmm(W_o, W_o @ uce[0], uce[1].T)  # W_o + W_o A Bᵀ
            before = [space_objective(start[i * width:(i + 1) * width], weights[key], U, V, lam, mu)
                      for i, key in enumerate(keys)]
            result = fista_l1(W_o, U, V, lam, mu, iterations, tol, start, values["restart"],
                              progress=lambda k: progress(base + k, total, f"SPACE on the {width}-wide matrices"))
            base += iterations
            check_finite(f"the {width}-wide matrices", result.weights)
            if not result.converged:
                warnings.warn(
                    f"SPACE stopped at iterations={iterations} on the {len(keys)} {width}-wide matrices with a "
                    f"relative change of {result.relative_change:.1e} > tol={tol:g}: the result is usable but not "
                    "the exact optimum; raise iterations (or tol) for a converged solution", ConvergenceWarning)
            groups.append({"width": width, "matrices": len(keys), "iterations": result.iterations,
                           "converged": result.converged, "relative_change": result.relative_change,
                           "gradient": result.form})
            for i, key in enumerate(keys):
                rows = slice(i * width, (i + 1) * width)
                edit = SparseEdit.from_dense(result.weights[rows].to(weights[key].dtype))
                edits[key] = edit
                matrices[key] = {
                    "sparsity": 1.0 - edit.nnz / (width * W_o.shape[1]),
                    "objective": space_objective(result.weights[rows], W_o[rows], U, V, lam, mu),
                    "objective_start": before[i],
                    "iterations": result.iterations,
                }
        progress(total, total, "SPACE done")

        entries = sum(math.prod(e.shape) for e in edits.values())
        storage = storage_sizes(edits, next(iter(weights.values())).element_size())
        totals = {
            "sparsity": 1.0 - sum(e.nnz for e in edits.values()) / entries,
            "objective": sum(m["objective"] for m in matrices.values()),
            "objective_start": sum(m["objective_start"] for m in matrices.values()),
            "iterations": max(g["iterations"] for g in groups),
            "converged": all(g["converged"] for g in groups),
        }
        return MethodOutput(
            {key: (edit,) for key, edit in edits.items()},
            {"space": {"mu": mu, "total": totals, "groups": groups, "matrices": matrices, "storage": storage,
                       "lipschitz": 2.0 * (lam + top_eigenvalue(U)),
                       "columns": {"erase": columns.erase.shape[1], "preserve": columns.preserve.shape[1]}}},
            {"mu": mu, "sparsity": round(totals["sparsity"], 4), "iterations": totals["iterations"],
             "converged": totals["converged"], "storage": {k: storage[k] for k in ("dense_bytes", "sparse_bytes",
                                                                                   "compressed_bytes")}},
        )
