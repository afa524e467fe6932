"""Checkpoint / patch / LoRA files: round trips, provenance, composition, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from concept_eraser import CheckpointModel, Concepts, erase, load_patch, save_checkpoint, save_lora, save_patch
from concept_eraser.cli import main
from concept_eraser.errors import InvalidParameterError
from concept_eraser.patch import DenseEdit, ErasurePatch
from concept_eraser.safetensors_io import LazyTensor, file_sha256, write_safetensors

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def sd1_erasure(tiny_checkpoints):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    return model, erase(model, "uce", Concepts.build(["Van Gogh"], preserve=["Claude Monet"]),
                        {"token_policy": "last_word"})


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_checkpoint_metadata_records_provenance(sd1_erasure, tmp_path, tiny_checkpoints):
    model, result = sd1_erasure
    out = save_checkpoint(model, result.patch, tmp_path / "erased.safetensors")
    meta = metadata(out)
    steps = json.loads(meta["concept_eraser.steps"])
    assert len(steps) == 1 and steps[0]["method"] == "uce"
    assert steps[0]["concepts"]["erase"] == ["Van Gogh"]
    assert steps[0]["source"]["sha256"] == file_sha256(tiny_checkpoints["sd1"])
    assert steps[0]["params"]["lam"] == 0.5 and steps[0]["library"].startswith("concept_eraser ")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert "Van Gogh" in meta["modelspec.title"] and meta["concept_eraser.format"] == "checkpoint"


def test_patch_file_round_trip_applies_to_the_same_tensors(sd1_erasure, tmp_path):
    model, result = sd1_erasure
    path = save_patch(result.patch, tmp_path / "p.safetensors")
    assert path.stat().st_size < model.path.stat().st_size / 5  # only the changed tensors
    loaded = load_patch(path)
    assert loaded.steps == result.patch.steps and set(loaded.edits) == set(result.patch.edits)
    for key in result.patch.edits:
        original = model.weight(key)
        assert torch.equal(loaded.apply_to(key, original), result.patch.apply_to(key, original))


def test_a_patch_for_another_checkpoint_is_refused_unless_forced(sd1_erasure, tmp_path, capsys):
    """`apply` compares the source fingerprint the patch records with the model's: another checkpoint of the same
    architecture is refused, naming the patch's source, unless --force; the same file read again fits."""
    model, result = sd1_erasure
    other = tmp_path / "other.safetensors"
    from concept_eraser.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(other, "sd1", seed=7)
    patch = save_patch(result.patch, tmp_path / "p.safetensors")
    assert main(["apply", str(other), str(patch), "--out", str(tmp_path / "refused.safetensors")]) == 2
    message = capsys.readouterr().err
    assert f"made for another checkpoint, {model.path.name}" in message and "--force" in message, message
    assert not (tmp_path / "refused.safetensors").exists()
    assert main(["apply", str(other), str(patch), "--out", str(tmp_path / "forced.safetensors"), "--force"]) == 0
    assert main(["apply", str(model.path), str(patch), "--out", str(tmp_path / "same.safetensors")]) == 0


def test_a_patch_of_a_later_erasure_says_which_erasures_it_was_made_after(sd1_erasure, tmp_path, capsys):
    """Erasing again on an erased file records the earlier erasures; that step's patch alone does not fit the
    original checkpoint, and the refusal says why (the source's name alone would be the same file)."""
    model, _ = sd1_erasure
    first = tmp_path / "first.safetensors"
    assert main(["erase", str(model.path), "--erase", "Van Gogh", "--out", str(first)]) == 0
    second = tmp_path / "second.safetensors"
    assert main(["erase", str(first), "--erase", "a cat", "--format", "patch", "--out", str(second)]) == 0
    capsys.readouterr()
    assert main(["apply", str(model.path), str(second), "--out", str(tmp_path / "refused.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "made for another checkpoint, first.safetensors after 1 earlier erasure (uce: Van Gogh)" in message
    assert "connect that model with them applied" in message
    assert main(["apply", str(first), str(second), "--out", str(tmp_path / "fits.safetensors")]) == 0


def test_forced_dense_patch_is_a_change_not_a_replacement(sd1_erasure, tmp_path):
    """A dense edit is stored as its change to the weights it was solved on: forced onto another checkpoint it
    adds that change (W' + new − W), it does not copy the first model's weights."""
    model, result = sd1_erasure
    key = model.arch.map_keys()[0]
    source = model.weight(key)
    new = (source.float() * 0.5 + 0.01).to(source.dtype)
    dense = ErasurePatch("sd1", {key: (DenseEdit(new),)}, result.patch.steps)
    patch = save_patch(dense.relative(model.weight), tmp_path / "dense.safetensors")
    assert load_patch(patch).edits[key][0].kind == "delta"
    other = tmp_path / "other.safetensors"
    from concept_eraser.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(other, "sd1", seed=7)
    out = tmp_path / "forced.safetensors"
    assert main(["apply", str(other), str(patch), "--out", str(out), "--force"]) == 0
    theirs = CheckpointModel(other).weight(key)
    expected = (theirs.float() + (new.float() - source.float())).to(theirs.dtype)
    assert torch.equal(load_file(str(out))[key], expected)
    same = tmp_path / "same.safetensors"
    assert main(["apply", str(model.path), str(patch), "--out", str(same)]) == 0
    assert torch.equal(load_file(str(same))[key], new)  # on its own checkpoint: exactly the edited weights


def test_lora_file_reproduces_the_erasure_with_standard_key_names(sd1_erasure, tmp_path):
    model, result = sd1_erasure
    lora = load_file(str(save_lora(result.patch, tmp_path / "lora.safetensors")))
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"} <= set(lora)
    assert len(lora) == 3 * len(model.arch.map_keys())
    for key in model.arch.map_keys():
        stem = "lora_unet_" + key[len(UNET):-len(".weight")].replace(".", "_")
        up, down, alpha = lora[stem + ".lora_up.weight"], lora[stem + ".lora_down.weight"], lora[stem + ".alpha"]
        # How every LoRA loader applies it: W + (alpha / rank) · up @ down.
        applied = model.weight(key).float() + (alpha / down.shape[0]) * (up.float() @ down.float())
        torch.testing.assert_close(applied.half(), result.patch.apply_to(key, model.weight(key)), rtol=0, atol=1e-3)
    assert metadata(tmp_path / "lora.safetensors")["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_dense_results_cannot_be_a_lora(tiny_checkpoints, tmp_path):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    result = erase(model, "uce", Concepts.build(["Van Gogh"]))  # 76 columns > the tiny widths: dense
    with pytest.raises(InvalidParameterError, match="not low-rank"):
        save_lora(result.patch, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_erasing_an_erased_checkpoint_records_both_steps_and_patches_compose(sd1_erasure, tmp_path):
    model, first = sd1_erasure
    once = save_checkpoint(model, first.patch, tmp_path / "once.safetensors")
    model2 = CheckpointModel(once)
    second = erase(model2, "uce", Concepts.build(["a cat"]), {"token_policy": "last_word"})
    twice = save_checkpoint(model2, second.patch, tmp_path / "twice.safetensors")
    steps = json.loads(metadata(twice)["concept_eraser.steps"])
    assert [s["concepts"]["erase"] for s in steps] == [["Van Gogh"], ["a cat"]]
    assert steps[1]["source"]["sha256"] == file_sha256(once)
    composed = first.patch.then(second.patch)
    direct = load_file(str(twice))
    for key in model.arch.map_keys():
        torch.testing.assert_close(composed.apply_to(key, model.weight(key)), direct[key], rtol=0, atol=2e-3)


def test_writes_are_atomic_and_never_overwrite_silently(tmp_path):
    target = tmp_path / "out.safetensors"

    def boom():
        raise RuntimeError("stopped half way")

    with pytest.raises(RuntimeError):
        write_safetensors(target, {"a": torch.zeros(2), "b": LazyTensor(torch.float32, (2,), boom)})
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    write_safetensors(target, {"a": torch.zeros(2)})
    with pytest.raises(InvalidParameterError, match="already exists"):
        write_safetensors(target, {"a": torch.ones(2)})
    write_safetensors(target, {"a": torch.ones(2)}, overwrite=True)
    assert torch.equal(load_file(str(target))["a"], torch.ones(2))
    with pytest.raises(InvalidParameterError, match="does not exist"):
        write_safetensors(tmp_path / "missing" / "x.safetensors", {"a": torch.zeros(1)})
