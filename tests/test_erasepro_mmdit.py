"""ErasePro on Flux.1 and SD3 (tiny seeded files): the zero-residual constraint W X = W_o Y at every edited T5 block
and at the transformer's context map, with X and Y computed here by transformers' own T5EncoderModel built from the
edited and the original weights (the method walks T5 block by block with code of its own); the command line."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from concept_eraser.api import erase
from concept_eraser.checkpoint import CheckpointModel
from concept_eraser.cli import main
from concept_eraser.concepts import Concepts
from concept_eraser.models.arch import CONTEXT, ENCODER_PREFIXES
from concept_eraser.tiny import tiny_mmdit_files

from test_mmdit import WORDS, t5_tokenizer  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

T5_IDS = {"": [], **{w: [i + 3] for i, w in enumerate(WORDS)}}  # the fixture's word-level vocabulary; </s> is 1
TARGET, GUIDE, PRESERVED = "cat", "dog", "tree"
# prompt_tokens pairs positions 0 … max(len) − 1 (T5: word, EOS): cat → dog and tree → tree at 0, 1; "" → "" at 0
PAIRS = [(TARGET, GUIDE, 0), (TARGET, GUIDE, 1), (PRESERVED, PRESERVED, 0), (PRESERVED, PRESERVED, 1), ("", "", 0)]


def reference_t5(state: dict[str, torch.Tensor]):
    """transformers' T5EncoderModel (float64) holding a tiny T5 file's tensors, its config written out here."""
    from transformers import T5Config, T5EncoderModel

    heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    config = T5Config(vocab_size=state["shared.weight"].shape[0], d_model=state["shared.weight"].shape[1],
                      d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
                      d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                      num_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block.")),
                      num_heads=heads, relative_attention_num_buckets=32, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    model = T5EncoderModel(config).double().eval()
    state = {k: v.double() for k, v in state.items()}
    model.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]})
    return model


def q_inputs_and_features(model, prompts, window):
    """{block: input of its q projection [n, window, d]}, final-normed last hidden state, no attention mask (ComfyUI's
    Flux and SD3 T5 features: words, EOS, zero padding to the window)."""
    ids = torch.tensor([(T5_IDS[p] + [1] + [0] * window)[:window] for p in prompts])
    seen = {}
    hooks = [block.layer[0].SelfAttention.q.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0])) for i, block in enumerate(model.encoder.block)]
    with torch.no_grad():
        features = model(input_ids=ids).last_hidden_state
    for hook in hooks:
        hook.remove()
    return seen, features


def columns(states, prompts, side):
    """d × N: the PAIRS' columns of current (side 0) or anchor (side 1) prompts' states."""
    return torch.stack([states[prompts.index(pair[side]), pair[2]] for pair in PAIRS], 1)


# SD3's context map also reads CLIP's 77 tokens first: BOS, word, EOS of cat / dog and tree, BOS, EOS of "" (8 columns)
@pytest.mark.parametrize("family,layout,window,context_columns", [("flux_dev", "separate", 256, len(PAIRS)),
                                                                  ("sd3", "all_in_one", 77, 8 + len(PAIRS))])
def test_the_edit_sends_the_targets_t5_and_context_features_exactly_onto_the_anchors(
        t5_tokenizer, tmp_path, family, layout, window, context_columns):  # noqa: F811
    paths = tiny_mmdit_files(tmp_path, family, layout)
    before = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}
    model = CheckpointModel(paths.pop("model"), text_encoders=paths)
    t5 = next(e for e in model.arch.encoders if e.layout == "t5")
    context_key = model.arch.map_keys(CONTEXT)[0]
    original = {k: model.weight(k).clone() for k in model.keys() if k.startswith(t5.prefix) or k == context_key}

    result = erase(model, "erasepro", Concepts.build([TARGET], [GUIDE], [PRESERVED]), {"token_policy": "prompt_tokens"})

    # every T5 block's q/k/v, every CLIP block (their pooled outputs are read), the context map and (pooled_edit
    # auto) the pooled map, nothing else
    edited = set(result.patch.edits)
    assert {k for k in edited if k.startswith(t5.prefix)} == {
        f"{t5.prefix}encoder.block.{i}.layer.0.SelfAttention.{p}.weight" for i in range(t5.layers) for p in "qkv"}
    pooled_key = model.arch.map_keys("pooled")[0]
    assert {context_key, pooled_key} <= edited
    assert all(k.startswith(tuple(e.prefix for e in model.arch.encoders)) for k in edited - {context_key, pooled_key})
    # the pooled edit reads the edited encoders' pooled outputs side by side (SD3: CLIP-L ⊕ CLIP-G), which the
    # encoder edits already sent onto the guide's
    assert result.report["pooled"]["target_gap_after"] < 1e-3
    # the input model is untouched: its weights and its files
    assert all(torch.equal(model.weight(k), w) for k, w in original.items())
    assert before == {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in {**paths, "model": model.path}.items()}

    # X through the edited T5 (weights as stored: fp16), Y through the original, both by transformers' T5
    strip = {k[len(t5.prefix):]: k for k in original if k.startswith(t5.prefix)}
    stored = {name: result.patch.apply_to(k, original[k]) if k in edited else original[k] for name, k in strip.items()}
    assert all(w.dtype == torch.float16 for w in stored.values())
    current, anchors = [TARGET, PRESERVED, ""], [GUIDE, PRESERVED, ""]
    x_inputs, x_features = q_inputs_and_features(reference_t5(stored), current, window)
    y_inputs, y_features = q_inputs_and_features(reference_t5({n: original[k] for n, k in strip.items()}), anchors,
                                                 window)
    for i in range(t5.layers):
        X, Y = columns(x_inputs[i], current, 0), columns(y_inputs[i], anchors, 1)
        assert (X - Y).norm() > 0.1 * Y.norm()  # the target's features differ at every block
        for p in "qkv":
            name = f"encoder.block.{i}.layer.0.SelfAttention.{p}.weight"
            W, W_o = stored[name].double(), original[strip[name]].double()
            assert (W @ X - W_o @ Y).norm() < 1e-3 * (W_o @ Y).norm(), name
            assert (W_o @ X - W_o @ Y).norm() > 0.1 * (W_o @ Y).norm()

    # the context map: the target's txt_in / context_embedder output equals the guide's, a preserved prompt's and the
    # empty prompt's equal their own before the edit (T5's columns; SD3's CLIP columns precede them)
    X, Y = columns(x_features, current, 0), columns(y_features, anchors, 1)
    W = result.patch.apply_to(context_key, original[context_key]).double()
    W_o = original[context_key].double()
    assert (W @ X - W_o @ Y).norm() < 1e-3 * (W_o @ Y).norm()
    assert (W_o @ X - W_o @ Y).norm() > 0.1 * (W_o @ Y).norm()
    stage = result.report["stages"][-1]
    assert stage["stage"] == "transformer context maps" and stage["columns"] == context_columns
    assert result.report["max_residual"] < 1e-5


def test_cli_erases_a_flux_file_with_erasepro(t5_tokenizer, tmp_path, capsys):  # noqa: F811
    paths = tiny_mmdit_files(tmp_path, "flux_schnell", "all_in_one")
    out = tmp_path / "erased.safetensors"
    args = ["erase", paths["model"], "--t5-tokenizer", t5_tokenizer, "--method", "erasepro", "--erase", TARGET,
            "--guide", GUIDE, "--set", "token_policy=prompt_tokens"]
    assert main([str(a) for a in args + ["--out", out]]) == 0
    source, erased = load_file(str(paths["model"])), load_file(str(out))
    changed = {k for k in source if not torch.equal(source[k], erased[k])}
    t5, clip = ENCODER_PREFIXES["t5xxl"], ENCODER_PREFIXES["clip_l"] + "text_model."
    assert changed == {"model.diffusion_model.txt_in.weight", "model.diffusion_model.vector_in.in_layer.weight",
                       *(f"{t5}encoder.block.{i}.layer.0.SelfAttention.{p}.weight" for i in range(2) for p in "qkv"),
                       *(f"{clip}encoder.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qkv")}
    # encoders in files of their own: a LoRA names T5's modules as ComfyUI's LoRA loader does; a checkpoint is refused
    (tmp_path / "separate").mkdir()
    separate = tiny_mmdit_files(tmp_path / "separate", "flux_schnell", "separate")
    encoders = ["--t5", separate["t5xxl"], "--clip-l", separate["clip_l"]]
    args[1] = separate["model"]
    assert main([str(a) for a in args + encoders + ["--format", "lora", "--out", tmp_path / "lora.safetensors"]]) == 0
    assert_comfyui_maps_the_text_encoder_modules(tmp_path / "lora.safetensors", separate)
    assert main([str(a) for a in args + encoders + ["--out", tmp_path / "whole.safetensors"]]) == 2
    assert "a text encoder given in a file of its own" in capsys.readouterr().err
    assert not (tmp_path / "whole.safetensors").exists()
    # a patch of those edits: `apply` writes the model file alone, so it says what to make instead
    patch = tmp_path / "patch.safetensors"
    assert main([str(a) for a in args + encoders + ["--format", "patch", "--out", patch]]) == 0
    capsys.readouterr()
    assert main([str(a) for a in ["apply", separate["model"], patch, "--out", tmp_path / "whole.safetensors"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: patch: the patch edits {ENCODER_PREFIXES['t5xxl']}") and "`apply` writes the " \
        "model file alone" in err and "erase again with --format lora, a LoRA that ComfyUI's LoRA loader" in err, err
    assert not (tmp_path / "whole.safetensors").exists()


def assert_comfyui_maps_the_text_encoder_modules(lora_path, paths):
    """comfy/lora.py (model_lora_keys_clip, load_lora) finds a weight of Flux's CLIP-L and T5 for every text-encoder
    module of the LoRA, and applies the erasure's change to it (the model file holds only txt_in's)."""
    from tests.comfy_host import import_comfy, release_comfy_path

    import_comfy()
    try:
        import comfy.lora
    finally:
        release_comfy_path()
    weights = {f"{slot}.transformer.{k}": v.float() for slot in ("clip_l", "t5xxl")
               for k, v in load_file(str(paths[slot])).items()}

    class HostClip(torch.nn.Module):  # what model_lora_keys_clip reads: the CLIP's state dict names
        def state_dict(self):
            return weights

    lora = load_file(str(lora_path))
    modules = {k.split(".")[0] for k in lora if not k.startswith("lora_unet_")}
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_clip(HostClip(), {}), log_missing=False)
    assert len(patches) == len(modules) == 2 * 3 + 3 * 3  # T5's 2 blocks and CLIP-L's 3, q/k/v each
    key = "t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.v.weight"
    applied = patches[key].calculate_weight(weights[key].clone(), key, 1.0, 1.0, None, lambda w: w)
    name = "lora_te2_encoder_block_1_layer_0_SelfAttention_v"
    up, down = lora[name + ".lora_up.weight"].float(), lora[name + ".lora_down.weight"].float()
    torch.testing.assert_close(applied, weights[key] + up @ down, rtol=1e-4, atol=1e-5)
