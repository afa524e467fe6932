"""The solver's own CLIP code against transformers' (an independent implementation): the tokenizer id for id,
the text tower's features and pooled output in float32 (also when run only up to each prompt's EOS); only the
blocks whose outputs are read are built and loaded; each prompt is encoded once; the report's per-layer changes
are those of the saved weights."""

import pytest
import torch
from clip_reference import hf_text_model, hf_tokenizer, hf_transformer
from safetensors import safe_open

from concept_eraser import CheckpointModel, Concepts, erase
from concept_eraser.models.text_encoders import hf_state_dict
from concept_eraser.tokenizer import EOS_ID, clip_tokenizer, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of Van Gogh", "", "Claude  MONET's\tgarden, 1899!", "naïve café — À  l'été 😀",
           "it'll   be 3.14 we're they've I'm you'd", "日本語のテキスト and ÆØÅ"]


def test_the_tokenizer_gives_transformers_ids():
    for prompt in PROMPTS + ["x<|endoftext|>y <|startoftext|>"]:  # BOS/EOS in the text: matched whole
        assert clip_tokenizer().encode(prompt, add_special_tokens=False).ids == \
            hf_tokenizer()(prompt, add_special_tokens=False)["input_ids"], prompt


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_features_and_pooled_equal_transformers_forward(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    model = CheckpointModel(path)
    ours = model.text_encoder.encode(PROMPTS)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    contexts, pooled = [], None
    for spec in model.arch.encoders:
        reference = hf_text_model(spec, hf_state_dict(spec, list(tensors), tensors.__getitem__), torch.float32)
        ids = torch.tensor([tokenize(p, EOS_ID if spec.pad_token == "eos" else 0).ids for p in PROMPTS])
        with torch.no_grad():
            out = reference(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[spec.hidden_layer]
            contexts.append(hf_transformer(reference).final_layer_norm(hidden) if spec.final_norm else hidden)
        if spec.pooled:
            eos = (ids == EOS_ID).int().argmax(1)
            projection = tensors[spec.prefix + "text_projection"].float()
            pooled = out.last_hidden_state[torch.arange(len(PROMPTS)), eos] @ projection
    torch.testing.assert_close(ours.features, torch.cat(contexts, -1), rtol=1e-5, atol=1e-5)
    # the expansion's encoding runs only up to the longest prompt's EOS: the same features there
    short = model.text_encoder.encode_through_eos(PROMPTS)
    assert short.features.shape[1] == max(short.lengths) < ours.features.shape[1] and short.pooled is None
    for i, length in enumerate(short.lengths):
        torch.testing.assert_close(short.features[i, :length], torch.cat(contexts, -1)[i, :length], rtol=1e-5,
                                   atol=1e-5)
    if pooled is None:
        assert ours.pooled is None
    else:
        torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_only_the_blocks_read_are_built_and_loaded(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sdxl"])
    read = []
    weight = model.weight
    model.weight = lambda key: read.append(key) or weight(key)
    from concept_eraser.encoding import CheckpointTextEncoder

    encoder = CheckpointTextEncoder(model.arch, model.keys(), model.weight)
    clip_l, clip_g = model.arch.encoders
    # CLIP-L feeds its penultimate block's output: its last block is neither built nor read; bigG's last
    # block makes the pooled embedding, so it stays.
    assert [len(e.layers) for e in encoder.encoders] == [clip_l.layers - 1, clip_g.layers]
    last_l = f"{clip_l.prefix}encoder.layers.{clip_l.layers - 1}."
    assert not any(k.startswith(last_l) for k in read)
    assert any(k.startswith(f"{clip_g.prefix}transformer.resblocks.{clip_g.layers - 1}.") for k in read)


def test_the_encoder_reads_the_stored_weights_and_never_writes_them(tiny_checkpoints):
    """No float32 copy of the encoder: its tensors are the model's own (fp16 here), cast as each layer runs; an
    edit (ErasePro's `set_weight`) replaces the tensor held and leaves the model's untouched."""
    from concept_eraser.models.layerwise import LayerwiseEncoder

    model = CheckpointModel(tiny_checkpoints["sd1"])
    spec = model.arch.encoders[0]
    stored = {k: model.weight(k) for k in model.keys() if k.startswith(spec.prefix)}
    encoder = LayerwiseEncoder(spec, list(stored), stored.__getitem__)
    key = f"{spec.prefix}encoder.layers.0.self_attn.k_proj.weight"
    held = encoder.layers[0].self_attn.k_proj.weight
    assert held.dtype == torch.float16 and held.data_ptr() == stored[key].data_ptr()
    before = encoder.encode(["a cat"])[0]
    assert before.dtype == torch.float32
    original = stored[key].clone()
    encoder.set_weight(key, torch.zeros_like(stored[key], dtype=torch.float32))
    assert torch.equal(stored[key], original)
    assert not torch.equal(encoder.encode(["a cat"])[0], before)


def test_every_prompt_is_encoded_once_per_run(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    seen = []
    layerwise = model.text_encoder.encoders[0]
    encode = layerwise.encode
    layerwise.encode = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    erase(model, "rece", Concepts.build(["Van Gogh", "Claude Monet"], ["a painter"], ["a cat"]), {"epochs": 1})
    assert seen == [["Van Gogh", "Claude Monet", "a painter", "", "a cat"]]


def test_the_reported_layer_changes_are_those_of_the_written_weights(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sdxl"])
    result = erase(model, "uce", Concepts.build(["Van Gogh"]))
    for key, figures in result.report["layers"].items():
        original = model.weight(key).double()
        written = result.patch.apply_to(key, model.weight(key)).double()
        assert figures["relative_change"] == pytest.approx(float((written - original).norm() / original.norm()),
                                                           rel=1e-4)
