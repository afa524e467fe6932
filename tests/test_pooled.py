"""SDXL pooled-path edit (`pooled.py`): the saved label_emb is the ridge optimum, checked against an
independent least-squares solve and the objective's gradient, with pooled embeddings from an
independent transformers forward of the checkpoint's bigG."""

import pytest
import torch
from clip_reference import hf_text_model
from safetensors import safe_open

from concept_eraser import METHODS, CheckpointModel, Concepts, erase, save_checkpoint, save_lora
from concept_eraser.errors import InvalidParameterError
from concept_eraser.methods.base import ErasureMethod
from concept_eraser.models.arch import SDXL, detect
from concept_eraser.models.text_encoders import hf_state_dict
from concept_eraser.params import Param
from concept_eraser.tiny import make_tiny_checkpoint
from concept_eraser.tokenizer import EOS_ID, tokenize

TARGETS, GUIDES, PRESERVE = ["Van Gogh"], ["a painter"], ["Claude Monet"]
LAM, SCALE_P = 0.5, 1.0  # the defaults of pooled_lam, pooled_preserve_scale


pytestmark = pytest.mark.usefixtures("one_thread")


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def pooled(tensors, prompts):
    """[n, 1280-equivalent] pooled bigG embeddings as columns' source: transformers' own forward in
    float64, the first EOS state of the final-normed output, times text_projection."""
    spec = detect({k: tuple(t.shape) for k, t in tensors.items()}).encoders[1]
    model = hf_text_model(spec, hf_state_dict(spec, list(tensors), tensors.__getitem__))
    ids = torch.tensor([tokenize(p, 0).ids for p in prompts])
    with torch.no_grad():
        last = model(input_ids=ids).last_hidden_state
    eos = (ids == EOS_ID).int().argmax(1)
    return last[torch.arange(len(prompts)), eos] @ tensors[spec.prefix + "text_projection"]


def objective(W, W_o, P_E, P_G, P_P, P_P0):
    return ((W @ P_E - W_o @ P_G).pow(2).sum() + SCALE_P * (W @ P_P - W_o @ P_P0).pow(2).sum()
            + LAM * (W - W_o).pow(2).sum())


def gradient(W, *args):
    W = W.clone().requires_grad_(True)
    objective(W, *args).backward()
    return W.grad


def assert_optimal(W, W_o, *columns):
    """∇f(W) ≈ 0, relative to ∇f(W_o); the library's pooled features are float32, hence 1e-5."""
    ratio = gradient(W, W_o, *columns).norm() / gradient(W_o, W_o, *columns).norm()
    assert ratio <= 1e-5, float(ratio)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pooled") / "sdxl.safetensors", "sdxl", dtype=torch.float64)


def test_pooled_edit_is_the_ridge_optimum_and_touches_only_the_pooled_columns(source, tmp_path):
    model = CheckpointModel(source)
    values = {"pooled_edit": True, "token_policy": "last_word"}  # last_word: low rank, so a LoRA can hold it
    result = erase(model, "uce", Concepts.build(TARGETS, GUIDES, PRESERVE), values)
    before, after = read(source), read(save_checkpoint(model, result.patch, tmp_path / "erased.safetensors"))
    width = model.arch.encoders[1].width
    W_o, W = before[SDXL.ADM_KEY][:, :width], after[SDXL.ADM_KEY][:, :width]
    assert torch.equal(after[SDXL.ADM_KEY][:, width:], before[SDXL.ADM_KEY][:, width:])  # size/crop columns kept
    bias = SDXL.ADM_KEY.replace(".weight", ".bias")
    assert torch.equal(after[bias], before[bias])

    P_E, P_G = pooled(before, TARGETS).T, pooled(before, GUIDES).T
    P_P = pooled(before, ["", *PRESERVE]).T  # the empty prompt is always kept
    # independent closed form: least squares on the stacked system [P_E, √s_p P_P, √λ I] → [W_o P_G, …]
    Z = torch.cat([P_E, SCALE_P ** 0.5 * P_P, LAM ** 0.5 * torch.eye(width, dtype=torch.float64)], 1)
    T = torch.cat([W_o @ P_G, SCALE_P ** 0.5 * W_o @ P_P, LAM ** 0.5 * W_o], 1)
    W_star = torch.linalg.lstsq(Z.T, T.T).solution.T
    # pooled features come from the library's float32 encoder: agreement to float32 precision
    assert (W - W_star).norm() <= 1e-5 * (W_star - W_o).norm()
    assert_optimal(W, W_o, P_E, P_G, P_P, P_P)

    figures = result.report["pooled"]
    assert figures["target_gap_after"] < figures["target_gap_before"]
    assert any(k.endswith("attn2.to_k.weight") for k in result.patch.edits)  # the method's own edits stay
    # the library's text encoder exposes the same pooled embedding
    library = model.text_encoder.encode(TARGETS).pooled.double()
    assert torch.allclose(library, P_E.T, atol=1e-5 * P_E.abs().max())
    lora = read(save_lora(result.patch, tmp_path / "lora.safetensors", arch=model.arch))
    assert "lora_unet_label_emb_0_0.lora_up.weight" in lora


def test_pooled_edit_follows_a_text_encoder_edit(source, tmp_path):
    """After ErasePro the target's and the preserved prompts' pooled embeddings come from the edited
    text encoder; the anchors (W_o P_G, W_o P_P°) from the original. preserve_empty off: ErasePro holds the
    preserved prompts' features exactly, so only then does the empty prompt (which the pooled edit always
    preserves) move."""
    model = CheckpointModel(source)
    values = {"pooled_edit": True, "token_policy": "prompt_tokens", "feature_dtype": "float64", "preserve_empty": False}
    result = erase(model, "erasepro", Concepts.build(TARGETS, GUIDES, PRESERVE), values)
    before, after = read(source), read(save_checkpoint(model, result.patch, tmp_path / "erased.safetensors"))
    width = model.arch.encoders[1].width
    W_o, W = before[SDXL.ADM_KEY][:, :width], after[SDXL.ADM_KEY][:, :width]
    kept = ["", *PRESERVE]
    P_E, P_P = pooled(after, TARGETS).T, pooled(after, kept).T
    P_G, P_P0 = pooled(before, GUIDES).T, pooled(before, kept).T
    assert (P_P - P_P0).norm() > 1e-3 * P_P0.norm()  # the text-encoder edit did move them
    assert_optimal(W, W_o, P_E, P_G, P_P, P_P0)


def test_every_method_offers_the_pooled_option_auto_and_off_on_sdxl(source):
    for method in METHODS.values():
        params = {p.name: p for p in method.params}
        assert params["pooled_edit"].default is None and "pooled_lam" in params, method.name
    result = erase(CheckpointModel(source), "uce", Concepts.build(TARGETS), {"token_policy": "last_word"})
    assert SDXL.ADM_KEY not in result.patch.edits
    assert result.report["params"]["pooled_edit"] is False  # the report records what auto chose


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_pooled_edit_is_refused_without_a_pooled_path(family, tiny_checkpoints):
    with pytest.raises(InvalidParameterError, match="pooled_edit"):
        erase(CheckpointModel(tiny_checkpoints[family]), "uce", Concepts.build(TARGETS), {"pooled_edit": True})


def test_a_method_cannot_redeclare_a_common_parameter():
    with pytest.raises(TypeError, match="pooled_edit"):
        type("Clash", (ErasureMethod,), {"params": (Param("pooled_edit", bool, True, "mine"),)})
