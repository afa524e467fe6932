"""Architecture detection, refusals with clear messages, dtypes, and bit-identical untouched tensors."""

import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from concept_eraser import CheckpointModel, Concepts, erase, save_checkpoint
from concept_eraser.errors import UnsafeFileError, UnsupportedModelError
from concept_eraser.models import detect
from concept_eraser.safetensors_io import SafetensorsReader, write_safetensors
from concept_eraser.tiny import tiny_state_dict


@pytest.mark.parametrize("family,layers,context,widths,encoders", [
    ("sd1", 16, 64, {32, 64, 128}, ["clip_l"]),
    ("sd2", 16, 64, {32, 64, 128}, ["clip_h"]),
    ("sdxl", 70, 160, {64, 128}, ["clip_l", "clip_g"]),
])
def test_detects_each_family_and_lists_every_cross_attention_kv(tiny_checkpoints, family, layers, context, widths,
                                                                   encoders):
    model = CheckpointModel(tiny_checkpoints[family])
    arch = model.arch
    assert arch.family == family and arch.variant == "base"
    assert len(arch.map_keys()) == 2 * layers
    assert all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in arch.map_keys())
    expected = {k for k in model.reader.keys() if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert set(arch.map_keys()) == expected
    assert arch.context_dim == context
    assert {model.reader.infos[k].shape[0] for k in arch.map_keys()} == widths
    assert [e.name for e in arch.encoders] == encoders


def test_features_have_the_context_width_and_take_the_documented_layers(tiny_checkpoints):
    for family, width in (("sd1", 64), ("sd2", 64), ("sdxl", 160)):
        enc = CheckpointModel(tiny_checkpoints[family]).text_encoder.encode(["a cat", ""])
        assert enc.features.shape == (2, 77, width) and enc.features.dtype == torch.float32
    specs = {f: [(e.hidden_layer, e.final_norm) for e in CheckpointModel(p).arch.encoders]
             for f, p in tiny_checkpoints.items()}
    assert specs == {"sd1": [(-1, True)], "sd2": [(-2, True)], "sdxl": [(-2, False), (-2, False)]}


def test_a_long_prompt_is_truncated_with_a_warning(tiny_checkpoints):
    encoder = CheckpointModel(tiny_checkpoints["sd1"]).text_encoder
    with pytest.warns(UserWarning, match="only the first 75"):
        enc = encoder.encode(["word " * 100])
    assert enc.lengths == (77,)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd1_shapes():
    return shapes(tiny_state_dict("sd1"))


@pytest.mark.parametrize("extra,message", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 3)}, "Stable Diffusion 3"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (3, 3)}, "Flux"),
])
def test_other_families_are_refused_by_name(sd1_shapes, extra, message):
    with pytest.raises(UnsupportedModelError, match=message):
        detect({**sd1_shapes, **extra})


def test_refusals_name_what_was_found(sd1_shapes):
    with pytest.raises(UnsupportedModelError, match="a LoRA file"):
        detect({"lora_unet_input_blocks_1_1.lora_up.weight": (4, 2)})
    lora = {"lora_unet_input_blocks_1_1.lora_up.weight": (4, 2)}
    with pytest.raises(UnsupportedModelError, match="a Concept Eraser erasure LoRA, not a checkpoint: load it with a "
                                                    "LoRA loader"):
        detect(lora, {"concept_eraser.format": "lora"})
    with pytest.raises(UnsupportedModelError, match="a Concept Eraser patch, not a checkpoint: use `apply`"):
        detect(sd1_shapes, {"concept_eraser.format": "patch"})
    with pytest.raises(UnsupportedModelError, match="diffusers-layout"):
        detect({"down_blocks.0.attentions.0.proj_in.weight": (3, 3)})
    unet_only = {k: v for k, v in sd1_shapes.items() if k.startswith("model.")}
    with pytest.raises(UnsupportedModelError, match="no text encoder"):
        detect(unet_only)
    no_xattn = {k: v for k, v in sd1_shapes.items() if "attn2" not in k}
    with pytest.raises(UnsupportedModelError, match="no cross-attention"):
        detect(no_xattn)
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
               for k, v in shapes(tiny_state_dict("sdxl")).items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(UnsupportedModelError, match="SDXL refiner"):
        detect(refiner)
    wrong_width = dict(sd1_shapes)
    wrong_width["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 32)
    with pytest.raises(UnsupportedModelError, match="does not match"):
        detect(wrong_width)


def test_inpainting_variant_is_recognised(sd1_shapes):
    inpaint = dict(sd1_shapes)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = (32, 9, 3, 3)
    assert detect(inpaint).variant == "inpainting"


def test_pickle_and_non_safetensors_files_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, ckpt)
    with pytest.raises(UnsafeFileError, match="pickle.*safetensors"):
        CheckpointModel(ckpt)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(UnsafeFileError, match="pickle"):
        CheckpointModel(disguised)
    # the recipe the message gives converts each file (a disguised one renamed first, as the message says)
    for source, renamed in ((ckpt, None), (disguised, "disguised.ckpt")):
        with pytest.raises(UnsafeFileError) as refused:
            CheckpointModel(source)
        message = str(refused.value)
        assert (f"Rename it to {renamed}, then convert it" in message) == bool(renamed)
        if renamed:
            source.rename(tmp_path / renamed)
        subprocess.run([sys.executable, "-c", message.split('python -c "', 1)[1].rstrip('"')], cwd=tmp_path,
                       check=True)
        assert load_file(str(source.with_suffix(".safetensors"))).keys() == {"a"}
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(UnsafeFileError, match="not a safetensors file"):
        CheckpointModel(garbage)


@pytest.mark.parametrize("header_length", [0x80 + 0x100, 0x4B50])  # first bytes 0x80 / "PK"
def test_safetensors_whose_header_length_looks_like_a_pickle_signature_are_read(tmp_path, header_length):
    path = tmp_path / "odd.safetensors"
    filler = 0
    for _ in range(10):
        write_safetensors(path, {"a": torch.zeros(2)}, {"filler": "x" * filler}, overwrite=True)
        got = int.from_bytes(path.read_bytes()[:8], "little")
        if got == header_length:
            break
        filler += header_length - got
    assert got == header_length
    assert SafetensorsReader(path).keys() == ["a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_dtype_is_solved_written_back_and_untouched_tensors_stay_bit_identical(tmp_path, dtype):
    sd = tiny_state_dict("sd1", seed=3, dtype=dtype)
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src), metadata={"modelspec.title": "source"})
    model = CheckpointModel(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = erase(model, "uce", Concepts.build(["Van Gogh"]))
    out = save_checkpoint(model, result.patch, tmp_path / "out.safetensors")
    written = load_file(str(out))
    assert set(written) == set(sd)
    for key, tensor in sd.items():
        assert written[key].dtype == tensor.dtype and written[key].shape == tensor.shape
        if key in result.patch.edits:
            assert not torch.equal(written[key], tensor)
            assert torch.equal(written[key], result.patch.apply_to(key, tensor))
        else:
            assert torch.equal(written[key], tensor), key  # includes int64 position_ids
