"""The recoverability probe checked against direct solves: RECE's derived embedding equals a stacked
least-squares solve and zeroes the gradient of its objective; the figures equal their definitions; an
edit that only re-maps the input (W = W_o T) stays fully recoverable; the erase report and the file's
provenance carry the probe."""

import json

import numpy as np
import pytest
import torch

from concept_eraser import CheckpointModel, Concepts, erase
from concept_eraser.cli import main
from concept_eraser.linalg import GRAM_BLOCK, gram_sum
from concept_eraser.probe import RecoveryProbe


def random_problem(rng, d=6, outs=(5, 9, 7), n=4):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    originals = [randn(o, d) for o in outs]
    edited = [w + 0.3 * randn(*w.shape) for w in originals]
    return edited, originals, randn(d, n)


def accumulate(edited, originals, features):
    probe = RecoveryProbe(features, compute_dtype=torch.float64)
    for w, w_o in zip(edited, originals):
        probe.add(w, w_o)
    return probe


@pytest.mark.parametrize("d", [6, GRAM_BLOCK + 44])  # one block of the Gram sum, and two with a ragged edge
@pytest.mark.parametrize("lam_r", [1e-3, 0.1, 10.0])
def test_derived_embedding_is_the_regularised_least_squares_solution(rng, lam_r, d):
    edited, originals, C = random_problem(rng, d=d)
    derived = accumulate(edited, originals, C).derive(lam_r)
    # min ‖[𝒲; √λ_r I] c' − [𝒲_o c; 0]‖² column by column, solved directly.
    d = C.shape[0]
    X = np.vstack([w.numpy() for w in edited] + [np.sqrt(lam_r) * np.eye(d)])
    Y = np.vstack([(w_o @ C).numpy() for w_o in originals] + [np.zeros((d, C.shape[1]))])
    reference = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(derived.numpy(), reference, rtol=1e-9, atol=1e-10)
    # First-order optimality of RECE's objective (Eq. 6) at c'.
    c = derived.clone().requires_grad_(True)
    loss = sum((w @ c - w_o @ C).pow(2).sum() for w, w_o in zip(edited, originals)) + lam_r * c.pow(2).sum()
    loss.backward()
    assert c.grad.norm() < 1e-9 * (1 + C.norm())


@pytest.mark.parametrize("d", [3, GRAM_BLOCK, 2 * GRAM_BLOCK + 1])
def test_gram_sums_equal_numpy(rng, d):
    """Σ WᵀW, formed by row blocks on and above the diagonal, equals numpy's full products (float64 and the
    probe's float32 products) at every width relative to the block."""
    edited, originals, C = random_problem(rng, d=d, outs=(5, 300, 77))
    reference = sum(w.numpy().T @ w.numpy() for w in edited)
    np.testing.assert_allclose(gram_sum(edited, torch.device("cpu")).numpy(), reference, rtol=1e-12, atol=1e-10)
    probe = RecoveryProbe(C)  # float32 products
    for w, w_o in zip(edited, originals):
        probe.add(w, w_o)
    np.testing.assert_allclose(probe.gram.numpy(), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_figures_match_their_definitions(rng):
    edited, originals, C = random_problem(rng)
    probe = accumulate(edited, originals, C)
    derived = probe.derive(0.1)
    figures = probe.measure(derived, {"a": [0, 2], "b": [1, 3]})
    for name, cols in (("a", [0, 2]), ("b", [1, 3])):
        c, c_new = C[:, cols], derived[:, cols]
        produced = torch.cat([w @ c_new for w in edited])  # 𝒲 C'
        target = torch.cat([w_o @ c for w_o in originals])  # 𝒲_o C
        direct = torch.cat([w @ c for w in edited])  # 𝒲 C
        f = figures[name]
        assert f["residual"] == pytest.approx(((produced - target).norm() / target.norm()).item(), rel=1e-9)
        assert f["cosine"] == pytest.approx(((produced * target).sum() / (produced.norm() * target.norm())).item(),
                                            rel=1e-9)
        assert f["direct"] == pytest.approx(((direct - target).norm() / target.norm()).item(), rel=1e-9)
        assert f["norm_ratio"] == pytest.approx((c_new.norm() / c.norm()).item(), rel=1e-9)
    change = torch.cat([(w - w_o).flatten() for w, w_o in zip(edited, originals)]).norm()
    assert probe.weight_change == pytest.approx((change / torch.cat([w.flatten() for w in originals]).norm()).item())


def test_an_input_remapping_edit_is_fully_recoverable(rng):
    """UCE-like edits W_i = W_o,i T (T invertible, shared) are undone by c' = T⁻¹ c as λ_r → 0."""
    _, originals, C = random_problem(rng, d=6, outs=(8, 10))
    T = torch.eye(6, dtype=torch.float64) + 0.5 * torch.randn(6, 6, generator=rng, dtype=torch.float64)
    probe = accumulate([w @ T for w in originals], originals, C)
    derived = probe.derive(1e-10)
    f = probe.measure(derived, {"all": range(C.shape[1])})["all"]
    assert f["residual"] < 1e-6 and f["cosine"] == pytest.approx(1.0, abs=1e-10) and f["direct"] > 0.1
    torch.testing.assert_close(derived, torch.linalg.solve(T, C), rtol=1e-6, atol=1e-6)
    # No edit at all: nothing moved, and only λ_r keeps c' from reproducing everything.
    probe = accumulate(originals, originals, C)
    f = probe.measure(probe.derive(1e-10), {"all": range(C.shape[1])})["all"]
    assert f["direct"] == 0 and f["residual"] < 1e-6 and probe.weight_change == 0


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints):
    return CheckpointModel(tiny_checkpoints["sd1"])


def test_every_report_and_provenance_carry_the_probe(sd1, tiny_checkpoints, tmp_path, capsys):
    result = erase(sd1, "uce", Concepts.build(["Van Gogh", "a cat"], ["a painting"]))
    probe = result.report["probe"]
    assert probe["lam_r"] == 0.1 and set(probe["targets"]) == {"Van Gogh", "a cat"}
    for figures in probe["targets"].values():
        assert 0 <= figures["residual"] < figures["direct"] and -1 <= figures["cosine"] <= 1
    assert set(result.patch.steps[0]["results"]["probe"]) == {"Van Gogh", "a cat"}

    out = tmp_path / "erased.safetensors"
    assert main(["erase", str(tiny_checkpoints["sd1"]), "--erase", "Van Gogh", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "recoverability of 'Van Gogh'" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["erasures"][0]
    assert set(step["results"]["probe"]["Van Gogh"]) == {"residual", "cosine"}
