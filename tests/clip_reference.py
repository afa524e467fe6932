"""Independent references for the solver's own CLIP code: transformers' `CLIPTokenizer` and `CLIPTextModel`
over the same vocabulary and weights (the solver itself uses neither: their imports cost seconds)."""

import functools
import json
import tempfile
from pathlib import Path

import torch

from concept_eraser.models.arch import EncoderSpec
from concept_eraser.tokenizer import clip_vocabulary


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    """transformers' CLIPTokenizer over the vocabulary the solver uses (from files: every version reads them)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                              encoding="utf-8")
        return CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")))


def hf_text_model(spec: EncoderSpec, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64):
    """A transformers `CLIPTextModel` holding `state` (transformers names, as `hf_state_dict` gives them)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, width = state["embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=spec.layers, num_attention_heads=width // 64,
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if spec.layout == "hf" else "gelu", layer_norm_eps=1e-5, projection_dim=width,
        **({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1} if spec.tokenizer == "word" else {}),
    )
    model = CLIPTextModel(config).to(dtype)
    missing, _ = hf_transformer(model).load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    assert not [m for m in missing if not m.endswith("position_ids")], missing
    return model.eval().requires_grad_(False)


def hf_transformer(model):
    """The module holding embeddings/encoder/final_layer_norm (transformers 4.x nests it in `text_model`)."""
    return getattr(model, "text_model", model)
