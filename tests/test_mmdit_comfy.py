"""Flux's and SD3's text features and pooled vectors against ComfyUI's own code (comfy/text_encoders/flux.py,
sd3_clip.py, t5.py, sd1_clip.py), on the tiny seeded encoders of `tiny_mmdit_parts`, tokenized with ComfyUI's
own tokenizers (its T5 tokenizer.json is the one the solver is pointed to).

ComfyUI's encoder classes build real-size models from fixed configs, so their members are rebuilt here with the
arguments those classes pass (FluxClipModel, T5XXLModel, SD3ClipModel, SDXLClipG) but tiny configs; the
assembly of the cond (`encode_token_weights`) is ComfyUI's. SD3's last step, concatenating the CLIP tokens
(zero-padded to a hard-coded 4096) with T5's, needs a 4096-wide T5, so the two halves are compared apart."""

import pytest
import torch
from safetensors.torch import load_file

from concept_eraser.checkpoint import CheckpointModel
from concept_eraser.tiny import TINY_T5, tiny_mmdit_files
from concept_eraser.tokenizer import use_t5_tokenizer
from tests.comfy_host import comfy_root, import_comfy, release_comfy_path

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("a photo of a cat", "Van Gogh's Starry Night, oil on canvas", "")
T5_CONFIG = {"d_ff": TINY_T5["mlp"], "d_kv": TINY_T5["head_width"], "d_model": TINY_T5["width"],
             "num_heads": TINY_T5["heads"], "num_layers": TINY_T5["layers"], "vocab_size": 32128,
             "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}


def clip_config(tensors, act):
    width = tensors["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = sum(k.endswith("mlp.fc1.weight") for k in tensors)
    return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": width // 64,
            "intermediate_size": tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], "hidden_act": act,
            "max_position_embeddings": 77, "eos_token_id": 49407, "vocab_size": 49408, "projection_dim": width}


@pytest.fixture(scope="module")
def comfy():
    import_comfy()
    try:
        import comfy.sd1_clip
        import comfy.text_encoders.flux
        import comfy.text_encoders.sd3_clip
        import comfy.text_encoders.t5
    finally:
        release_comfy_path()
    use_t5_tokenizer(comfy_root() / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json")
    return comfy


def tiny(comfy, tensors, **kwargs):
    """ComfyUI's SDClipModel with `kwargs` as its caller passes them, holding `tensors`, in float32."""
    model = comfy.sd1_clip.SDClipModel(dtype=torch.float32, **kwargs)
    missing, _ = model.load_sd({k: v.float() for k, v in tensors.items()})
    assert [m for m in missing if "text_projection" not in m] == [], missing
    return model


def t5(comfy, parts):  # T5XXLModel's arguments (comfy/text_encoders/sd3_clip.py)
    return tiny(comfy, parts["t5xxl"], layer="last", textmodel_json_config=T5_CONFIG,
                model_class=comfy.text_encoders.t5.T5, special_tokens={"end": 1, "pad": 0},
                enable_attention_masks=False, return_attention_masks=False)


def ours(family, folder):
    paths = tiny_mmdit_files(folder, family, "separate")
    parts = {slot: load_file(str(p)) for slot, p in paths.items()}
    model = CheckpointModel(paths.pop("model"), text_encoders=paths)
    return parts, model.text_encoder.encode(PROMPTS)


def close(a, b):
    return (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_flux_t5_tokens_features_and_clip_l_pooled_match_comfyui(comfy, tmp_path):
    parts, encoded = ours("flux_dev", tmp_path)
    flux = comfy.text_encoders.flux
    host = flux.FluxClipModel.__new__(flux.FluxClipModel)  # FluxClipModel's members, tiny
    torch.nn.Module.__init__(host)
    host.clip_l = tiny(comfy, parts["clip_l"], return_projected_pooled=False,
                       textmodel_json_config=clip_config(parts["clip_l"], "quick_gelu"))
    host.t5xxl = t5(comfy, parts)
    tokenizer = flux.FluxTokenizer()
    for i, prompt in enumerate(PROMPTS):
        tokens = tokenizer.tokenize_with_weights(prompt)
        ids = [t for t, _w in tokens["t5xxl"][0]]
        assert len(ids) == 256 and ids[:encoded.lengths[i]][-1] == 1 and set(ids[encoded.lengths[i]:]) == {0}
        features, pooled = host.encode_token_weights(tokens)
        assert features.shape == (1, 256, TINY_T5["width"]) and close(encoded.features[i], features[0]), prompt
        assert close(encoded.pooled[i], pooled[0]), prompt
        if i == 0:  # control: T5 attends over its padding, so a 77-token window gives other features
            short = tokenizer.tokenize_with_weights(prompt, tokenizer_options={"t5xxl_min_length": 77})
            assert not close(encoded.features[i, :77], host.encode_token_weights(short)[0][0])


def test_t5_token_ids_are_comfyuis(comfy):
    from concept_eraser.tokenizer import tokenize_t5

    tokenizer = comfy.text_encoders.sd3_clip.SD3Tokenizer()
    for prompt in PROMPTS + ("(emphasis:1.2) is kept as text by us, weighted by ComfyUI",):
        theirs = [t for t, _w in tokenizer.tokenize_with_weights(prompt, disable_weights=True)["t5xxl"][0]]
        assert list(tokenize_t5(prompt, 77).ids) == theirs, prompt


def test_sd3_cond_and_pooled_match_comfyui(comfy, tmp_path):
    parts, encoded = ours("sd3", tmp_path)
    sd3 = comfy.text_encoders.sd3_clip
    host = sd3.SD3ClipModel(clip_l=False, clip_g=False, t5=False, dtype=torch.float32)
    host.clip_l = tiny(comfy, parts["clip_l"], layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                       return_projected_pooled=False, textmodel_json_config=clip_config(parts["clip_l"], "quick_gelu"))
    host.clip_g = tiny(comfy, parts["clip_g"], layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                       return_projected_pooled=True, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                       textmodel_json_config=clip_config(parts["clip_g"], "gelu"))  # SDXLClipG's arguments
    t5_host = t5(comfy, parts)
    tokenizer = sd3.SD3Tokenizer()
    width = encoded.features.shape[-1]
    for i, prompt in enumerate(PROMPTS):
        tokens = tokenizer.tokenize_with_weights(prompt)
        clip_cond, pooled, _ = host.encode_token_weights(tokens)  # t5xxl None: the CLIP half, padded to 4096
        assert clip_cond.shape == (1, 77, 4096) and clip_cond[0, :, width:].abs().max() == 0
        assert close(encoded.features[i, :77], clip_cond[0, :, :width]), prompt
        assert close(encoded.pooled[i], pooled[0]), prompt
        t5_cond = t5_host.encode_token_weights(tokens["t5xxl"])[0]
        assert t5_cond.shape == (1, 77, width) and close(encoded.features[i, 77:], t5_cond[0]), prompt
