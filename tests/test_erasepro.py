"""ErasePro: zero residual at every edited layer of the SAVED checkpoint, checked by an independent
forward pass (transformers' own CLIP forward with hooks, float64), fused OpenCLIP keys, pseudo-inverse."""

import re

import pytest
import torch
from clip_reference import hf_text_model, hf_transformer
from safetensors import safe_open

from concept_eraser import CheckpointModel, Concepts, erase, load_patch, save_checkpoint, save_lora, save_patch
from concept_eraser.errors import InvalidParameterError
from concept_eraser.linalg import zero_residual_factors
from concept_eraser.models.arch import detect
from concept_eraser.models.text_encoders import hf_state_dict
from concept_eraser.patch import LowRankEdit
from concept_eraser.tiny import make_tiny_checkpoint
from concept_eraser.tokenizer import EOS_ID, tokenize

TARGETS, GUIDES, PRESERVE = ["Van Gogh"], ["a painter"], ["Claude Monet"]
EXACT = {"feature_dtype": "float64", "solve_dtype": "float64", "token_policy": "prompt_tokens"}
HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.weight$")
FUSED_QKV = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")


pytestmark = pytest.mark.usefixtures("one_thread")


class Reference:
    """A checkpoint file read back independently: tensors straight from safetensors, each text encoder
    as a float64 transformers CLIPTextModel run by its own forward; hooks on every block's first layer
    norm collect what its q/k/v read."""

    def __init__(self, path):
        with safe_open(str(path), "pt") as f:
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.arch = detect({k: tuple(t.shape) for k, t in self.tensors.items()})
        self.models = [(spec, hf_text_model(spec, hf_state_dict(spec, list(self.tensors), self.tensors.__getitem__)))
                       for spec in self.arch.encoders]

    def run(self, prompts):
        """{encoder name: {block: [n, 77, w] q/k/v input}}, context [n, 77, d], pooled or None."""
        inputs, contexts, pooled = {}, [], None
        for spec, model in self.models:
            ids = torch.tensor([tokenize(p, EOS_ID if spec.pad_token == "eos" else 0).ids for p in prompts])
            found = inputs[spec.name] = {}
            hooks = [layer.layer_norm1.register_forward_hook(lambda m, a, out, i=i: found.__setitem__(i, out))
                     for i, layer in enumerate(hf_transformer(model).encoder.layers)]
            with torch.no_grad():
                out = model(input_ids=ids, output_hidden_states=True)
            for h in hooks:
                h.remove()
            hidden = out.hidden_states[spec.hidden_layer]
            contexts.append(hf_transformer(model).final_layer_norm(hidden) if spec.final_norm else hidden)
            if spec.pooled:
                eos = (ids == EOS_ID).int().argmax(1)
                projection = self.tensors[spec.prefix + "text_projection"]
                pooled = out.last_hidden_state[torch.arange(len(prompts)), eos] @ projection
        return inputs, torch.cat(contexts, -1), pooled


def columns(states, rows_positions):
    return torch.cat([states[row, :count] for row, count in rows_positions]).T


def prompt_lengths(prompts):
    return [tokenize(p, 0).length for p in prompts]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def erased(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"erasepro_{request.param}")
    source = make_tiny_checkpoint(folder / "model.safetensors", request.param, dtype=torch.float64)
    model = CheckpointModel(source)
    result = erase(model, "erasepro", Concepts.build(TARGETS, GUIDES, PRESERVE), EXACT)
    saved = save_checkpoint(model, result.patch, folder / "erased.safetensors")
    return model, result, Reference(source), Reference(saved), saved


def test_zero_residual_at_every_edited_layer_of_the_saved_checkpoint(erased):
    model, result, original, edited, _ = erased
    # prompt_tokens: positions 0 … max(len target, len guide) − 1; preserved prompts map to themselves
    (lt, lg), (lp,) = prompt_lengths(TARGETS + GUIDES), prompt_lengths(PRESERVE)
    n = max(lt, lg)
    x_inputs, x_context, _ = edited.run(TARGETS + PRESERVE)
    y_inputs, y_context, _ = original.run(GUIDES + PRESERVE)
    x_cols, y_cols = [(0, n), (1, lp)], [(0, n), (1, lp)]

    checked = set()
    for spec in model.arch.encoders:
        for key in (k for k in result.patch.edits if k.startswith(spec.prefix)):
            block = int((HF_QKV.search(key) or FUSED_QKV.search(key)).group(1))
            W, W_o = edited.tensors[key], original.tensors[key]
            X = columns(x_inputs[spec.name][block], x_cols)
            Y = columns(y_inputs[spec.name][block], y_cols)
            residual = (W @ X - W_o @ Y).norm() / (W_o @ Y).norm()
            assert residual <= 1e-5, (key, float(residual))
            assert (W_o @ X - W_o @ Y).norm() / (W_o @ Y).norm() > 1e-2  # the edit did something
            checked.add(key)
    X, Y = columns(x_context, x_cols), columns(y_context, y_cols)
    for key in model.arch.map_keys():
        W, W_o = edited.tensors[key], original.tensors[key]
        assert (W @ X - W_o @ Y).norm() / (W_o @ Y).norm() <= 1e-5, key
        checked.add(key)

    # Every q/k/v of every block whose output reaches the U-Net, and nothing else.
    expected_blocks = {"sd1": {"clip_l": 2}, "sd2": {"clip_h": 2},
                       "sdxl": {"clip_l": 1, "clip_g": 3}}[model.arch.family]
    te_keys = {k for k in result.patch.edits if not k.startswith("model.diffusion_model.")}
    per_block = {spec.name: 1 if spec.layout == "open_clip" else 3 for spec in model.arch.encoders}
    assert len(te_keys) == sum(per_block[name] * count for name, count in expected_blocks.items())
    assert te_keys | set(model.arch.map_keys()) == checked == set(result.patch.edits)
    assert all(torch.equal(edited.tensors[k], original.tensors[k]) for k in original.tensors if k not in checked)
    assert result.report["max_residual"] <= 1e-5


def test_the_saved_text_encoder_gives_the_edited_features(erased):
    _, _, original, edited, saved = erased
    prompts = TARGETS + PRESERVE
    reloaded = CheckpointModel(saved).text_encoder.encode(prompts).features.double()
    expected, before = edited.run(prompts)[1], original.run(prompts)[1]
    scale = expected.abs().max()
    assert (reloaded - expected).abs().max() <= 1e-5 * scale  # the library's (float32) encoder reads the edit
    assert (expected - before).abs().max() > 1e-2 * scale


def test_edits_are_low_rank_under_the_checkpoints_own_keys(erased):
    model, result, original, edited, _ = erased
    assert list(edited.tensors) == list(original.tensors)  # same keys, same order
    fused = [k for k in result.patch.edits if k.endswith("attn.in_proj_weight")]
    assert bool(fused) == (model.arch.family in ("sd2", "sdxl"))
    for key, stages in result.patch.edits.items():
        (edit,) = stages
        assert isinstance(edit, LowRankEdit) and edit.rank <= result.report["columns"]
        assert torch.equal(model.weight(key), original.tensors[key])  # the model itself was never written to


def test_open_clip_fused_round_trip_patch_and_lora(erased, tmp_path):
    model, result, original, edited, _ = erased
    family = model.arch.family
    if family == "sd1":
        pytest.skip("SD1 has no OpenCLIP encoder")
    patch = load_patch(save_patch(result.patch, tmp_path / "p.safetensors"))
    for key in result.patch.edits:
        assert torch.equal(patch.apply_to(key, original.tensors[key]), edited.tensors[key])

    with pytest.raises(InvalidParameterError, match="arch"):
        save_lora(result.patch, tmp_path / "no-arch.safetensors")
    with safe_open(str(save_lora(result.patch, tmp_path / "lora.safetensors", arch=model.arch)), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    spec = next(e for e in model.arch.encoders if e.layout == "open_clip")
    prefix = spec.lora_prefix + "text_model_encoder_layers_0_self_attn_"
    parts = [lora[f"{prefix}{p}_proj.lora_up.weight"] @ lora[f"{prefix}{p}_proj.lora_down.weight"] for p in "qkv"]
    key = spec.prefix + "transformer.resblocks.0.attn.in_proj_weight"
    delta = edited.tensors[key] - original.tensors[key]
    assert torch.allclose(torch.cat(parts), delta, atol=1e-12 * delta.abs().max())
    assert spec.lora_prefix == ("lora_te_" if family == "sd2" else "lora_te2_")


def test_hf_text_encoder_lora_names_follow_kohya(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m.safetensors", "sd1")
    model = CheckpointModel(path)
    result = erase(model, "erasepro", Concepts.build(TARGETS), {"token_policy": "first_k", "k": 3})
    with safe_open(str(save_lora(result.patch, tmp_path / "lora.safetensors", arch=model.arch)), "pt") as f:
        names = set(f.keys())
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in names
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha" in names


def test_zero_residual_factors_match_the_pseudo_inverse_formula(rng):
    d, out = 12, 7
    W_o = torch.randn(out, d, generator=rng, dtype=torch.float64)
    X = torch.randn(d, 5, generator=rng, dtype=torch.float64)
    Y = torch.randn(d, 5, generator=rng, dtype=torch.float64)
    # full column rank: W* = W_o + W_o (Y − X)(XᵀX)⁻¹Xᵀ (paper eq. 5)
    A, B = zero_residual_factors(X, Y, rcond=1e-12)
    expected = W_o @ (Y - X) @ torch.linalg.solve(X.T @ X, X.T)
    assert torch.allclose(W_o @ A @ B.T, expected, atol=1e-12)
    assert torch.allclose((W_o + W_o @ A @ B.T) @ X, W_o @ Y, atol=1e-12)

    # rank-deficient X (a repeated column with the same anchor, as BOS in every prompt): XᵀX is singular,
    # the pseudo-inverse still meets every constraint, without NaN, with the minimum-norm change.
    Xr, Yr = torch.cat([X, X[:, :1]], 1), torch.cat([Y, Y[:, :1]], 1)
    assert torch.linalg.matrix_rank(Xr.T @ Xr) < Xr.shape[1]
    A, B = zero_residual_factors(Xr, Yr, rcond=1e-12)
    delta = W_o @ A @ B.T
    assert torch.isfinite(delta).all() and A.shape[1] == 5
    assert torch.allclose((W_o + delta) @ Xr, W_o @ Yr, atol=1e-12)
    assert torch.allclose(delta, W_o @ (Yr - Xr) @ torch.linalg.pinv(Xr), atol=1e-12)

    # more columns than the width: the least-squares solution, finite.
    Xw, Yw = (torch.randn(d, 20, generator=rng, dtype=torch.float64) for _ in range(2))
    A, B = zero_residual_factors(Xw, Yw, rcond=1e-12)
    assert torch.allclose(W_o @ A @ B.T, W_o @ (Yw - Xw) @ torch.linalg.pinv(Xw), atol=1e-10)


def test_more_token_columns_than_the_width_warns_and_stays_finite(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sd1"])  # text width 64 < 77 columns of all_tokens
    with pytest.warns(UserWarning, match="could not meet its constraints"):
        result = erase(model, "erasepro", Concepts.build(TARGETS), {"token_policy": "all_tokens", "edit_unet": False})
    for key, stages in result.patch.edits.items():
        assert torch.isfinite(result.patch.apply_to(key, model.weight(key)).float()).all()
    # the target's and the empty prompt's 77 tokens
    assert result.report["stages"][0]["rank"] < result.report["columns"] == 2 * 77


def test_implicit_variant_start_layer_first_k_and_original_features(tmp_path):
    """ErasePro-w style: first k tokens from a later block, guide "", Algorithm 2 (features of the original
    model): the edited block maps the ORIGINAL target features onto the anchor's."""
    source = make_tiny_checkpoint(tmp_path / "m.safetensors", "sd2", dtype=torch.float64)
    model = CheckpointModel(source)
    values = {"start_layer": 2, "token_policy": "first_k", "k": 3, "progressive": False,
              "feature_dtype": "float64", "solve_dtype": "float64"}
    result = erase(model, "erasepro", Concepts.build(["nudity"], [""]), values)
    te = [k for k in result.patch.edits if not k.startswith("model.")]
    assert te == ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    original = Reference(source)
    X = original.run(["nudity"])[0]["clip_h"][1][0, :3].T
    Y = original.run([""])[0]["clip_h"][1][0, :3].T
    W_o = original.tensors[te[0]]
    W = result.patch.apply_to(te[0], W_o)
    assert (W @ X - W_o @ Y).norm() / (W_o @ Y).norm() <= 1e-6


@pytest.mark.parametrize("edit_unet", [False, True])
def test_a_start_layer_past_the_encoder_is_refused(tiny_checkpoints, edit_unet):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    depth = model.arch.encoders[0].layers
    with pytest.raises(InvalidParameterError, match=f"^start_layer: {depth + 1} is past the last block"):
        erase(model, "erasepro", Concepts.build(TARGETS), {"start_layer": depth + 1, "edit_unet": edit_unet})
