"""UCE checked against independent references: optimality, a direct least-squares solve,
low-rank == dense, limits, and the token policies' column choice."""

import numpy as np
import pytest
import torch

from concept_eraser import CheckpointModel, Concepts, erase
from concept_eraser.concepts import concept_columns
from concept_eraser.errors import NonFiniteResultError
from concept_eraser.linalg import right_update_edits, uce_factors
from concept_eraser.patch import DenseEdit, LowRankEdit


def problem(rng, d=12, out=9, n_e=3, n_p=4):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    return randn(out, d), randn(d, n_e), randn(d, n_e), randn(d, n_p)


def objective(W, W_o, c_e, c_g, c_p, lam, s_e, s_p):
    return (s_e * (W @ c_e - W_o @ c_g).pow(2).sum() + s_p * (W @ c_p - W_o @ c_p).pow(2).sum()
            + lam * (W - W_o).pow(2).sum())


@pytest.mark.parametrize("lam,s_e,s_p", [(0.5, 1.0, 0.1), (0.1, 2.0, 1.0), (3.0, 0.5, 0.0)])
def test_gradient_of_the_objective_vanishes_at_the_solution(rng, lam, s_e, s_p):
    W_o, c_e, c_g, c_p = problem(rng)
    A, B = uce_factors(c_e, c_g, c_p, lam, s_e, s_p)
    W = (W_o + W_o @ A @ B.T).requires_grad_(True)
    objective(W, W_o, c_e, c_g, c_p, lam, s_e, s_p).backward()
    assert W.grad.norm() / W_o.norm() < 1e-10


def test_equals_a_direct_least_squares_solve(rng):
    """min ‖W X − Y‖² with X = [√s_e C_E, √s_p C_P, √λ I], Y = [√s_e W_o C_G, √s_p W_o C_P, √λ W_o]."""
    lam, s_e, s_p = 0.7, 1.3, 0.4
    W_o, c_e, c_g, c_p = problem(rng)
    d = c_e.shape[0]
    X = np.hstack([np.sqrt(s_e) * c_e.numpy(), np.sqrt(s_p) * c_p.numpy(), np.sqrt(lam) * np.eye(d)])
    Y = np.hstack([np.sqrt(s_e) * (W_o @ c_g).numpy(), np.sqrt(s_p) * (W_o @ c_p).numpy(), np.sqrt(lam) * W_o.numpy()])
    reference = np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T
    A, B = uce_factors(c_e, c_g, c_p, lam, s_e, s_p)
    np.testing.assert_allclose((W_o + W_o @ A @ B.T).numpy(), reference, rtol=1e-9, atol=1e-9)


def test_low_rank_factors_reproduce_the_dense_update(rng):
    W_o, c_e, c_g, c_p = problem(rng, d=64, out=48, n_e=2)
    A, B = uce_factors(c_e, c_g, c_p, 0.5, 1.0, 0.2)
    edit = right_update_edits({"w": W_o.float()}, A, B)["w"]
    assert isinstance(edit, LowRankEdit) and edit.rank == 2
    dense = W_o + W_o @ A @ B.T
    torch.testing.assert_close(edit.apply(W_o.float()).double(), dense, rtol=1e-5, atol=1e-5)
    # A rank as large as the matrix is stored densely, with the same values.
    W_o, c_e, c_g, c_p = problem(rng, d=8, out=8, n_e=6)
    A, B = uce_factors(c_e, c_g, c_p, 0.5, 1.0, 0.2)
    edit = right_update_edits({"w": W_o.float()}, A, B)["w"]
    assert isinstance(edit, DenseEdit)
    torch.testing.assert_close(edit.new.double(), W_o + W_o @ A @ B.T, rtol=1e-5, atol=1e-5)


def test_limits(rng):
    W_o, c_e, c_g, c_p = problem(rng)
    A, B = uce_factors(c_e, c_g, c_p, 1e12, 1.0, 1.0)
    assert (W_o @ A @ B.T).abs().max() < 1e-8  # λ → ∞: no edit
    A, B = uce_factors(c_e, c_e.clone(), c_p, 0.5, 1.0, 1.0)
    assert (W_o @ A @ B.T).abs().max() == 0  # guide == target: nothing to move
    # s_p → ∞ and λ → 0: the preserved outputs are kept exactly.
    A, B = uce_factors(c_e, c_g, c_p, 1e-6, 1.0, 1e6)
    W = W_o + W_o @ A @ B.T
    torch.testing.assert_close(W @ c_p, W_o @ c_p, rtol=1e-4, atol=1e-4)


def test_non_finite_weights_fail_clearly(rng):
    W_o, c_e, c_g, c_p = problem(rng)
    W_o[0, 0] = float("inf")
    A, B = uce_factors(c_e, c_g, c_p, 0.5, 1.0, 1.0)
    with pytest.raises(NonFiniteResultError, match="w"):
        right_update_edits({"w": W_o.float()}, A, B)


def test_token_policies_pick_and_align_the_documented_columns(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    concepts = Concepts.build(["a cat"], ["dog"], ["a tree"])
    enc = model.text_encoder.encode(["a cat", "dog", "a tree", ""])
    cat, dog, tree, empty = enc.features
    assert enc.lengths == (4, 3, 4, 2)

    cols = concept_columns(model.text_encoder, concepts, "last_word_to_end", preserve_empty=True)
    # "cat" is token 2 of "a cat", "dog" token 1 of "dog": 77 − max(2, 1) = 75 aligned columns.
    assert cols.erase.shape[1] == cols.guide.shape[1] == 75
    torch.testing.assert_close(cols.erase.T, cat[2:77])
    torch.testing.assert_close(cols.guide.T, dog[1:76])
    torch.testing.assert_close(cols.preserve.T, torch.cat([empty, tree]))  # '' always preserved, all tokens

    cols = concept_columns(model.text_encoder, concepts, "last_word", preserve_empty=False)
    torch.testing.assert_close(cols.erase.T, cat[2:3])
    torch.testing.assert_close(cols.guide.T, dog[1:2])
    torch.testing.assert_close(cols.preserve.T, tree[2:3])

    cols = concept_columns(model.text_encoder, Concepts.build(["a cat"]), "all_tokens", preserve_empty=False)
    torch.testing.assert_close(cols.erase.T, cat)
    torch.testing.assert_close(cols.guide.T, empty)  # the default guide is the empty prompt
    assert cols.preserve.shape[1] == 0


def test_checkpoint_erasure_equals_a_per_matrix_reference(tiny_checkpoints):
    """Every matrix solved separately, as UCE's published scripts do (mat1 · mat2⁻¹ per layer)."""
    model = CheckpointModel(tiny_checkpoints["sd2"])
    concepts = Concepts.build(["Van Gogh", "a cat"], ["a painting"], ["Claude Monet"])
    result = erase(model, "uce", concepts, {"lam": 0.3})
    assert result.report["preserve_scale_used"] == pytest.approx(0.5)  # max(0.1, 1/2): '' and Monet
    enc = model.text_encoder.encode(["Van Gogh", "a cat", "a painting", "", "Claude Monet"])
    f, n = enc.features.double(), enc.lengths
    pairs = []
    for t, g in ((0, 2), (1, 2)):
        s_t, s_g = n[t] - 2, n[g] - 2
        count = 77 - max(s_t, s_g)
        pairs += list(zip(f[t, s_t:s_t + count], f[g, s_g:s_g + count]))
    preserved = list(f[3]) + list(f[4])
    for key in model.arch.map_keys():
        W_o = model.weight(key).double()
        mat1 = 0.3 * W_o
        mat2 = 0.3 * torch.eye(W_o.shape[1], dtype=torch.float64)
        for c, g in pairs:
            mat1 += torch.outer(W_o @ g, c)
            mat2 += torch.outer(c, c)
        for c in preserved:
            mat1 += 0.5 * torch.outer(W_o @ c, c)
            mat2 += 0.5 * torch.outer(c, c)
        reference = torch.linalg.solve(mat2, mat1.T).T  # mat1 · mat2⁻¹ (mat2 symmetric)
        got = result.patch.apply_to(key, model.weight(key)).double()
        # Written back in fp16: compare at fp16 resolution.
        torch.testing.assert_close(got, reference.half().double(), rtol=2e-3, atol=2e-3)


def test_the_result_is_written_in_the_model_dtype_and_the_input_is_untouched(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sdxl"])
    before = {k: model.weight(k).clone() for k in model.arch.map_keys()}
    result = erase(model, "uce", Concepts.build(["Van Gogh"]), {"token_policy": "last_word", "solve_dtype": "float32"})
    assert len(result.patch.edits) == 140
    for key in model.arch.map_keys():
        assert result.patch.apply_to(key, before[key]).dtype == torch.float16
        assert torch.equal(model.weight(key), before[key])
    changes = [v["relative_change"] for v in result.report["layers"].values()]
    assert all(0 < c < 1 for c in changes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_solves_on_the_weights_device(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sd1"], device="cuda")
    result = erase(model, "uce", Concepts.build(["Van Gogh"]))
    stage = next(iter(result.patch.edits.values()))[0]
    assert next(iter(stage.tensors().values())).is_cuda
