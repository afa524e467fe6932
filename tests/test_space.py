"""SPACE checked against independent solvers: each row of W is a Lasso (scikit-learn's coordinate
descent), μ = 0 is UCE's closed form (numpy), the duality gap bounds the true distance to the optimum; and the
result as stored (CSR when that is smaller, else dense): exact round trips, storage figures, LoRA refusal, the
command line."""

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from concept_eraser import (
    Cancelled,
    CheckpointModel,
    Concepts,
    InvalidParameterError,
    erase,
    load_patch,
    save_checkpoint,
    save_lora,
    save_patch,
)
from concept_eraser.cli import main
from concept_eraser.errors import ConvergenceWarning
from concept_eraser.methods.space import dual_start, fista_l1, newton_l1, reduce_operands
from concept_eraser.patch import DenseEdit, SparseEdit, check_written_finite
from concept_eraser.report import headline, sparsity_by_key


def problem(rng, d=16, out=6, n_e=2, n_p=3, s_e=1.0, s_p=0.7, scale=1.0):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    W_o, c_e, c_g, c_p = 0.3 * randn(out, d), randn(d, n_e), randn(d, n_e), randn(d, n_p)
    U = scale * torch.cat([s_e ** 0.5 * c_e, s_p ** 0.5 * c_p], 1)
    V = scale * torch.cat([s_e ** 0.5 * c_g, s_p ** 0.5 * c_p], 1)
    return W_o, U, V


def ill_conditioned(rng, d=48, out=8, tokens=30):
    """77-token-like columns: a shared high-norm direction plus small per-token variation, σ_max(U Uᵀ)/λ ~ 1e5."""
    W_o = 0.3 * torch.randn(out, d, generator=rng, dtype=torch.float64)
    base = torch.randn(d, 1, generator=rng, dtype=torch.float64)
    U = 30 * base + 3 * torch.randn(d, tokens, generator=rng, dtype=torch.float64)
    V = U.clone()
    V[:, :5] = 30 * torch.randn(d, 1, generator=rng, dtype=torch.float64) + 3 * torch.randn(d, 5, generator=rng,
                                                                                               dtype=torch.float64)
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
        fit = Lasso(alpha=mu / (2 * X.shape[0]), fit_intercept=False, tol=1e-15, max_iter=1_000_000).fit(X, y)
        rows.append(fit.coef_)
    return np.array(rows)


def solve(solver, W_o, U, V, lam, mu, iterations, tol, start=None, restart=True):
    ops = reduce_operands(U, V)
    if solver == "newton":
        Y = dual_start(W_o, ops, None) if start is None else 2 * (start @ ops.U - W_o @ ops.V)
        return newton_l1(W_o, ops, lam, mu, Y, iterations, tol)
    return fista_l1(W_o, ops, lam, mu, W_o.clone() if start is None else start.clone(), iterations, tol, restart)


@pytest.mark.parametrize("solver,restart", [("newton", True), ("fista", True), ("fista", False)])
@pytest.mark.parametrize("lam,mu", [(0.5, 0.2), (0.1, 1.0)])
@pytest.mark.parametrize("columns", [(2, 3), (8, 9)], ids=["few columns", "more columns than d/2"])
def test_matches_an_independent_lasso_solver(rng, solver, restart, lam, mu, columns):
    # d = 16: 5 columns take FISTA's two products through Ũ, 17 (k = 16) its one product with Ũ Ũᵀ
    W_o, U, V = problem(rng, n_e=columns[0], n_p=columns[1])
    result = solve(solver, W_o, U, V, lam, mu, 20_000, 1e-9, restart=restart)
    assert result.converged and result.distance <= 1e-9
    reference = lasso_reference(W_o, U, V, lam, mu)
    got, best = objective(result.weights, W_o, U, V, lam, mu), objective(reference, W_o, U, V, lam, mu)
    assert abs(got - best) / best <= 1e-9
    zeros = result.weights.numpy() == 0
    assert zeros.any() and not zeros.all()
    np.testing.assert_array_equal(zeros, reference == 0)


def test_newton_converges_where_fista_needs_thousands_of_iterations(rng):
    lam, mu = 0.5, 0.3
    W_o, U, V = ill_conditioned(rng)
    assert (lam + reduce_operands(U, V).eig.max().item()) / lam > 5e4  # the condition number FISTA's rate needs
    # Reference: a long FISTA run, certified (coordinate descent does not converge at this conditioning).
    long = solve("fista", W_o, U, V, lam, mu, 100_000, 2e-9)
    assert long.converged and long.iterations > 2000
    best = objective(long.weights, W_o, U, V, lam, mu)
    newton = solve("newton", W_o, U, V, lam, mu, 300, 1e-8)
    assert newton.converged and newton.iterations <= 100
    assert abs(objective(newton.weights, W_o, U, V, lam, mu) - best) <= 1e-10 * best
    np.testing.assert_array_equal(newton.weights.numpy() == 0, long.weights.numpy() == 0)
    fista = solve("fista", W_o, U, V, lam, mu, 300, 1e-8)
    assert not fista.converged and objective(fista.weights, W_o, U, V, lam, mu) - best > 1e-6 * best


def test_the_duality_gap_bounds_the_distance_to_the_optimum(rng):
    lam, mu = 0.3, 0.5
    W_o, U, V = problem(rng, d=24, out=8, scale=3.0)
    reference = lasso_reference(W_o, U, V, lam, mu)
    best = objective(reference, W_o, U, V, lam, mu)
    for iterations in (1, 10, 100, 10_000):
        result = solve("fista", W_o, U, V, lam, mu, iterations, 1e-12)
        excess = objective(result.weights, W_o, U, V, lam, mu) - best
        distance = np.linalg.norm(result.weights.numpy() - reference) / np.linalg.norm(result.weights.numpy())
        assert -1e-9 * best <= excess <= result.gap * (1 + 1e-9) + 1e-12
        assert distance <= result.distance * (1 + 1e-6) + 1e-9
    assert result.converged


@pytest.mark.parametrize("start", ["original", "uce-like"])
def test_newtons_certificate_bounds_the_distance_at_every_stop(rng, start):
    """Newton certifies with its own dual point (gap ‖∇D‖² plus the entry terms): at any iteration cap the
    reported gap and distance bound the true excess and distance to scikit-learn's optimum."""
    lam, mu = 0.3, 0.5
    W_o, U, V = problem(rng, d=24, out=8, scale=3.0)
    reference = lasso_reference(W_o, U, V, lam, mu)
    best = objective(reference, W_o, U, V, lam, mu)
    first = None if start == "original" else W_o + 0.1 * torch.randn(W_o.shape, generator=rng, dtype=W_o.dtype)
    for iterations in (1, 2, 3, 5, 8, 100):
        result = solve("newton", W_o, U, V, lam, mu, iterations, 1e-12, start=first)
        excess = objective(result.weights, W_o, U, V, lam, mu) - best
        distance = np.linalg.norm(result.weights.numpy() - reference) / np.linalg.norm(result.weights.numpy())
        assert -1e-9 * best <= excess <= result.gap * (1 + 1e-9) + 1e-12
        assert distance <= result.distance * (1 + 1e-6) + 1e-9
    assert result.converged and result.distance <= 1e-12


def test_from_uce_the_same_optimum_and_mu_zero_is_uce(rng):
    lam = 0.5
    W_o, U, V = problem(rng)
    w_o, u, v, eye = W_o.numpy(), U.numpy(), V.numpy(), np.eye(U.shape[0])
    # UCE's closed form, W = W_o (λ I + V Uᵀ)(λ I + U Uᵀ)⁻¹, solved directly.
    uce = np.linalg.solve(lam * eye + u @ u.T, (w_o @ (lam * eye + v @ u.T)).T).T
    for solver in ("newton", "fista"):
        at_zero = solve(solver, W_o, U, V, lam, 0.0, 20_000, 1e-12)
        assert at_zero.converged
        np.testing.assert_allclose(at_zero.weights.numpy(), uce, rtol=1e-8, atol=1e-10)
        from_uce = solve(solver, W_o, U, V, lam, 0.4, 20_000, 1e-10, start=torch.from_numpy(uce))
        reference = lasso_reference(W_o, U, V, lam, 0.4)
        assert np.abs(from_uce.weights.numpy() - reference).max() <= 1e-8
    assert solve("newton", W_o, U, V, lam, 0.0, 100, 1e-12, start=torch.from_numpy(uce)).iterations <= 3


def test_more_columns_than_features_reduce_to_the_same_problem(rng):
    lam, mu = 0.5, 0.2
    W_o, U, V = problem(rng, d=10, n_e=8, n_p=9)  # r = 17 > d = 10
    result = solve("newton", W_o, U, V, lam, mu, 500, 1e-9)
    assert reduce_operands(U, V).U.shape[1] == 10 and result.converged
    np.testing.assert_allclose(result.weights.numpy(), lasso_reference(W_o, U, V, lam, mu), atol=1e-8)


@pytest.fixture(scope="module")
def sdxl(tiny_checkpoints):
    return CheckpointModel(tiny_checkpoints["sdxl"])


CONCEPTS = Concepts.build(["Van Gogh"], ["art"], ["Claude Monet"])


def test_sparse_patch_round_trips_and_reports_its_storage(sdxl, tmp_path):
    result = erase(sdxl, "space", CONCEPTS, {"sparsity": 0.8})
    report = result.report["space"]
    # The automatic μ for the paper's 80 % gives that on its sample of rows, and about that on every width.
    total = report["total"]
    assert abs(report["mu_sample_sparsity"] - 0.8) <= 0.01 and abs(total["sparsity"] - 0.8) <= 0.05
    assert len(total["sparsity_by_width"]) == 2  # SDXL: two K/V widths
    assert all(abs(s - 0.8) <= 0.06 for s in total["sparsity_by_width"].values())
    assert total["converged"] and total["distance_bound"] <= 1e-4 and total["objective"] < total["objective_start"]
    assert result.patch.steps[-1]["results"]["converged"] is True
    edits = result.patch.edits
    assert len(edits) == 140 and all(len(s) == 1 and isinstance(s[0], SparseEdit) for s in edits.values())
    for key, (edit,) in edits.items():
        dense = edit.apply(sdxl.weight(key))
        assert dense.dtype == torch.float16
        assert report["matrices"][key]["sparsity"] == pytest.approx((dense == 0).double().mean().item())
        assert 0 < report["matrices"][key]["iterations"] <= total["iterations"]  # its chunk's solve; total: the most
        assert edit.col_indices.dtype == torch.int16 and edit.nnz == int((dense != 0).sum())

    path = save_patch(result.patch, tmp_path / "space.safetensors")
    loaded = load_patch(path)
    for key in sdxl.arch.map_keys():
        W = sdxl.weight(key)
        assert torch.equal(loaded.apply_to(key, W), result.patch.apply_to(key, W))
    storage = report["storage"]
    stored = sum(t.numel() * t.element_size() for (e,) in edits.values() for t in e.tensors().values())
    assert storage["sparse_bytes"] == storage["stored_bytes"] == stored == result.patch.nbytes()
    assert storage["dense_bytes"] == sum(sdxl.weight(k).numel() * 2 for k in sdxl.arch.map_keys())
    assert 0 < storage["compressed_bytes"] < storage["sparse_bytes"]
    assert stored < path.stat().st_size < stored + 200_000  # the file holds the non-zeros (plus its header)

    assert not result.patch.is_low_rank()
    with pytest.raises(InvalidParameterError, match="not low-rank"):
        save_lora(result.patch, tmp_path / "lora.safetensors")


def test_at_the_default_sparsity_the_result_is_stored_dense_exactly(sdxl, tmp_path, monkeypatch):
    """At ~40 % zeros CSR (a value and an int16 column per non-zero, 4 bytes in fp16) is larger than the dense
    matrix: each result is stored dense, as the solver wrote it; the report still gives its zeros and the paper's
    storage figures (the CSR's size, which is larger); patch and checkpoint files round-trip."""
    written = {}

    def record(key, new):  # what SPACE writes, in the model's dtype, before it picks a form to store it in
        written[key] = new.clone()
        check_written_finite(key, new)

    monkeypatch.setattr("concept_eraser.methods.space.check_written_finite", record)
    result = erase(sdxl, "space", CONCEPTS)
    report = result.report["space"]
    assert abs(report["total"]["sparsity"] - 0.4) <= 0.05 and report["total"]["converged"]
    edits = result.patch.edits
    assert written.keys() == edits.keys() and len(edits) == 140
    layers = result.report["layers"]
    for key, (edit,) in edits.items():
        assert isinstance(edit, DenseEdit) and edit.new.dtype == torch.float16
        assert torch.equal(edit.apply(sdxl.weight(key)), written[key])
        zeros = (written[key] == 0).double().mean().item()
        assert 0.2 < zeros < 0.6 and layers[key]["form"] == "dense"
        assert layers[key]["zeros"] == pytest.approx(zeros) == report["matrices"][key]["sparsity"]
    assert len(sparsity_by_key(result.report)) == 140
    mean = sum(layers[k]["zeros"] for k in edits) / len(edits)
    assert f"sparsity: {mean:.1%} zeros" in "\n".join(headline(result.report))

    storage = report["storage"]
    dense = sum(w.numel() * 2 for w in written.values())
    assert storage["dense_bytes"] == storage["stored_bytes"] == result.patch.nbytes() == dense
    # the CSR it did not store: int32 row pointers, an int16 column and an fp16 value per non-zero, the shapes
    csr = sum(4 * (w.shape[0] + 1) + 4 * int((w != 0).sum()) + 16 for w in written.values())
    assert storage["sparse_bytes"] == csr > dense and 0 < storage["compressed_bytes"] < csr

    path = save_patch(result.patch, tmp_path / "space.safetensors")
    assert dense < path.stat().st_size < dense + 200_000  # no larger than the dense matrices (plus its header)
    loaded = load_patch(path)
    saved = CheckpointModel(save_checkpoint(sdxl, result.patch, tmp_path / "erased.safetensors"))
    for key, new in written.items():
        assert torch.equal(loaded.apply_to(key, sdxl.weight(key)), new) and torch.equal(saved.weight(key), new)
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
    assert space.report["space"]["total"]["converged"] and space.report["space"]["total"]["iterations"] <= 3
    for key in sdxl.arch.map_keys():
        W = sdxl.weight(key)
        torch.testing.assert_close(space.patch.apply_to(key, W), uce.patch.apply_to(key, W), rtol=2e-3, atol=2e-3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = erase(sdxl, "space", CONCEPTS, {"mu": 0.05, "iterations": 3, "start": "original"})
    assert any(issubclass(w.category, ConvergenceWarning) and "iterations=3" in str(w.message) for w in caught)
    total = short.report["space"]["total"]
    assert not total["converged"] and total["distance_bound"] > 1e-4
    assert short.patch.steps[-1]["results"]["converged"] is False


@pytest.mark.parametrize("setting,name,message", [
    ("mu=-1", "mu", "out of range"),
    ("start=zero", "start", "one of uce, original"),
    ("solver=admm", "solver", "one of newton, fista"),
    ("sparsity=1", "sparsity", "out of range"),
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
                 "--set", "sparsity=0.7", "--format", "patch", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # stored as its change W − W_o (float32), so that it stays a change on another checkpoint; applied to its
    # source it gives the sparse W, whose CSR size the report's storage figures give
    assert all(kinds == ["delta"] for kinds in info["edits"].values())
    results = info["erasures"][0]["results"]
    assert abs(results["sparsity"] - 0.7) < 0.05 and results["converged"] is True
    assert results["storage"]["sparse_bytes"] < info["bytes"]
    model, patch = CheckpointModel(tiny_checkpoints["sd1"]), load_patch(out)
    applied = torch.cat([patch.apply_to(key, model.weight(key)).reshape(-1) for key in patch.edits])
    assert abs((applied == 0).double().mean().item() - results["sparsity"]) < 0.01


def test_command_line_warns_when_the_solve_stops_unconverged(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "space.safetensors"
    code = main(["erase", str(tiny_checkpoints["sd1"]), "--method", "space", "--erase", "Van Gogh",
                 "--set", "iterations=2", "--format", "patch", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "warning: SPACE stopped at iterations=2 before its tolerance" in err
    assert load_patch(out).steps[-1]["results"]["converged"] is False  # and the file's record says so


def test_a_cancel_from_progress_stops_the_solve(sdxl):
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if "SPACE on" in message:
            raise Cancelled()

    with pytest.raises(Cancelled):
        erase(sdxl, "space", CONCEPTS, {"mu": 0.05}, progress)
    assert sum("SPACE on" in m for m in seen) == 1
