"""Flux.1 and SD3.5 in ComfyUI: the pack's nodes on a MODEL and CLIP made by the host's own loaders, called as its
executor calls them (under torch.inference_mode()).

The files are the ones users have, tiny (`comfy_checkpoints.make_mmdit_files`): diffusion models with bare BFL /
SAI names read by ComfyUI's UNETLoader node, CLIP-L, CLIP-G and T5-XXL as files of their own read by
`comfy.sd.load_clip` (what DualCLIPLoader type flux and TripleCLIPLoader run) with the host's model options that
shrink its text encoders, Flux's VAE read by VAELoader. Checked: the features the erasure is solved with are the
host's own encoding, cut into the family's segments, and equal an independent encoder (the command line's
transformers-built T5 and CLIP towers on the same files); the Erase node patches clones of the entry projections
(Flux UCE: txt_in, vector_in) and the erased projections send the target where the guide goes; ErasePro (SD3) edits
the host's CLIP-L, CLIP-G and T5 on a clone, after which the host's own encoding of the target is sent where the
guide's was; Preview Erasure renders with the host's sampler and Erasure Report reports; the erasure saved as a
LoRA is applied by the host's own LoraLoader node to exactly the erased weights, as a patch by Apply Erasure Patch,
as a checkpoint that ComfyUI's checkpoint loader reads back with the erased weights; the Flux and SD3.5 example
workflows pass ComfyUI's own prompt validation; a CLIP of the wrong kind, a transformer we do not know and a lone
transformer given to Load Checkpoint are refused with a message naming what was found and what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_host import REPO, baked, comfy_root, host_session, mmdit_files, node, pack_module, snapshot
from comfy_workflows import examples, to_api

pytestmark = pytest.mark.host

UNET = "model.diffusion_model."
PROMPTS = ("Van Gogh", "a painting of a starry night by Vincent van Gogh", "Claude Monet", "")
# model folders the tests fill: ComfyUI's loaders pick the files from there
FOLDERS = {"diffusion_models": ("flux1-dev.safetensors", "sd3.5_large.safetensors"),
           "text_encoders": ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"),
           "vae": ("ae.safetensors",), "checkpoints": (), "erasures": (), "loras": ()}
ENCODERS = {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl")}
MODEL_FILES = {"flux": "flux1-dev.safetensors", "sd3": "sd3.5_large.safetensors"}
ENCODER_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_mmdit")
    for session in host_session(base, tuple(FOLDERS)):
        files = mmdit_files()  # made with ComfyUI's classes, imported now
        for folder, names in FOLDERS.items():
            for name in names:
                (base / folder / name).symlink_to(files[name])
        yield dict(session, files=files)


def load_clip(family: str, encoders=None):
    """What DualCLIPLoader (type flux) / TripleCLIPLoader run, with the tiny text encoders' model options."""
    import comfy.sd
    from comfy_checkpoints import tiny_text_encoder_options

    import folder_paths

    kind = comfy.sd.CLIPType.FLUX if family == "flux" else comfy.sd.CLIPType.STABLE_DIFFUSION
    paths = [folder_paths.get_full_path_or_raise("text_encoders", ENCODER_FILES[e])
             for e in encoders or ENCODERS[family]]
    with torch.inference_mode():
        return comfy.sd.load_clip(paths, clip_type=kind, model_options=tiny_text_encoder_options())


def load_model(host, family: str):
    with torch.inference_mode():
        return host["nodes"].UNETLoader().load_unet(MODEL_FILES[family], "default")[0]


def erased_by_node(host, loaded: dict, *args, **params) -> dict:
    """`loaded` plus one erase of it through the Erase node and snapshots of its inputs taken before."""
    before = snapshot(loaded["model"]), snapshot(loaded["clip"].patcher)
    out = node(host, "ConceptEraserErase").erase(loaded["model"], loaded["clip"], *args, **params)
    erased, erased_clip, erasure = out["result"]
    return dict(loaded, before=before, erased=erased, erased_clip=erased_clip, erasure=erasure, ui=out["ui"])


@pytest.fixture(scope="module")
def flux(host):
    return {"model": load_model(host, "flux"), "clip": load_clip("flux")}


@pytest.fixture(scope="module")
def flux_erased(host, flux):
    """One UCE erase through the node (target and pooled maps), shared by the Flux tests."""
    return erased_by_node(host, flux, "uce", "Van Gogh", "", "Claude Monet", 1.0, pooled_edit=True)


@pytest.fixture(scope="module")
def sd3(host):
    return {"model": load_model(host, "sd3"), "clip": load_clip("sd3")}


@pytest.fixture(scope="module")
def sd3_erased(host, sd3):
    """One ErasePro erase of SD3 through the node (text encoders and context_embedder), shared by the SD3 tests."""
    return erased_by_node(host, sd3, "erasepro", "Van Gogh", "a painter", "", 1.0,
                          erasepro_token_policy="prompt_tokens")


@pytest.fixture
def t5_tokenizer(monkeypatch):
    """The command line's T5 tokenizer pointed at the tokenizer.json ComfyUI ships (the user's choice there)."""
    from concept_eraser import tokenizer

    monkeypatch.setattr(tokenizer, "_T5_TOKENIZER_FILE", None)
    tokenizer.use_t5_tokenizer(comfy_root() / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json")
    yield
    tokenizer.t5_tokenizer.cache_clear()


# ---- features ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_features_are_the_hosts_encoding_and_match_an_independent_encoder(host, flux, sd3, family, t5_tokenizer):
    """What the erasure is solved with is ComfyUI's own conditioning for the prompt (Flux: T5's 256 tokens; SD3:
    CLIP-L ⊕ CLIP-G's 77 zero-padded to 4096, then T5's 77) and pooled output. For SD3, whose three encoders
    include Flux's two (T5-XXL, CLIP-L's unprojected pooled output), the command line's encoders (transformers' T5,
    the CLIP towers) built from the same files give the same features, lengths and pooled vectors."""
    from concept_eraser import CheckpointModel

    loaded = flux if family == "flux" else sd3
    ComfyModel = pack_module("nodes.host").ComfyModel
    with torch.inference_mode():
        adapter = ComfyModel(loaded["model"], loaded["clip"])
        theirs = adapter.text_encoder.encode(PROMPTS)
        cond, pooled = loaded["clip"].encode_from_tokens(loaded["clip"].tokenize(PROMPTS[1]), return_pooled=True)
    windows = {"flux": [(0, 256)], "sd3": [(0, 77), (77, 77)]}[family]
    assert [(s.start, s.window) for s in theirs.segments] == windows
    assert theirs.segments[-1].lengths[0] == 5  # T5: "▁Van", "▁G", "og", "h" and EOS
    # the host's conditioning for a prompt, as CLIPTextEncode gives it to the transformer, is what is solved with
    torch.testing.assert_close(theirs.features[1], cond[0, :theirs.features.shape[1]].float(), rtol=0, atol=0)
    torch.testing.assert_close(theirs.pooled[1], pooled[0].float(), rtol=0, atol=0)
    scale = theirs.features.abs().max().item()
    assert (theirs.features[0] - theirs.features[2]).abs().max().item() > 0.05 * scale  # prompts do differ
    if family == "flux":
        return
    files = host["files"]
    ours = CheckpointModel(files[MODEL_FILES[family]], text_encoders={e: files[ENCODER_FILES[e]]
                                                                      for e in ENCODERS[family]})
    assert ours.arch.family == adapter.arch.family == family
    # the same maps, under the file's own names (bare) and ComfyUI's (model.diffusion_model.)
    assert [(m.key[len(ours.arch.denoiser_prefix):], m.reads, m.shape) for m in ours.arch.maps] == \
        [(m.key[len(UNET):], m.reads, m.shape) for m in adapter.arch.maps]
    mine = ours.text_encoder.encode(PROMPTS)
    assert [s.lengths for s in theirs.segments] == [s.lengths for s in mine.segments]
    # measured: 1.4e-5 on features up to 18 (both float32 on a CPU, fp16 weights); CLIP-G with CLIP-L's activation
    # (quick GELU): 0.31
    assert (mine.features - theirs.features.cpu()).abs().max().item() <= 1e-4 * scale
    assert (mine.pooled - theirs.pooled.cpu()).abs().max().item() <= 1e-4 * theirs.pooled.abs().max().item()


# ---- erasing ----------------------------------------------------------------------------------------------

def test_flux_erase_patches_clones_of_the_entry_projections(host, flux_erased):
    flux = flux_erased
    host_mod = pack_module("nodes.host")
    erasure, erased = flux["erasure"], flux["erased"]
    assert (snapshot(flux["model"]), snapshot(flux["clip"].patcher)) == flux["before"]
    assert erased is not flux["model"] and flux["erased_clip"] is flux["clip"]
    maps = {UNET + "txt_in.weight", UNET + "vector_in.in_layer.weight"}
    assert set(erasure.patch.edits) == maps and erasure.arch.family == "flux"
    assert set(erased.patches) == {"diffusion_model." + k[len(UNET):] for k in maps}
    assert flux["ui"]["text"][0].startswith("uce: erased Van Gogh in ")
    with torch.inference_mode():
        before, after = host_mod.ComfyModel(flux["model"], flux["clip"]), host_mod.ComfyModel(erased, flux["clip"])
        layout = host_mod.describe_layout(before.arch, before.unet_shapes)
    assert "txt_in.weight: 3072×4096, reads the per-token features" in layout
    assert "vector_in.in_layer.weight: 3072×64, reads the pooled output" in layout
    bake = baked(erased, ["diffusion_model." + k[len(UNET):] for k in maps])
    for key in maps:
        got = bake["diffusion_model." + key[len(UNET):]]
        assert got.dtype == before.weight(key).dtype  # written back in the dtype ComfyUI holds the model in
        assert torch.equal(after.weight(key).cpu(), got.cpu()), key  # what the adapter reads is what the host bakes
        expected = erasure.patch.apply_to(key, before.effective_float(key)).cpu()
        torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    text, plot = node(host, "ConceptEraserReport").report(erasure)["result"]
    assert "architecture: flux" in text and "edited tensors: 2 " in text and plot.shape[0] == 1
    # the erased maps send the target's last word (T5) and pooled vector (CLIP-L) where the guide's ("") go
    enc = before.text_encoder.encode(["Van Gogh", ""])
    t5 = enc.segments[0]
    target, guide = enc.features[0, t5.lengths[0] - 2], enc.features[1, max(t5.lengths[1] - 2, 0)]
    for key, (x, y) in {UNET + "txt_in.weight": (target, guide),
                        UNET + "vector_in.in_layer.weight": (enc.pooled[0], enc.pooled[1])}.items():
        w, w_new = before.effective_float(key), after.effective_float(key)
        moved = (w_new @ x - w @ y).norm() / (w @ x - w @ y).norm()
        assert moved < 0.5, (key, moved.item())


@pytest.mark.parametrize("file_format", ["lora", "patch"])
def test_flux_erasure_as_lora_for_the_host_loader_and_as_patch(host, flux_erased, file_format):
    """The LoRA, copied to models/loras, is applied by ComfyUI's own LoraLoader node; the patch by Apply Erasure
    Patch: both give the erased model's weights."""
    import shutil

    flux = flux_erased
    path = Path(node(host, "ConceptEraserSave").save(flux["erasure"], file_format, "models", "flux")["result"][0])
    assert path.parent == host["folders"]["erasures"]
    if file_format == "lora":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert {k.rsplit(".", 2)[0] for k in f.keys()} == {"lora_unet_txt_in", "lora_unet_vector_in_in_layer"}
        shutil.copy(path, host["folders"]["loras"] / path.name)
        with torch.inference_mode():
            model = host["nodes"].LoraLoader().load_lora(flux["model"], flux["clip"], path.name, 1.0, 1.0)[0]
    else:
        model = node(host, "ConceptEraserApplyPatch").apply(flux["model"], flux["clip"], path.name, 1.0)["result"][0]
    assert (snapshot(flux["model"]), snapshot(flux["clip"].patcher)) == flux["before"]
    keys = ["diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"]
    assert set(model.patches) == set(keys)
    got, expected = baked(model, keys), baked(flux["erased"], keys)
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_a_command_line_patch_of_the_model_only_file_applies_in_the_host(host, flux, tmp_path):
    """The command line names the model-only file's tensors as it stores them (`txt_in.weight`); ComfyUI's model
    names them `model.diffusion_model.txt_in.weight`: Apply Erasure Patch takes the patch all the same."""
    from concept_eraser.cli import main

    files = host["files"]
    patch = host["folders"]["erasures"] / "cli-flux.safetensors"
    tokenizer = comfy_root() / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json"
    assert main([str(a) for a in ("erase", files["flux1-dev.safetensors"], "--clip-l", files["clip_l.safetensors"],
                                  "--t5", files["t5xxl_fp16.safetensors"], "--t5-tokenizer", tokenizer, "--erase",
                                  "Van Gogh", "--format", "patch", "--out", patch)]) == 0
    model = node(host, "ConceptEraserApplyPatch").apply(flux["model"], flux["clip"], patch.name, 1.0)["result"][0]
    assert set(model.patches) == {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"}


def test_sd3_erasure_previews_and_saves_a_checkpoint_the_host_loader_reads(host, sd3_erased):
    """The SD3 erasure (ErasePro: text encoders and context_embedder) previewed with the host's sampler (the
    original and the erased model side by side), saved by Save Erasure as a ComfyUI all-in-one checkpoint
    (model.diffusion_model.*, text_encoders.*, the VAE) that ComfyUI's checkpoint loader (what CheckpointLoaderSimple
    runs) reads back as SD3 with the erased weights, text encoders included; the pack accepts it as it is."""
    import comfy.sd
    from comfy_checkpoints import tiny_text_encoder_options
    from safetensors import safe_open

    sd3, erased, clip, erasure = sd3_erased, sd3_erased["erased"], sd3_erased["erased_clip"], sd3_erased["erasure"]
    keys = {UNET + "context_embedder.weight"}
    t5 = "t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.v.weight"
    assert keys <= set(erasure.patch.edits) and erasure.arch.family == "sd3"
    with torch.inference_mode():
        vae = host["nodes"].VAELoader().load_vae("ae.safetensors")[0]
    grid = node(host, "ConceptEraserPreview").preview(
        sd3["model"], sd3["clip"], erased, clip, vae, "a painting by Van Gogh", "", seed=1, steps=1, cfg=1.0,
        sampler_name="euler", scheduler="simple", width=64, height=64)["result"][0]
    assert grid.shape[0] == 1 and grid.shape[2] == 2 * 64 + 3 * 6 and torch.isfinite(grid).all()
    path = node(host, "ConceptEraserSave").save(erasure, "checkpoint", "models", "sd3_erased", model=erased,
                                                clip=clip, vae=vae)["result"][0]
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        assert f.metadata()["concept_eraser.erased"] == "Van Gogh"
    assert set(keys) <= names and "text_encoders.t5xxl.transformer.shared.weight" in names
    assert any(k.startswith("text_encoders.clip_g.") for k in names)
    assert any(k.startswith("first_stage_model.taesd_decoder.") for k in names)
    with torch.inference_mode():
        model, loaded_clip = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=False, te_model_options=tiny_text_encoder_options())[:2]
        adapter = pack_module("nodes.host").ComfyModel(model, loaded_clip)
    assert type(model.model).__name__ == "SD3" and adapter.arch.family == "sd3"
    expected = baked(erased, ["diffusion_model." + k[len(UNET):] for k in keys])
    for key in keys:
        assert torch.equal(adapter.weight(key).cpu(), expected["diffusion_model." + key[len(UNET):]].cpu()), key
    expected = baked(clip.patcher, [t5])[t5].cpu()
    assert torch.equal(adapter.weight("text_encoders." + t5).cpu(), expected)
    assert not torch.equal(expected, sd3["clip"].patcher.model_state_dict()[t5].cpu())  # T5 was edited


def test_load_checkpoint_sends_a_lone_transformer_to_the_diffusion_model_loader(host):
    (host["folders"]["checkpoints"] / "flux1-dev.safetensors").symlink_to(host["files"]["flux1-dev.safetensors"])
    with pytest.raises(ValueError, match="^ckpt_name: flux1-dev.safetensors holds a Flux / SD3 transformer without "
                                         "its text encoders: load it with Load Diffusion Model"):
        node(host, "ConceptEraserLoadCheckpoint").load("flux1-dev.safetensors")


def test_sd3_erasepro_edits_the_hosts_text_encoders(host, sd3_erased):
    """ErasePro on SD3 through the node (ComfyUI's own tokenizers, T5's tokenizer.json included): its q/k/v edits of
    CLIP-L, CLIP-G and T5 land on a clone of the host's CLIP, after which the host's own encoding of the target,
    through the patched CLIP, is sent by the edited context_embedder where the original sends the guide's."""
    host_mod = pack_module("nodes.host")
    sd3, model, clip = sd3_erased, sd3_erased["erased"], sd3_erased["erased_clip"]
    assert (snapshot(sd3["model"]), snapshot(sd3["clip"].patcher)) == sd3["before"] and clip is not sd3["clip"]
    assert {k.split(".")[0] for k in clip.patcher.patches} == {"clip_l", "clip_g", "t5xxl"}
    assert "t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.v.weight" in clip.patcher.patches
    with torch.inference_mode():
        original, erased = host_mod.ComfyModel(sd3["model"], sd3["clip"]), host_mod.ComfyModel(model, clip)
        target, guide = erased.text_encoder.encode(["Van Gogh"]), original.text_encoder.encode(["a painter"])
    columns = [p for t, g in zip(target.segments, guide.segments)
               for p in range(t.start, t.start + max(t.lengths[0], g.lengths[0]))]
    key = UNET + "context_embedder.weight"
    wanted = original.effective_float(key) @ guide.features[0, columns].T
    residual = (erased.effective_float(key) @ target.features[0, columns].T - wanted).norm() / wanted.norm()
    assert residual < 1e-2, residual.item()


# ---- the example workflow ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, loader_type, file_input", [
    ("concept_eraser_flux_erase_preview_save.json", "DualCLIPLoader", "clip_name1"),
    # (ComfyUI 0.3.64 checks the file names of its V1 loaders only, not TripleCLIPLoader's)
    ("concept_eraser_sd35_erase_preview_save.json", "CheckpointLoaderSimple", "ckpt_name"),
])
def test_examples_pass_the_hosts_prompt_validation(host, name, loader_type, file_input):
    """The shipped Flux and SD3.5 examples (the host's loaders → Erase → Preview, Save, Report), in API format, are
    accepted by ComfyUI's own prompt validation with the release-named files in its model folders: node types,
    links between their sockets, widget values (file names and every combo)."""
    import asyncio

    import execution

    assert asyncio.run(host["nodes"].load_custom_node(str(REPO))) is True
    # TripleCLIPLoader is one of ComfyUI's built-in extra nodes, which its start-up registers
    extra = comfy_root() / "comfy_extras" / "nodes_sd3.py"
    assert asyncio.run(host["nodes"].load_custom_node(str(extra), module_parent="comfy_extras")) is True
    ckpts = host["folders"]["checkpoints"] / "sd3.5_large.safetensors"
    if not ckpts.exists():  # the SD3.5 release file (transformer and VAE) is loaded by Load Checkpoint
        ckpts.symlink_to(host["files"]["sd3.5_large.safetensors"])
    prompt = to_api(examples()[name])
    valid, error, good, errors = asyncio.run(execution.validate_prompt(name, prompt, None))
    assert valid and not errors, (error, errors)
    assert {prompt[o]["class_type"] for o in good} == {"ConceptEraserPreview", "ConceptEraserSave",
                                                      "ConceptEraserReport"}
    loader = next(k for k, v in prompt.items() if v["class_type"] == loader_type)
    broken = {**prompt, loader: {**prompt[loader], "inputs": {**prompt[loader]["inputs"],
                                                             file_input: "missing.safetensors"}}}
    assert not asyncio.run(execution.validate_prompt("broken", broken, None))[0]  # the validation can fail


# ---- bad input ----------------------------------------------------------------------------------------------

def _aura_flow():
    """A transformer ComfyUI runs that Concept Eraser does not edit: AuraFlow, tiny, from the host's classes."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.AuraFlow({"cond_seq_dim": 2048, "max_seq": 16, "n_double_layers": 1,
                                              "n_layers": 2, "dim": 64, "n_heads": 2, "global_conddim": 64})
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(config.get_model({}, device=cpu), cpu, cpu)


@pytest.mark.parametrize("case, field, message", [
    ("sd3 model, flux clip", "clip", "this CLIP is ComfyUI's FluxClipModel (holding clip_l, t5xxl, without clip_g), "
     "but this SD3 model reads CLIP-L ⊕ CLIP-G and T5-XXL features (context_embedder) and CLIP-L ⊕ CLIP-G pooled "
     "(y_embedder) through ComfyUI's SD3ClipModel: load clip_l, clip_g and t5xxl with TripleCLIPLoader"),
    ("flux model, clip without t5", "clip", "this CLIP is ComfyUI's SD1ClipModel (holding clip_l, without t5xxl), "
     "but this Flux model reads T5-XXL's features (txt_in) and CLIP-L's pooled output (vector_in) through "
     "ComfyUI's FluxClipModel: load clip_l and t5xxl with DualCLIPLoader (type flux)"),
    ("unknown transformer", "model", "ComfyUI loaded this as AuraFlow (AuraFlow), a denoiser Concept Eraser does "
     "not know (it edits Stable Diffusion 1.x/2.x/XL U-Nets and Flux.1 / SD3 transformers; this one's first "
     "tensors: positional_encoding, register_tokens, t_embedder.mlp.0.weight)"),
])
def test_bad_models_and_clips_are_named(host, flux, sd3, case, field, message):
    model, clip = {"sd3 model, flux clip": lambda: (sd3["model"], flux["clip"]),
                   "flux model, clip without t5": lambda: (flux["model"], load_clip("flux", ["clip_l"])),
                   "unknown transformer": lambda: (_aura_flow(), flux["clip"])}[case]()
    before = snapshot(model), snapshot(clip.patcher)
    with pytest.raises(ValueError) as caught:
        node(host, "ConceptEraserErase").erase(model, clip, "uce", "Van Gogh", "", "", 1.0)
    assert str(caught.value).startswith(f"{field}: {message}"), str(caught.value)
    assert (snapshot(model), snapshot(clip.patcher)) == before
