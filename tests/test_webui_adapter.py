"""The WebUI adapter without a WebUI: key mapping, text features, in-place erase / restore, stacking,
interruption, LoRA-extension backups, checkpoint switches, preview, save (fake host objects:
tests/test_webui_support.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_webui_support import (
    apply_fake_lora,
    checkpoint_info,
    fake_forge,
    install_fake_webui,
    load_fake_a1111,
    tiny_sd1_file,
    trainable_sd1_file,
)

from concept_eraser.checkpoint import CheckpointModel, load_patch
from concept_eraser.encoding import CheckpointTextEncoder
from concept_eraser.errors import Cancelled, InvalidParameterError
from concept_eraser.models.arch import UNET_PREFIX
from concept_eraser.patch import DeltaEdit, ErasurePatch
from concept_eraser.safetensors_io import SafetensorsReader
from concept_eraser.tiny import tiny_state_dict
from concept_eraser_webui.host import FORGE_STALE_LORA_HASH, A1111Model, ForgeModel, Host, detect_host
from concept_eraser_webui.inputs import RequestError, SaveRequest, parse_erase
from concept_eraser_webui.live import LiveTensors, a1111_key, digest, forge_text_slots
from concept_eraser_webui.service import Service
from concept_eraser_webui.session import ErasureSession

K0 = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
REQUEST = {"method": "uce", "erase": "van gogh", "preserve": ["monet"]}


@pytest.fixture
def webui(monkeypatch, tmp_path):
    return install_fake_webui(monkeypatch, tmp_path)


@pytest.fixture
def a1111(webui):
    path, state = tiny_sd1_file(webui.ckpt_dir)
    model = load_fake_a1111(webui, path, state)
    service = Service(Host("a1111"))
    return webui, service, model, path, state


def snapshot(live) -> dict[str, str]:
    return {k: digest(live.tensors.read(k)) for k in live.tensors.keys()}


# ---- names and features ---------------------------------------------------------------------------

def test_host_detection_is_one_function(monkeypatch, tmp_path):
    assert detect_host() == "a1111"
    install_fake_webui(monkeypatch, tmp_path, forge=True)
    assert detect_host() == "forge"


def test_a1111_live_keys_are_the_checkpoint_keys(a1111):
    webui, _service, model, path, state = a1111
    live = A1111Model(model)
    assert a1111_key("cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight") == \
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    expected = {k for k in state if k.startswith((UNET_PREFIX, "cond_stage_model.")) and not k.endswith("position_ids")}
    assert set(live.tensors.keys()) == expected
    for key in expected:  # same values (the fake's text encoder is fp32, the file fp16)
        assert torch.equal(live.tensors.read(key).to(state[key].dtype), state[key]), key
    arch = live.editable(()).arch
    assert arch.family == "sd1" and arch.map_keys() == CheckpointModel(path).arch.map_keys()


def test_host_text_features_equal_the_solvers_own_encoder(a1111):
    webui, _service, model, path, _state = a1111
    prompts = ["van gogh", "", "a photo of a cat, oil painting by monet"]
    host = A1111Model(model).editable(()).text_encoder.encode(prompts)
    own = CheckpointTextEncoder(*_checkpoint_encoder_args(path)).encode(prompts)
    assert host.lengths == own.lengths
    torch.testing.assert_close(host.features, own.features, rtol=0, atol=1e-6)
    webui.opts.CLIP_stop_at_last_layers = 2  # clip skip: the arch follows the host's setting
    editable = A1111Model(model).editable(())
    assert (editable.arch.encoders[0].hidden_layer, editable.arch.encoders[0].final_norm) == (-2, True)


def _checkpoint_encoder_args(path):
    m = CheckpointModel(path)
    return m.arch, m.reader.keys(), m.reader.get


def test_forge_sdxl_text_slots_map_fused_and_transposed_tensors(monkeypatch, tmp_path):
    install_fake_webui(monkeypatch, tmp_path, forge=True)
    state = tiny_state_dict("sdxl", seed=3, dtype=torch.float32)
    obj = fake_forge(state, "sdxl", checkpoint_info(tmp_path / "x.safetensors", "ab" * 32))
    live = ForgeModel(obj)
    text_keys = {k for k in state if k.startswith("conditioner.") and not k.endswith("logit_scale")}
    assert text_keys <= set(live.tensors.keys())
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert len(live.tensors.slots[fused].parts) == 3
    assert live.tensors.slots["conditioner.embedders.1.model.text_projection"].transpose
    for key in text_keys:
        assert torch.equal(live.tensors.read(key), state[key]), key
    new = torch.randn_like(state[fused])
    live.tensors.write(fused, new)  # inference-mode parameters, written in place
    assert torch.equal(live.tensors.read(fused), new)
    arch = live.editable(()).arch
    assert arch.family == "sdxl"
    assert [(e.hidden_layer, e.final_norm) for e in arch.encoders] == [(-2, False), (-2, False)]


def test_forge_sdxl_features_and_pooled_match_the_solver(monkeypatch, tmp_path):
    install_fake_webui(monkeypatch, tmp_path, forge=True)
    state = tiny_state_dict("sdxl", seed=4, dtype=torch.float32)
    obj = fake_forge(state, "sdxl", checkpoint_info(tmp_path / "x.safetensors"))
    prompts = ["a red fox", ""]
    host = ForgeModel(obj).editable(()).text_encoder.encode(prompts)
    arch = ForgeModel(obj).editable(()).arch
    own = CheckpointTextEncoder(arch, list(state), lambda k: state[k]).encode(prompts)
    torch.testing.assert_close(host.features, own.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(host.pooled, own.pooled, rtol=0, atol=1e-5)


def test_forge_text_slots_ignore_foreign_names():
    slots = forge_text_slots("sd1", [("clip_l.logit_scale", torch.zeros(())), ("other.x", torch.zeros(1)),
                                     ("clip_l.transformer.text_model.final_layer_norm.weight", torch.zeros(4))])
    assert list(slots) == ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]


# ---- erase / restore -------------------------------------------------------------------------------

def test_erase_changes_kv_in_place_and_restore_is_bit_identical(a1111):
    webui, service, model, _path, _state = a1111
    live = A1111Model(model)
    before = snapshot(live)
    k0 = model.model.diffusion_model.get_parameter(K0[len(UNET_PREFIX):])
    result = service.erase(parse_erase(REQUEST))
    assert model.model.diffusion_model.get_parameter(K0[len(UNET_PREFIX):]) is k0  # same parameter, edited in place
    after = snapshot(live)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == set(live.editable(()).arch.map_keys()) == set(service.session.backups)
    assert k0.dtype == torch.float16
    assert result["status"]["erasures"][0]["erase"] == ["van gogh"]
    assert "1 erasure(s) active on tiny-sd1.safetensors" in result["status"]["text"]
    assert ("begin", "Concept Eraser: erase") in webui.state.history and webui.state.job == ""
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]  # stale conditionings dropped
    assert service.restore()["restored_tensors"] == len(changed)
    assert snapshot(live) == before
    assert not service.session.active and "No erasure active" in service.status()["text"]


def test_a_text_encoder_edit_refreshes_a1111s_cached_empty_prompt(a1111):
    """A1111 encodes the empty prompt once at load (`cond_stage_model_empty_prompt`, used to pad prompt and
    negative prompt to one length): an ErasePro edit of the text encoder must not leave it stale."""
    webui, service, model, _path, _state = a1111
    loaded = model.cond_stage_model_empty_prompt.clone()
    service.erase(parse_erase({"method": "erasepro", "erase": "van gogh", "params": {"token_policy": "first_k"}}))
    with torch.no_grad():
        fresh = webui.sd_models.get_empty_cond(model)
    assert not torch.equal(fresh, loaded)  # the edit reaches the empty prompt
    assert torch.equal(model.cond_stage_model_empty_prompt, fresh)
    service.restore()
    assert torch.equal(model.cond_stage_model_empty_prompt, loaded)


def test_erasures_stack_and_are_recorded(a1111):
    _webui, service, model, path, _state = a1111
    live = A1111Model(model)
    original = snapshot(live)
    service.erase(parse_erase(REQUEST))
    once = snapshot(live)
    service.erase(parse_erase({"method": "uce", "erase": "picasso", "params": {"lam": 0.3}}))
    twice = snapshot(live)
    session = service.session
    assert [r.concepts["erase"] for r in session.records] == [["van gogh"], ["picasso"]]
    assert session.records[1].params["lam"] == 0.3
    assert once != twice != original
    # the second solve saw the erased weights: its provenance lists the first erasure as prior
    assert len(session.patch.steps) == 2 and session.patch.steps[0]["concepts"]["erase"] == ["van gogh"]
    # the composed patch reproduces the live weights from the file's (fp16 on both sides)
    reader = SafetensorsReader(path)
    for key in session.patch.edits:
        assert torch.equal(session.patch.apply_to(key, reader.get(key)), live.tensors.read(key)), key
    status = service.status()
    assert len(status["erasures"]) == 2 and "2 erasure(s)" in status["text"]
    service.restore()
    assert snapshot(live) == original


def test_interrupt_during_the_solve_leaves_the_model_as_it_was(a1111):
    webui, service, model, _path, _state = a1111
    live = A1111Model(model)
    before = snapshot(live)
    webui.state.begin = lambda job="": None  # keep the flag set when the job starts
    webui.state.interrupted = True
    with pytest.raises(Cancelled):
        service.erase(parse_erase(REQUEST))
    assert snapshot(live) == before and not service.session.active


def test_a_failed_erase_leaves_no_progress_text_behind(a1111, monkeypatch):
    webui, service, model, _path, _state = a1111

    def failing(_model, _method, _concepts, _params, progress):
        progress(0, 10, "KPOP: preparing")
        assert webui.state.textinfo == "Concept Eraser: KPOP: preparing"
        raise AttributeError("a solver bug")

    monkeypatch.setattr("concept_eraser_webui.session.solve", failing)
    with pytest.raises(AttributeError):
        service.erase(parse_erase(REQUEST))
    assert webui.state.textinfo is None and webui.state.job == ""


def test_interrupt_after_the_solve_writes_nothing(a1111):
    _webui, _service, model, _path, _state = a1111
    live = A1111Model(model)
    before = snapshot(live)
    session = ErasureSession()
    request = parse_erase(REQUEST)
    with pytest.raises(Cancelled):
        session.erase(live, request.method, request.concepts, request.params, lambda *a: None, lambda: True)
    assert snapshot(live) == before and not session.active


def test_a_failed_write_rolls_back_every_tensor(a1111, monkeypatch):
    _webui, _service, model, _path, _state = a1111
    live = A1111Model(model)
    session = ErasureSession()
    request = parse_erase(REQUEST)
    session.erase(live, request.method, request.concepts, request.params, lambda *a: None)
    erased = snapshot(live)
    calls = {"n": 0}
    real_write = LiveTensors.write

    def flaky(self, key, value):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("device lost")
        real_write(self, key, value)

    monkeypatch.setattr(LiveTensors, "write", flaky)
    request = parse_erase({"erase": "picasso"})
    with pytest.raises(RuntimeError):
        session.erase(live, request.method, request.concepts, request.params, lambda *a: None)
    monkeypatch.setattr(LiveTensors, "write", real_write)
    assert snapshot(live) == erased and len(session.records) == 1


# ---- the LoRA extension's backups ---------------------------------------------------------------------

def test_lora_backups_neither_undo_nor_get_baked_into_an_erasure(a1111):
    _webui, service, model, _path, _state = a1111
    live = A1111Model(model)
    original = live.tensors.read(K0)
    module = live.tensors.modules(K0)[0]
    lora = torch.full_like(original, 0.01)
    apply_fake_lora(module, lora)  # a LoRA is active: weight = W + L, backup = W
    service.erase(parse_erase(REQUEST))
    erased = live.tensors.read(K0)
    # the solve saw W (not W + L), the cache is reset, so the extension backs up the erased weight next
    assert module.network_weights_backup is None and module.network_current_names == ()
    assert torch.equal(service.session.backups[K0], original)
    apply_fake_lora(module, lora)  # next generation with the LoRA
    assert torch.equal(module.network_weights_backup, erased)
    service.restore()
    assert torch.equal(live.tensors.read(K0), original)  # not W + L: the LoRA is not baked in
    assert module.network_weights_backup is None


def test_forge_lora_loader_backups_are_put_back_before_editing(monkeypatch, tmp_path):
    webui = install_fake_webui(monkeypatch, tmp_path, forge=True)
    path, state = tiny_sd1_file(webui.ckpt_dir)
    obj = fake_forge(state, "sd1", checkpoint_info(path, "cd" * 32))
    webui.sd_models.model_data.sd_model = obj
    service = Service(Host("forge"))
    live = ForgeModel(obj)
    original = live.tensors.read(K0)
    obj.forge_objects_original.unet.model.lora_loader.merge("diffusion_model." + K0[len(UNET_PREFIX):],
                                                            torch.full(original.shape, 0.5))
    service.erase(parse_erase(REQUEST))
    assert torch.equal(service.session.backups[K0], original)
    assert obj.current_lora_hash == FORGE_STALE_LORA_HASH and "unload_all_models" in webui.memory_management.events
    assert service.restore()["restored_tensors"] > 0
    assert torch.equal(live.tensors.read(K0), original)


# ---- checkpoint switches -----------------------------------------------------------------------------

def test_weights_reloaded_into_the_same_object_drop_the_state_without_writing(a1111):
    webui, service, model, _path, _state = a1111
    service.erase(parse_erase(REQUEST))
    other_path, other_state = tiny_sd1_file(webui.ckpt_dir, "other.safetensors", seed=7)
    live = A1111Model(model)
    for key in live.tensors.keys():  # A1111 reuses the object: load_state_dict of the other file
        live.tensors.write(key, other_state[key])
    model.sd_checkpoint_info = checkpoint_info(other_path, "ef" * 32)
    reloaded = snapshot(live)
    status = service.status()
    assert status["erasures"] == [] and "dropped" in status["notice"]
    assert service.restore()["restored_tensors"] == 0
    assert snapshot(live) == reloaded


def test_model_loaded_callback_for_our_object_drops_the_state(a1111):
    _webui, service, model, _path, state = a1111
    service.erase(parse_erase(REQUEST))
    live = A1111Model(model)
    for key in live.tensors.keys():  # forced reload of the same checkpoint
        live.tensors.write(key, state[key])
    reloaded = snapshot(live)
    service.on_model_loaded(model)
    assert not service.session.active and snapshot(live) == reloaded


def test_a_vae_reload_keeps_the_erasure(a1111):
    """A1111's sd_vae.reload_vae_weights (the SD VAE setting, txt2img's override_settings) ends with the
    model-loaded callback for the same object, its U-Net and text encoder untouched: still erased."""
    _webui, service, model, _path, _state = a1111
    live = A1111Model(model)
    original = snapshot(live)
    service.erase(parse_erase(REQUEST))
    erased = snapshot(live)
    service.on_model_loaded(model)
    status = service.status()
    assert len(status["erasures"]) == 1 and "notice" not in status and snapshot(live) == erased
    assert service.restore()["restored_tensors"] > 0 and snapshot(live) == original


def test_a_checkpoint_switch_says_the_erasures_were_dropped_in_the_status_and_the_log(a1111, caplog):
    """A1111 loads another checkpoint into the same object, then calls on_model_loaded: the erasures are gone
    with the old weights. The status (route and tab) says so until the next erasure; so does the console, as
    a warning (the WebUI does not configure logging: Python then prints warnings and above, never info)."""
    from concept_eraser_webui.ui import Tab

    webui, service, model, _path, _state = a1111
    service.erase(parse_erase(REQUEST))
    other_path, other_state = tiny_sd1_file(webui.ckpt_dir, "other.safetensors", seed=7)
    live = A1111Model(model)
    for key in live.tensors.keys():
        live.tensors.write(key, other_state[key])
    model.sd_checkpoint_info = checkpoint_info(other_path, "ef" * 32)
    with caplog.at_level(logging.WARNING, logger="concept_eraser"):
        service.on_model_loaded(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tiny-sd1.safetensors" in warnings[0] and "dropped" in warnings[0]
    for _ in range(2):  # not only the first time the status is read
        status = service.status()
        assert status["erasures"] == [] and status["notice"] == warnings[0].removeprefix("concept_eraser: ")
        line = Tab(service).status_line()
        assert line.startswith("No erasure active on other.safetensors") and "erasures dropped" in line
    service.erase(parse_erase(REQUEST))
    assert "notice" not in service.status()


def test_switching_to_another_model_object_restores_the_erased_one_in_memory(a1111):
    webui, service, model_a, _path, _state = a1111
    live_a = A1111Model(model_a)
    original = snapshot(live_a)
    service.erase(parse_erase(REQUEST))
    other_path, other_state = tiny_sd1_file(webui.ckpt_dir, "other.safetensors", seed=7)
    model_b = load_fake_a1111(webui, other_path, other_state)  # A stays in memory (checkpoints limit > 1)
    service.on_model_loaded(model_b)
    assert not service.session.active
    assert snapshot(live_a) == original  # switching back to A gives the file's weights


def test_lazy_check_also_restores_an_object_swapped_out_without_callback(a1111):
    webui, service, model_a, _path, _state = a1111
    live_a = A1111Model(model_a)
    original = snapshot(live_a)
    service.erase(parse_erase(REQUEST))
    other_path, other_state = tiny_sd1_file(webui.ckpt_dir, "other.safetensors", seed=7)
    load_fake_a1111(webui, other_path, other_state)  # A1111 switches to an already loaded model: no callback
    status = service.status()
    assert status["erasures"] == [] and "restored" in status["notice"]
    assert snapshot(live_a) == original


def test_restore_is_refused_into_weights_it_does_not_belong_to(a1111):
    webui, service, model_a, _path, _state = a1111
    service.erase(parse_erase(REQUEST))
    live_a = A1111Model(model_a)
    live_a.tensors.write(K0, torch.zeros_like(live_a.tensors.read(K0)))  # someone else changed A meanwhile
    changed = snapshot(live_a)
    other_path, other_state = tiny_sd1_file(webui.ckpt_dir, "other.safetensors", seed=7)
    service.on_model_loaded(load_fake_a1111(webui, other_path, other_state))
    assert snapshot(live_a) == changed and not service.session.active


# ---- preview -----------------------------------------------------------------------------------------

def test_preview_renders_original_and_erased_with_the_same_seed(a1111):
    webui, service, model, _path, _state = a1111
    with pytest.raises(RequestError) as info:
        service.preview(["a cat"], {})
    assert info.value.field == "preview"
    service.erase(parse_erase(REQUEST))
    erased = snapshot(A1111Model(model))
    gallery, seed = service.preview(["a cat", "van gogh"], {"seed": 42, "steps": 3, "txt2img_ignored": 1})
    assert seed == 42 and len(gallery) == 4
    assert [caption.split(" · ")[0] for _image, caption in gallery] == ["original", "erased"] * 2
    assert all("seed 42" in caption for _image, caption in gallery)
    assert gallery[0][0].tobytes() != gallery[1][0].tobytes()  # the erased model renders differently
    calls = webui.processing.calls
    assert {p.seed for p in calls} == {42} and {p.steps for p in calls} == {3} and all(p.closed for p in calls)
    assert snapshot(A1111Model(model)) == erased  # back to the erased weights after rendering the original


def test_an_interrupted_preview_leaves_the_erased_weights_in_place(a1111):
    webui, service, model, _path, _state = a1111
    service.erase(parse_erase(REQUEST))
    erased = snapshot(A1111Model(model))
    real = webui.processing.process_images

    def interrupting(p):
        webui.state.interrupted = True
        return real(p)

    webui.processing.process_images = interrupting
    with pytest.raises(Cancelled):
        service.preview(["a cat"], {"seed": 1})
    assert snapshot(A1111Model(model)) == erased and service.session.active


# ---- save --------------------------------------------------------------------------------------------

def test_save_checkpoint_writes_the_patched_file_into_the_checkpoint_folder(a1111):
    webui, service, model, path, _state = a1111
    path.with_suffix(".yaml").write_text("model: {}\n")
    with pytest.raises(RequestError) as info:
        service.save(SaveRequest("checkpoint", "erased", False))
    assert info.value.field == "format" and info.value.status == 409  # nothing erased yet
    service.erase(parse_erase(REQUEST))
    result = service.save(SaveRequest("checkpoint", "erased", False))
    out = webui.ckpt_dir / "erased.safetensors"
    assert result["path"] == str(out) and out.with_suffix(".yaml").read_text() == "model: {}\n"
    assert result["title"].startswith("erased.safetensors") and webui.sd_models.listed  # the list was refreshed
    saved, source = SafetensorsReader(out), SafetensorsReader(path)
    assert saved.keys() == source.keys()
    live = A1111Model(model)
    for key in saved.keys():
        changed = key in service.session.backups
        expected = live.tensors.read(key).to(source.get(key).dtype) if changed else source.get(key)
        assert torch.equal(saved.get(key), expected), key
    steps = json.loads(saved.metadata["concept_eraser.steps"])
    assert steps[0]["concepts"]["erase"] == ["van gogh"] and steps[0]["source"]["name"] == path.name
    assert saved.metadata["concept_eraser.host"] == "AUTOMATIC1111 WebUI"
    with pytest.raises(RequestError) as info:  # never overwrites silently
        service.save(SaveRequest("checkpoint", "erased", False))
    assert info.value.field == "name" and "Overwrite" in info.value.message
    service.save(SaveRequest("checkpoint", "erased", True))
    with pytest.raises(RequestError) as info:
        service.save(SaveRequest("checkpoint", path.stem, True))
    assert info.value.field == "name" and "own file" in info.value.message


def test_save_checkpoint_never_pairs_it_with_a_stale_config(a1111):
    """A1111 reads <name>.yaml beside a checkpoint as its config: one left there from another file must not
    become the new checkpoint's (here the loaded checkpoint has no config of its own)."""
    webui, service, _model, _path, _state = a1111
    service.erase(parse_erase(REQUEST))
    stale = webui.ckpt_dir / "erased.yaml"
    stale.write_text("model: {stale: true}\n")
    with pytest.raises(RequestError) as info:
        service.save(SaveRequest("checkpoint", "erased", False))
    assert (info.value.field, info.value.status) == ("name", 409) and "erased.yaml" in info.value.message
    assert not (webui.ckpt_dir / "erased.safetensors").exists() and stale.read_text() == "model: {stale: true}\n"
    service.save(SaveRequest("checkpoint", "erased", True))  # Overwrite replaces the pair
    assert (webui.ckpt_dir / "erased.safetensors").exists() and not stale.exists()


def test_save_patch_and_lora(a1111):
    webui, service, model, _path, _state = a1111
    service.erase(parse_erase(REQUEST))  # all 77 token columns: full-rank edits of these tiny matrices
    service.erase(parse_erase({**REQUEST, "erase": "picasso"}))  # two stacked erasures, composed
    patch = service.save(SaveRequest("patch", "p", False))
    loaded = load_patch(patch["path"])
    assert isinstance(loaded, ErasurePatch) and set(loaded.edits) == set(service.session.patch.edits)
    # changes from the original weights, as the command line and ComfyUI write them: applied to the original
    # weights they give the erased ones
    live = A1111Model(model)
    for key, stages in loaded.edits.items():
        assert [type(s) for s in stages] == [DeltaEdit], key
        original = service.session.backups[key]
        erased = live.tensors.read(key)
        assert torch.allclose(loaded.apply_to(key, original).to(erased.dtype), erased, atol=1e-6), key
    with pytest.raises(InvalidParameterError) as info:
        service.save(SaveRequest("lora", "dense", False))
    assert info.value.field == "format"
    service.restore()
    service.erase(parse_erase({**REQUEST, "params": {"token_policy": "last_word"}}))  # rank 2: a LoRA
    lora = service.save(SaveRequest("lora", "erase-van-gogh", False))
    assert lora["path"] == str(webui.lora_dir / "erase-van-gogh.safetensors")
    assert lora["prompt"] == "<lora:erase-van-gogh:1>"
    names = SafetensorsReader(lora["path"]).keys()
    assert any(n.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k") for n in names)


def test_kpop_trains_the_loaded_unet_in_place_and_restores(webui):
    path, state = trainable_sd1_file(webui.ckpt_dir)
    model = load_fake_a1111(webui, path, state)
    service = Service(Host("a1111"))
    before = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    params = {"steps": 2, "ddim_steps": 2, "prompt_size": 1, "resolution": 64, "lr": 1e-3}
    service.erase(parse_erase({"method": "kpop", "erase": "van gogh", "params": params}))
    after = model.model.diffusion_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2." in k for k in changed)  # xattn: only cross-attention was written
    saved = service.save(SaveRequest("learned_prompt", "van-gogh-prompt", False))
    assert SafetensorsReader(saved["path"]).metadata["concept_eraser.format"] == "learned_prompt"
    service.restore()
    assert all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items())


def test_kpop_trains_forges_weights_in_the_solvers_own_unet(monkeypatch, tmp_path):
    """Forge's U-Net modules add in place (autograd cannot go through them): KPOP trains Forge's live weights in
    the solver's LDM U-Net instead; the fake's U-Net is a bare parameter tree that could not run at all."""
    webui = install_fake_webui(monkeypatch, tmp_path, forge=True)
    path, state = trainable_sd1_file(webui.ckpt_dir)
    obj = fake_forge(state, "sd1", checkpoint_info(path, "cd" * 32))
    webui.sd_models.model_data.sd_model = obj
    service = Service(Host("forge"))
    unet = obj.forge_objects_original.unet.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = {"steps": 2, "ddim_steps": 2, "prompt_size": 1, "resolution": 64, "lr": 1e-3}
    service.erase(parse_erase({"method": "kpop", "erase": "van gogh", "params": params}))
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".attn2." in k for k in changed)
    service.restore()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
