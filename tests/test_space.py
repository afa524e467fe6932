"""SPACE checked against independent solvers: each row of W is a Lasso (scikit-learn's coordinate
descent), μ = 0 is UCE's closed form (numpy), the objective decreases to the optimum; and the sparse
patch: exact round trip, storage figures, LoRA refusal, the command line."""

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from concept_eraser import (Cancelled, CheckpointModel, Concepts, InvalidParameterError, erase, load_patch, save_lora,
                            save_patch)
from concept_eraser.cli import main
from concept_eraser.errors import ConvergenceWarning
from concept_eraser.methods.space import fista_l1
from concept_eraser.patch import SparseEdit


def problem(rng, d=16, out=6, n_e=2, n_p=3, s_e=1.0, s_p=0.7):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    W_o, c_e, c_g, c_p = 0.3 * randn(out, d), randn(d, n_e), randn(d, n_e), randn(d, n_p)
    U = torch.cat([s_e ** 0.5 * c_e, s_p ** 0.5 * c_p], 1)
    V = torch.cat([s_e ** 0.5 * c_g, s_p ** 0.5 * c_p], 1)
    return W_o, U, V


def objective(W, W_o, U, V, lam, mu):
    """SPACE Eq. 5 written out: ‖W U − W_o V‖² + λ‖W − W_o‖² + μ‖W‖₁ (numpy)."""
    W, W_o, U, V = (np.asarray(x, dtype=np.float64) for x in (W, W_o, U, V))
    return ((W @ U - W_o @ V) ** 2).sum() + lam * ((W - W_o) ** 2).sum() + mu * np.abs(W).sum()


def lasso_reference(W_o, U, V, lam, mu):
    """Row i of W minimises ‖[Uᵀ; √λ I] w − [(W_o V)_i; √λ w_o,i]‖² + μ‖w‖₁, a Lasso; scikit-learn scales the
    squares by 1/(2n), so its α is μ/(2n)."""
    d = U.shape[0]
    X = np.vstack([U.numpy().T, np.sqrt(lam) * np.eye(d)])
    rows = []
    for i in range(W_o.shape[0]):
        y = np.concatenate([(W_o @ V)[i].numpy(), np.sqrt(lam) * W_o[i].numpy()])
        fit = Lasso(alpha=mu / (2 * X.shape[0]), fit_intercept=False, tol=1e-14, max_iter=200_000).fit(X, y)
        rows.append(fit.coef_)
    return np.array(rows)


@pytest.mark.parametrize("form,restart", [("low_rank", True), ("dense", True), ("low_rank", False)])
@pytest.mark.parametrize("lam,mu", [(0.5, 0.2), (0.1, 1.0)])
def test_matches_an_independent_lasso_solver(rng, form, restart, lam, mu):
    W_o, U, V = problem(rng)
    result = fista_l1(W_o, U, V, lam, mu, iterations=20_000, tol=1e-13, restart=restart, form=form)
    assert result.converged and result.form == form
    reference = lasso_reference(W_o, U, V, lam, mu)
    got, best = objective(result.weights, W_o, U, V, lam, mu), objective(reference, W_o, U, V, lam, mu)
    assert (got - best) / best <= 1e-6
    zeros = result.weights.numpy() == 0
    assert zeros.any() and not zeros.all()
    np.testing.assert_array_equal(zeros, reference == 0)


@pytest.mark.parametrize("restart", [True, False])
def test_objective_decreases_to_the_optimum_from_either_start(rng, restart):
    lam, mu = 0.3, 0.5
    W_o, U, V = problem(rng, d=24, out=8)
    best = objective(lasso_reference(W_o, U, V, lam, mu), W_o, U, V, lam, mu)
    gaps = [objective(fista_l1(W_o, U, V, lam, mu, k, tol=1e-15, restart=restart).weights, W_o, U, V, lam, mu) - best
            for k in (1, 10, 100, 1000, 5000)]
    assert all(later <= earlier * 1.05 for earlier, later in zip(gaps, gaps[1:]))  # FISTA is not monotone
    assert gaps[-1] / best <= 1e-8 and gaps[0] > 1e3 * gaps[-1]
    # From the UCE solution, the same optimum.
    u, v, eye = U.numpy(), V.numpy(), np.eye(24)
    uce = W_o.numpy() @ (lam * eye + v @ u.T) @ np.linalg.inv(lam * eye + u @ u.T)
    from_uce = fista_l1(W_o, U, V, lam, mu, 5000, tol=1e-15, start=torch.from_numpy(uce))
    assert objective(from_uce.weights, W_o, U, V, lam, mu) - best <= 1e-8 * best


def test_mu_zero_gives_the_uce_solution(rng):
    lam = 0.5
    W_o, U, V = problem(rng)
    w_o, u, v, eye = W_o.numpy(), U.numpy(), V.numpy(), np.eye(U.shape[0])
    # UCE's closed form, W = W_o (λ I + V Uᵀ)(λ I + U Uᵀ)⁻¹, solved directly.
    uce = np.linalg.solve(lam * eye + u @ u.T, (w_o @ (lam * eye + v @ u.T)).T).T
    result = fista_l1(W_o, U, V, lam, 0.0, iterations=20_000, tol=1e-14)
    assert result.converged
    np.testing.assert_allclose(result.weights.numpy(), uce, rtol=1e-7, atol=1e-9)


@pytest.fixture(scope="module")
def sdxl(tiny_checkpoints):
    return CheckpointModel(tiny_checkpoints["sdxl"])


CONCEPTS = Concepts.build(["Van Gogh"], ["art"], ["Claude Monet"])


def test_sparse_patch_round_trips_and_reports_its_storage(sdxl, tmp_path):
    result = erase(sdxl, "space", CONCEPTS, {"iterations": 300})
    report = result.report["space"]
    # The default μ: 2λ × the 80th percentile of |W_o| (the method samples the entries).
    entries = np.concatenate([sdxl.weight(k).float().abs().flatten().numpy() for k in sdxl.arch.kv_keys])
    assert report["mu"] == pytest.approx(2 * 0.5 * np.quantile(entries, 0.8), rel=0.03)
    assert 0.6 < report["total"]["sparsity"] < 0.85 and report["total"]["converged"]
    edits = result.patch.edits
    assert len(edits) == 140 and all(len(s) == 1 and isinstance(s[0], SparseEdit) for s in edits.values())
    for key, (edit,) in edits.items():
        dense = edit.apply(sdxl.weight(key))
        assert dense.dtype == torch.float16
        assert report["matrices"][key]["sparsity"] == pytest.approx((dense == 0).double().mean().item())
        assert edit.col_indices.dtype == torch.int16 and edit.nnz == int((dense != 0).sum())

    path = save_patch(result.patch, tmp_path / "space.safetensors")
    loaded = load_patch(path)
    for key in sdxl.arch.kv_keys:
        W = sdxl.weight(key)
        assert torch.equal(loaded.apply_to(key, W), result.patch.apply_to(key, W))
    storage = report["storage"]
    stored = sum(t.numel() * t.element_size() for (e,) in edits.values() for t in e.tensors().values())
    assert storage["sparse_bytes"] == stored == result.patch.nbytes()
    assert storage["dense_bytes"] == sum(sdxl.weight(k).numel() * 2 for k in sdxl.arch.kv_keys)
    assert 0 < storage["compressed_bytes"] < storage["sparse_bytes"]
    assert stored < path.stat().st_size < stored + 200_000  # the file holds the non-zeros (plus its header)

    assert not result.patch.is_low_rank()
    with pytest.raises(InvalidParameterError, match="not low-rank"):
        save_lora(result.patch, tmp_path / "lora.safetensors")


def test_sparse_edit_is_exact(rng):
    dense = torch.randn(7, 40000, generator=rng).half()
    dense[dense.abs() < 1] = 0
    edit = SparseEdit.from_dense(dense)
    assert edit.col_indices.dtype == torch.int32  # too wide for int16
    assert torch.equal(edit.apply(dense), dense) and edit.nnz == int((dense != 0).sum())


def test_mu_zero_through_the_method_is_uce_and_short_runs_warn(sdxl):
    shared = {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0, "token_policy": "last_word",
              "preserve_empty": False}
    space = erase(sdxl, "space", CONCEPTS, {**shared, "mu": 0.0})
    uce = erase(sdxl, "uce", CONCEPTS, shared)
    assert space.report["space"]["total"]["converged"] and space.report["space"]["total"]["iterations"] == 10
    for key in sdxl.arch.kv_keys:
        W = sdxl.weight(key)
        torch.testing.assert_close(space.patch.apply_to(key, W), uce.patch.apply_to(key, W), rtol=2e-3, atol=2e-3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = erase(sdxl, "space", CONCEPTS, {"mu": 0.05, "iterations": 3, "start": "original"})
    assert any(issubclass(w.category, ConvergenceWarning) and "iterations=3" in str(w.message) for w in caught)
    total = short.report["space"]["total"]
    assert not total["converged"] and total["iterations"] == 3 and total["objective"] < total["objective_start"]


@pytest.mark.parametrize("setting,name,message", [
    ("mu=-1", "mu", "out of range"),
    ("start=zero", "start", "one of uce, original"),
    ("tol=0", "tol", "must be a number > 0"),
    ("epochs=2", "epochs", "unknown parameter for method 'space'"),
])
def test_bad_settings_name_the_parameter(tiny_checkpoints, tmp_path, capsys, setting, name, message):
    out = tmp_path / "out.safetensors"
    code = main(["erase", str(tiny_checkpoints["sd1"]), "--method", "space", "--erase", "x", "--set", setting,
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {name}: " in err and message in err and not out.exists()


def test_command_line_patch_and_inspect(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "space_patch.safetensors"
    code = main(["erase", str(tiny_checkpoints["sd1"]), "--method", "space", "--erase", "Van Gogh",
                 "--set", "mu=0.1", "--set", "iterations=100", "--format", "patch", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert all(kinds == ["sparse"] for kinds in info["edits"].values())
    results = info["erasures"][0]["results"]
    assert results["sparsity"] > 0.3 and results["storage"]["sparse_bytes"] < info["bytes"]


def test_a_cancel_from_progress_stops_the_iterations(sdxl):
    seen = []

    def progress(done, total, message):
        seen.append(done)
        if "SPACE on" in message and done >= 20:
            raise Cancelled()

    with pytest.raises(Cancelled):
        erase(sdxl, "space", CONCEPTS, {"start": "original", "iterations": 500}, progress)
    assert max(seen) < 500
