"""The node pack against ComfyUI's real classes, in this process: ModelPatcher, CLIP and VAE loaded by the
host's own loader from a generated checkpoint it detects as SD1.5 (and SDXL for the text-encoder key
mapping), the nodes called as ComfyUI calls them.

What is checked: the pack imports without ComfyUI and registers through ComfyUI's loader; every node
documents its inputs and outputs; the Erase node's inputs are the methods' declared parameters; the
adapter serves the checkpoint's keys and exactly the host's effective weights; erasing patches clones
(the inputs keep their patches and weights), at the chosen strength, chains, edits ComfyUI's CLIP for
ErasePro, honours clip skip, stops cleanly on cancel; bad inputs raise errors naming the input; save,
apply, load, preview and report work and round-trip.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import REPO, baked, checkpoint, host_session, node, pack_module, snapshot

NODE_IDS = ("ConceptEraserLoadCheckpoint", "ConceptEraserApplyPatch", "ConceptEraserErase", "ConceptEraserPreview",
            "ConceptEraserSave", "ConceptEraserReport")
UNET = "model.diffusion_model."
# KPOP through the node, as short as it gets: 64 px latents, a 1-window prompt, two steps
KPOP_QUICK = {"kpop_steps": 2, "kpop_ddim_steps": 2, "kpop_prompt_size": 1, "kpop_resolution": 64}


def test_pack_imports_without_comfyui(tmp_path):
    """The repository root is importable as a package with no ComfyUI anywhere (and loads no host module)."""
    code = (
        "import importlib.util, sys\n"
        "sys.path = [p for p in sys.path if 'ComfyUI' not in p]\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert not {'comfy', 'folder_paths', 'nodes'} & set(sys.modules), sorted(sys.modules)\n"
        "print(sorted(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY, m.nodes.FAILED)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"{sorted(NODE_IDS)} ./javascript/comfyui {{}}"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    yield from host_session(tmp_path_factory.mktemp("comfy_base"), ("checkpoints", "erasures"))


@pytest.fixture(scope="module")
def sd15(host):
    """SD1.5 loaded by ComfyUI's own loader (text encoder in float32: fp16 matmuls are slow on CPUs)."""
    import comfy.sd

    path = checkpoint("sd15")
    with torch.inference_mode():  # as the executor runs a loader node: the weights are inference tensors
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, te_model_options={"dtype": torch.float32})[:3]
    return {"path": path, "model": model, "clip": clip, "vae": vae}


@pytest.fixture(scope="module")
def uce(host, sd15):
    """One UCE erase through the node, shared by several tests."""
    before = snapshot(sd15["model"]), snapshot(sd15["clip"].patcher), sd15["model"].patches_uuid
    out = node(host, "ConceptEraserErase").erase(sd15["model"], sd15["clip"], "uce", "Van Gogh", "", "Claude Monet",
                                                 1.0)
    model, clip, erasure = out["result"]
    return {"model": model, "clip": clip, "erasure": erasure, "before": before, "ui": out["ui"]}


# ---- registration and documentation ---------------------------------------------------------------

@pytest.mark.host
def test_registers_through_comfyui_loader(host):
    nodes = host["nodes"]
    assert asyncio.run(nodes.load_custom_node(str(REPO))) is True
    for node_id in NODE_IDS:
        assert node_id in nodes.NODE_CLASS_MAPPINGS and node_id in nodes.NODE_DISPLAY_NAME_MAPPINGS
    web = [Path(p) for p in nodes.EXTENSION_WEB_DIRS.values()]
    assert (REPO / "javascript" / "comfyui").resolve() in [p.resolve() for p in web]
    assert (REPO / "javascript" / "comfyui" / "concept_eraser.js").is_file()


@pytest.mark.host
def test_every_node_is_documented(host):
    for node_id in NODE_IDS:
        cls = host["pack"].NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "Concept Eraser" and len(cls.DESCRIPTION) > 40, node_id
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), node_id
        inputs = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, spec in inputs.get(group, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.host
def test_every_input_is_on_its_help_page(host):
    """ComfyUI's in-app help (javascript/comfyui/docs/<node>.md) names every input, as **name** or `name`, and every
    choice of the pack's own combos; a method's parameters are covered by the page naming that method (their
    inputs are generated: `<method>_<parameter>`, each with its tooltip)."""
    own_choices = {"ConceptEraserErase": ("method",), "ConceptEraserSave": ("format", "folder")}
    for node_id in NODE_IDS:
        page = (REPO / "javascript" / "comfyui" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")

        def named(word, page=page):
            return f"**{word}**" in page or f"`{word}`" in page

        inputs = host["pack"].NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for name, (kind, options) in {**inputs["required"], **inputs.get("optional", {})}.items():
            method = options.get("concept_eraser_method")
            assert named(method or name), f"{node_id}.md does not mention {method or name}"
            if name in own_choices.get(node_id, ()):
                missing = [choice for choice in kind if not named(choice)]
                assert not missing, f"{node_id}.md does not mention {name} {missing}"


@pytest.mark.host
def test_erase_inputs_are_the_declared_params(host):
    from concept_eraser_comfy_pack.concept_eraser.methods import METHODS

    common = pack_module("nodes.common")
    optional = host["pack"].NODE_CLASS_MAPPINGS["ConceptEraserErase"].INPUT_TYPES()["optional"]
    expected = set()
    for method in METHODS.values():
        for p in method.params:
            name = common.input_name(method.name, p)
            expected.add(name)
            kind, options = optional[name]
            assert options["concept_eraser_label"] == p.name
            if p.kind is bool and p.nullable:  # auto / true / false, each accepted by the parameter
                assert kind == ["auto", "true", "false"] and options["default"] == "auto"
                assert [p.convert(v) for v in kind] == [None, True, False]
            elif p.kind is bool:
                assert kind == "BOOLEAN" and options["default"] is p.default
            elif p.choices:
                assert kind == list(p.choices) and options["default"] == p.default
            elif p.nullable or p.kind is str:  # free text (e.g. expand_exclude) or "auto" = the rule
                assert kind == "STRING" and options["default"] == ("auto" if p.default is None else str(p.default))
            else:
                assert kind == ("INT" if p.kind is int else "FLOAT") and options["default"] == p.default
                # the widget's range is the parameter's: both ends accepted, nothing beyond (λ > 0: no 0)
                assert p.convert(options["min"]) == options["min"] and p.convert(options["max"]) == options["max"]
                if p.min is None:
                    assert options["min"] == -common.UNBOUNDED
                else:
                    assert options["min"] > p.min if p.min_exclusive else options["min"] == p.min
                assert options["max"] == (p.max if p.max is not None else common.UNBOUNDED)
                if kind == "INT":  # the frontend keeps the value on min + k·step: round values, the default one
                    assert options["min"] % options["step"] == 0 == options["default"] % options["step"], name
                else:  # what the frontend shows and sends is rounded to `round` (as many decimals as the step)
                    shown = [options["min"], options["default"], options["min"] + 3 * options["step"]]
                    decimals = max(0, -math.floor(math.log10(options["step"])))
                    assert options["round"] == 10.0 ** -decimals, name
                    assert [float(f"{v:.{decimals}f}") for v in shown] == pytest.approx(shown, abs=1e-12), name
                    if p.min_exclusive:  # the least value shows as more than the bound, and is accepted
                        assert f"{options['min']:.{decimals}f}" != f"{p.min:.{decimals}f}", name
    assert set(optional) == expected


# ---- the adapter ------------------------------------------------------------------------------------

@pytest.mark.host
def test_adapter_serves_the_checkpoint_keys_and_weights(host, sd15):
    from concept_eraser import CheckpointModel

    ComfyModel = pack_module("nodes.host").ComfyModel
    adapter = ComfyModel(sd15["model"], sd15["clip"])
    ours = CheckpointModel(sd15["path"])
    assert adapter.arch.family == ours.arch.family == "sd1"
    assert adapter.arch.map_keys() == ours.arch.map_keys() and len(ours.arch.map_keys()) == 14
    fields = ("name", "layout", "width", "layers", "hidden_layer", "final_norm", "pooled")
    assert [[getattr(e, f) for f in fields] for e in adapter.arch.encoders] == \
        [[getattr(e, f) for f in fields] for e in ours.arch.encoders]
    text = [k for k in ours.keys() if k.startswith("cond_stage_model.") and not k.endswith("position_ids")]
    assert set(text) <= set(adapter.keys()) and set(ours.arch.map_keys()) <= set(adapter.keys())
    for key in list(ours.arch.map_keys()[:4]) + text[:6]:
        got = adapter.weight(key)
        assert got.dtype == torch.float32  # the dtype ComfyUI runs this model in on a CPU
        assert torch.equal(got.cpu(), ours.weight(key).float()), key


@pytest.mark.host
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_adapter_maps_openclip_fused_keys(host, sd15, family):
    """OpenCLIP encoders (SD2's ViT-H, SDXL's bigG): the fused in_proj and the transposed text_projection are
    served as the checkpoint stores them, and edits to them land on ComfyUI's split q/k/v and on its
    projection (the inverse mapping)."""
    import gc

    import comfy.model_management
    import comfy.sd
    from concept_eraser import CheckpointModel

    host_mod = pack_module("nodes.host")
    patch_mod = pack_module("concept_eraser.patch")
    path = checkpoint(family)
    model, clip = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True,
                                                        te_model_options={"dtype": torch.float32})[:2]
    try:
        adapter = host_mod.ComfyModel(model, clip)
        ours = CheckpointModel(path)
        assert adapter.arch.family == ours.arch.family == family and adapter.arch.map_keys() == ours.arch.map_keys()
        assert [e.name for e in adapter.arch.encoders] == [e.name for e in ours.arch.encoders]
        g = ours.arch.encoders[-1].prefix
        fused, proj = g + "transformer.resblocks.3.attn.in_proj_weight", g + "text_projection"
        keys = [fused, proj, g + "transformer.resblocks.3.attn.in_proj_bias", g + "positional_embedding"]
        if family == "sdxl":
            keys += [UNET + "label_emb.0.0.weight",
                     "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.k_proj.weight"]
        for key in keys:
            assert torch.equal(adapter.weight(key).cpu(), ours.weight(key).float()), key
        width = ours.weight(proj).shape[0]
        rng = torch.Generator().manual_seed(0)
        low = patch_mod.LowRankEdit(torch.randn(3 * width, 2, generator=rng) * 1e-2,
                                    torch.randn(2, width, generator=rng))
        dense = patch_mod.DenseEdit(ours.weight(proj).float() * 0.5)
        patch = patch_mod.ErasurePatch(family, {fused: (low,), proj: (dense,)})
        new_model, new_clip = host_mod.apply_erasure(model, clip, adapter, patch, 1.0)
        assert new_model is not model and new_clip is not clip and not clip.patcher.patches
        slot = ours.arch.encoders[-1].name
        assert {k for k in new_clip.patcher.patches} == {
            f"{slot}.transformer.text_model.encoder.layers.3.self_attn.{p}_proj.weight" for p in "qkv"} | {
            f"{slot}.transformer.text_projection.weight"}
        after = host_mod.ComfyModel(new_model, new_clip)
        expected = patch.apply_to(fused, ours.weight(fused).float())
        torch.testing.assert_close(after.weight(fused).cpu(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(after.weight(proj).cpu(), dense.new, rtol=0, atol=1e-6)
        # the model with another family's CLIP: the CLIP is at fault
        with pytest.raises(ValueError, match="^clip: this CLIP gives 768-wide text features"):
            node(host, "ConceptEraserErase").erase(model, sd15["clip"], "uce", "Van Gogh", "", "", 1.0)
    finally:
        del model, clip
        comfy.model_management.unload_all_models()
        gc.collect()


# ---- erasing ----------------------------------------------------------------------------------------

@pytest.mark.host
def test_erase_patches_clones_only(host, sd15, uce):
    from concept_eraser import CheckpointModel

    model, erasure = uce["model"], uce["erasure"]
    assert (snapshot(sd15["model"]), snapshot(sd15["clip"].patcher), sd15["model"].patches_uuid) == uce["before"]
    assert model is not sd15["model"] and uce["clip"] is sd15["clip"]  # UCE leaves the text encoder alone
    edited = {"diffusion_model." + k[len(UNET):] for k in erasure.patch.edits}
    assert set(model.patches) == edited and len(edited) == 14
    assert erasure.strength == 1.0 and erasure.arch.family == "sd1" and erasure.lineage[-1]["method"] == "uce"
    # our reading of the erased model == what ComfyUI bakes when it loads it == the solver's patch
    ComfyModel = pack_module("nodes.host").ComfyModel
    after = ComfyModel(model, uce["clip"])
    ours = CheckpointModel(sd15["path"])
    bake = baked(model, sorted(edited))
    for key in erasure.patch.edits:
        name = "diffusion_model." + key[len(UNET):]
        assert torch.equal(after.weight(key).cpu(), bake[name].cpu()), key
        torch.testing.assert_close(bake[name].cpu(), erasure.patch.apply_to(key, ours.weight(key).float()),
                                   rtol=1e-5, atol=1e-6)
    # and the input model's own weights are back to the file's
    state = sd15["model"].model_state_dict()
    key = next(iter(erasure.patch.edits))
    assert torch.equal(state["diffusion_model." + key[len(UNET):]].cpu(), ours.weight(key).float())


@pytest.mark.host
def test_strength_scales_the_edit(host, sd15, uce):
    host_mod = pack_module("nodes.host")
    adapter = host_mod.ComfyModel(sd15["model"], sd15["clip"])
    patch = uce["erasure"].patch
    half, _ = host_mod.apply_erasure(sd15["model"], sd15["clip"], adapter, patch, 0.5)
    after = host_mod.ComfyModel(half, sd15["clip"])
    for key in list(patch.edits)[:3]:
        w = adapter.weight(key)
        torch.testing.assert_close(after.weight(key), w + 0.5 * (patch.apply_to(key, w) - w), rtol=1e-5, atol=1e-6)


@pytest.mark.host
def test_erase_nodes_chain(host, sd15, uce):
    first = uce["model"]
    before = snapshot(first)
    model, clip, erasure = node(host, "ConceptEraserErase").erase(
        first, uce["clip"], "rece", "Pablo Picasso", "", "", 1.0, rece_epochs=1)["result"]
    assert snapshot(first) == before
    assert all(len(model.patches[k]) == 2 for k in first.patches)
    assert [s["method"] for s in erasure.lineage] == ["uce", "rece"]
    assert erasure.report["source"]["name"].startswith("ComfyUI")


@pytest.mark.host
def test_erasepro_edits_comfy_clip_and_reads_clip_skip(host, sd15):
    """ErasePro edits the text encoder: its q/k/v edits land on ComfyUI's CLIP clone, after which the host's
    own encoding of the target gives the guide's features (the method's zero-residual constraint). With
    CLIP Set Last Layer -2 the method rebuilds the encoder at the layer the host reads."""
    host_mod = pack_module("nodes.host")
    layerwise = pack_module("concept_eraser.models.layerwise")
    clip = sd15["clip"].clone()
    clip.clip_layer(-2)
    adapter = host_mod.ComfyModel(sd15["model"], clip)
    spec = adapter.arch.encoders[0]
    assert (spec.hidden_layer, spec.final_norm) == (-2, True)
    rebuilt = layerwise.LayerwiseEncoder(spec, adapter.keys(), adapter.weight)
    ours = rebuilt.encode(["a red circle"])[0][0]
    theirs = adapter.text_encoder.encode(["a red circle"]).features[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())

    before = snapshot(clip.patcher)
    model, new_clip, erasure = node(host, "ConceptEraserErase").erase(
        sd15["model"], clip, "erasepro", "Van Gogh", "a painter", "", 1.0,
        erasepro_token_policy="prompt_tokens")["result"]
    assert snapshot(clip.patcher) == before and new_clip is not clip and new_clip.layer_idx == -2
    first_block = "clip_l.transformer.text_model.encoder.layers.0.self_attn."
    assert any(k.startswith(first_block) for k in new_clip.patcher.patches)
    # The U-Net stage's constraint W X = W_o Y, with X the target's features as ComfyUI now encodes them
    # through the patched CLIP: it holds only if the CLIP patches reproduce the solver's text-encoder edit.
    erased = host_mod.ComfyModel(model, new_clip)
    target = erased.text_encoder.encode(["Van Gogh"])
    guide = adapter.text_encoder.encode(["a painter"])
    rows = max(target.lengths[0], guide.lengths[0])
    X, Y = target.features[0, :rows].T, guide.features[0, :rows].T
    for key in adapter.arch.map_keys()[:4]:
        wanted = adapter.weight(key) @ Y
        residual = ((erased.weight(key) @ X - wanted).norm() / wanted.norm()).item()
        assert residual < 1e-2, (key, residual)
    assert erasure.report["max_residual"] < 1e-2
    # the text-encoder edit lives in the CLIP: a checkpoint needs the erased CLIP, not the one erased from
    save = node(host, "ConceptEraserSave")
    with pytest.raises(ValueError, match="^clip: this CLIP does not carry the erasure"):
        save.save(erasure, "checkpoint", "output", "erasepro/unerased_clip", model=model, clip=clip, vae=sd15["vae"])
    assert not list((host["base"] / "output" / "erasepro").iterdir())
    saved = save.save(erasure, "checkpoint", "output", "erasepro/erased", model=model, clip=new_clip,
                      vae=sd15["vae"])["result"][0]
    assert Path(saved).is_file()


@pytest.mark.host
@pytest.mark.parametrize("method, params", [("uce", {}), ("kpop", {**KPOP_QUICK, "kpop_steps": 5})])
def test_cancel_leaves_the_input_untouched(host, sd15, method, params):
    import comfy.model_management
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 3:
            comfy.model_management.interrupt_current_processing(True)

    before = snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node(host, "ConceptEraserErase").erase(sd15["model"], sd15["clip"], method, "Van Gogh", "", "", 1.0,
                                                   **params)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) >= 3
    assert (snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)) == before


# Every method as short as it gets; SPACE stopped after 2 passes, unconverged (its warning must reach the UI).
QUICK = {"uce": {}, "rece": {"rece_epochs": 1}, "space": {"space_iterations": 2}, "erasepro": {},
         "kpop": {**KPOP_QUICK, "kpop_steps": 1}}


@pytest.mark.host
@pytest.mark.parametrize("method", list(QUICK))
def test_every_method_runs_as_the_executor_runs_it(host, sd15, method):
    """Each method through the Erase node under torch.inference_mode() on weights loaded under it (as ComfyUI
    runs every node): the inputs stay as they were; the node's UI text gives the headline figures and every
    warning; a saved patch stores dense and sparse edits as changes (so a forced apply stays a change)."""
    from concept_eraser.methods import METHODS

    assert set(QUICK) == set(METHODS)
    before = snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)
    out = node(host, "ConceptEraserErase").erase(sd15["model"], sd15["clip"], method, "Van Gogh", "", "", 1.0,
                                                 **QUICK[method])
    model, clip, erasure = out["result"]
    assert (snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)) == before and model.patches
    text = out["ui"]["text"][0]
    assert text.startswith(f"{method}: erased Van Gogh in ") and "recoverability" in text, text
    if method == "space":
        assert "converged: NO after 2 passes" in text and "sparsity: " in text
        assert "WARNING: SPACE stopped at iterations=2" in text and erasure.report["warnings"]
    kinds = {s.kind for stages in erasure.patch.edits.values() for s in stages}
    assert kinds == ({"delta"} if method in ("space", "kpop") else {"low_rank"}), kinds


@pytest.mark.host
def test_checkpoint_unet_predicts_as_comfyui(host, sd15):
    """The command line's U-Net (`models.unet`, built from the file) and ComfyUI's own, on the same file:
    the same noise prediction for the same latents, timesteps and text features."""
    from concept_eraser import CheckpointModel

    adapter = pack_module("nodes.host").ComfyModel(sd15["model"], sd15["clip"])
    ours = CheckpointModel(sd15["path"]).denoiser(resolution=64)
    theirs = adapter.denoiser(resolution=64)
    assert theirs.latent_shape == ours.latent_shape == (4, 8, 8)
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod, rtol=1e-5, atol=0)
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=rng)
    context = adapter.text_encoder.encode(["a photo of a cat", "Van Gogh"]).features
    t = torch.tensor([999, 321])
    expected = theirs.eps(z, t, context)
    got = ours.eps(z, t, context)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()  # measured 1.7e-6 (both float32 on a CPU)
    assert (expected[0] - expected[1]).abs().max() > 0.1 * expected.abs().max()  # would catch mixed-up inputs


@pytest.mark.host
def test_kpop_trains_a_clone_of_the_host_unet(host, sd15):
    import comfy.model_management
    import comfy.utils

    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    comfy.model_management.load_models_gpu([sd15["model"]])
    weights = {k: v.detach().clone() for k, v in sd15["model"].model.diffusion_model.state_dict().items()
               if "attn2" in k}
    before = snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)
    try:
        model, clip, erasure = node(host, "ConceptEraserErase").erase(
            sd15["model"], sd15["clip"], "kpop", "Van Gogh", "", "", 1.0, **KPOP_QUICK)["result"]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)) == before
    live = sd15["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in weights.items())  # the shared module was never written
    expected = {"diffusion_model." + k for k in weights}
    assert set(model.patches) == expected and clip is sd15["clip"]
    assert (2, 2) in calls  # one progress update per training step
    assert set(erasure.artifacts) == {"prompt_k", "prompt_v"}
    (path,) = node(host, "ConceptEraserSave").save(erasure, "learned_prompt", "output", "kpop/prompt")["result"]
    from concept_eraser.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(path)
    assert reader.metadata["concept_eraser.format"] == "learned_prompt"
    assert json.loads(reader.metadata["concept_eraser.layers"]) == erasure.report["prompt_layers"]


@pytest.mark.host
@pytest.mark.parametrize("inputs, field", [
    ({"targets": ""}, "targets"),
    ({"targets": "a\nb\nc", "guides": "x\ny"}, "guides"),
    ({"preserve": "Van Gogh"}, "preserve"),
    ({"uce_lam": 0.0}, "uce_lam"),
    ({"uce_preserve_scale": "lots"}, "uce_preserve_scale"),
    ({"method": "rece", "rece_epochs": 2, "rece_epoch": "3"}, "rece_epoch"),
    ({"pooled_edit": True}, "pooled_edit"),
    ({"method": "kpop", "kpop_injection": "prepend"}, "kpop_injection"),
    ({"method": "kpop", "kpop_resolution": 100}, "kpop_resolution"),
    ({"strength": 1.5}, "strength"),
    ({"unknown": "uce_lamda"}, "uce_lamda"),
    ({"model": "not sd"}, "model"),
])
def test_bad_inputs_name_the_field(host, sd15, inputs, field):
    import comfy.model_management
    import comfy.model_patcher

    args = {"model": sd15["model"], "clip": sd15["clip"], "method": "uce", "targets": "Van Gogh", "guides": "",
            "preserve": "", "strength": 1.0}
    args.update({k: v for k, v in inputs.items() if k not in ("unknown", "model")})
    if "unknown" in inputs:
        args["prompt"], args["unique_id"] = {"7": {"inputs": {inputs["unknown"]: 0.3}}}, "7"
    if "model" in inputs:  # a model ComfyUI can hold that is not a Stable Diffusion checkpoint
        cpu = torch.device("cpu")
        args["model"] = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), cpu, cpu)
    before = snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)
    erase_node = node(host, "ConceptEraserErase")
    with pytest.raises(ValueError) as caught:
        erase_node.erase(**args)
    assert str(caught.value).startswith(field + ":"), str(caught.value)
    assert (snapshot(sd15["model"]), snapshot(sd15["clip"].patcher)) == before
    if field == "targets":
        assert erase_node.VALIDATE_INPUTS("  \n").startswith("targets:") and erase_node.VALIDATE_INPUTS("x") is True


# ---- files ------------------------------------------------------------------------------------------

@pytest.mark.host
def test_save_checkpoint_round_trips_through_the_host_loader(host, sd15, uce):
    import comfy.model_management
    import comfy.sd
    from safetensors import safe_open

    save = node(host, "ConceptEraserSave")
    prompt, workflow = {"1": {"class_type": "X", "inputs": {}}}, {"nodes": [], "version": 0.4}
    kwargs = dict(erasure=uce["erasure"], format="checkpoint", folder="output", filename_prefix="ce/erased",
                  model=uce["model"], clip=uce["clip"], vae=sd15["vae"], prompt=prompt,
                  extra_pnginfo={"workflow": workflow})
    first = save.save(**kwargs)["result"][0]
    second = save.save(**kwargs)["result"][0]
    assert first != second and Path(first).exists() and Path(second).exists()  # never overwritten
    assert Path(first).parent == host["base"] / "output" / "ce"
    with safe_open(first, "pt") as f:
        meta = f.metadata()
    assert meta["concept_eraser.format"] == "checkpoint" and meta["concept_eraser.erased"] == "Van Gogh"
    assert json.loads(meta["concept_eraser.steps"])[0]["method"] == "uce"
    assert json.loads(meta["workflow"]) == workflow and json.loads(meta["prompt"]) == prompt
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"

    edited = ["diffusion_model." + k[len(UNET):] for k in uce["erasure"].patch.edits]
    expected = baked(uce["model"], edited + ["diffusion_model.input_blocks.0.0.weight"])
    loaded = comfy.sd.load_checkpoint_guess_config(first, output_vae=False, output_clip=False)[0]
    state = loaded.model_state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key].cpu(), value.cpu()), key
    del loaded
    comfy.model_management.unload_all_models()


@pytest.mark.host
def test_save_checkpoint_refuses_a_model_without_the_erasure(host, sd15, uce):
    """Erase Concept's erasure with the loaders' MODEL (wired past the erase node) is refused: the file would
    claim an erasure its weights do not have."""
    folder = host["folders"]["checkpoints"]
    (folder / "unerased_sd15.safetensors").symlink_to(checkpoint("sd15"))
    loaded = node(host, "ConceptEraserLoadCheckpoint").load("unerased_sd15.safetensors")["result"][0]
    save = node(host, "ConceptEraserSave")
    for model in (loaded, sd15["model"]):  # Load Checkpoint (Concept Eraser), the core loader
        with pytest.raises(ValueError, match="^model: this MODEL does not carry the erasure"):
            save.save(uce["erasure"], "checkpoint", "output", "unerased/ckpt", model=model, clip=uce["clip"],
                      vae=sd15["vae"])
    assert not list((host["base"] / "output" / "unerased").iterdir())  # no file, not even a partial one


@pytest.mark.host
@pytest.mark.parametrize("file_format", ["patch", "lora"])
def test_saved_patch_and_lora_apply_to_the_same_weights(host, sd15, uce, file_format):
    saved = node(host, "ConceptEraserSave").save(uce["erasure"], file_format, "models", "erased")
    path = saved["result"][0]
    assert Path(path).parent == host["folders"]["erasures"]
    assert saved["ui"]["text"] == [f"{file_format} saved to {path}"]  # the real place, models/erasures/...
    out = node(host, "ConceptEraserApplyPatch").apply(sd15["model"], sd15["clip"], Path(path).name, 1.0)
    model, clip, info = out["result"]
    assert "Van Gogh" in info and model is not sd15["model"]
    ComfyModel = pack_module("nodes.host").ComfyModel
    applied, erased = ComfyModel(model, clip), ComfyModel(uce["model"], uce["clip"])
    for key in uce["erasure"].patch.edits:
        torch.testing.assert_close(applied.weight(key), erased.weight(key), rtol=1e-6, atol=1e-7)
    assert [s["method"] for s in model.get_attachment("concept_eraser.steps")] == ["uce"]


@pytest.mark.host
def test_apply_refuses_a_patch_made_for_another_checkpoint_unless_forced(host, sd15, uce):
    """The patch records its source's fingerprint: a model whose cross-attention weights differ (here: the same
    checkpoint with every K/V changed by a patch, as another fine-tune of it would be) is refused, naming the
    patch's source, unless `force` is on; the same model is accepted."""
    path = Path(node(host, "ConceptEraserSave").save(uce["erasure"], "patch", "models", "for_sd15")["result"][0])
    adapter = pack_module("nodes.host").ComfyModel(sd15["model"], sd15["clip"])
    other = sd15["model"].clone()
    other.add_patches({"diffusion_model." + k[len(UNET):]: ("diff", (0.05 * adapter.weight(k).float(),))
                       for k in adapter.arch.map_keys()}, 1.0)
    apply = node(host, "ConceptEraserApplyPatch")
    source = uce["erasure"].report["source"]["name"]
    with pytest.raises(ValueError, match=f"^erasure_name: the patch was made for another checkpoint, {source} .*"
                                         "set force to true"):
        apply.apply(other, sd15["clip"], path.name, 1.0)
    model = apply.apply(other, sd15["clip"], path.name, 1.0, force=True)["result"][0]
    assert set(model.patches) == set(other.patches)
    assert apply.apply(sd15["model"], sd15["clip"], path.name, 1.0)["result"][0].patches


@pytest.mark.host
def test_save_validates_format_and_folder_up_front(host):
    save = host["pack"].NODE_CLASS_MAPPINGS["ConceptEraserSave"]
    assert save.VALIDATE_INPUTS(format="ckpt", folder="output").startswith("format: 'ckpt' is not one of")
    assert save.VALIDATE_INPUTS(format="patch", folder="desktop").startswith("folder: 'desktop' is not one of")
    assert save.VALIDATE_INPUTS(format="patch", folder="models") is True


@pytest.mark.host
def test_apply_refuses_other_files(host, sd15):
    from safetensors.torch import save_file

    other = host["folders"]["erasures"] / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="^erasure_name:"):
        node(host, "ConceptEraserApplyPatch").apply(sd15["model"], sd15["clip"], other.name, 1.0)


@pytest.mark.host
def test_load_node_reports_layout_and_refuses_early(host):
    from comfy_checkpoints import make_flux_like_file

    folder = host["folders"]["checkpoints"]
    (folder / "tiny_sd15.safetensors").symlink_to(checkpoint("sd15"))
    out = node(host, "ConceptEraserLoadCheckpoint").load("tiny_sd15.safetensors")
    model, clip, vae, layout = out["result"]
    assert layout.startswith("Stable Diffusion 1.x") and "K,V 320×768" in layout and out["ui"]["text"] == [layout]
    assert model.get_attachment("concept_eraser.source")["name"] == "tiny_sd15.safetensors"
    make_flux_like_file(folder / "flux_like.safetensors")
    with pytest.raises(ValueError, match="^ckpt_name: .*Flux"):
        node(host, "ConceptEraserLoadCheckpoint").load("flux_like.safetensors")


@pytest.mark.host
def test_file_nodes_name_the_input_of_a_file_that_is_not_safetensors(host, sd15):
    for folder, node_id, call, field in (
            ("checkpoints", "ConceptEraserLoadCheckpoint", lambda n, name: n.load(name), "ckpt_name"),
            ("erasures", "ConceptEraserApplyPatch", lambda n, name: n.apply(sd15["model"], sd15["clip"], name, 1.0),
             "erasure_name")):
        (host["folders"][folder] / "garbage.safetensors").write_bytes(b"not a model at all")
        with pytest.raises(ValueError, match=f"^{field}: garbage.safetensors is not a safetensors file"):
            call(node(host, node_id), "garbage.safetensors")


@pytest.mark.host
@pytest.mark.parametrize("file_format, named", [("patch", "patch"), ("lora", "erasure LoRA")])
def test_load_node_points_a_saved_erasure_to_apply_erasure_patch(host, uce, file_format, named):
    """The advice is ComfyUI's (the command line's names its `apply` command), and a LoRA is called one."""
    saved = Path(node(host, "ConceptEraserSave").save(uce["erasure"], file_format, "output", "misplaced")["result"][0])
    (host["folders"]["checkpoints"] / saved.name).symlink_to(saved)
    with pytest.raises(ValueError) as caught:
        node(host, "ConceptEraserLoadCheckpoint").load(saved.name)
    assert str(caught.value) == (f"ckpt_name: this file is a Concept Eraser {named}, not a checkpoint: put it in the "
                                 "models/erasures folder and apply it to its checkpoint's MODEL and CLIP with the "
                                 "Apply Erasure Patch node")


# ---- views ------------------------------------------------------------------------------------------

@pytest.mark.host
def test_report_node(host, uce):
    out = node(host, "ConceptEraserReport").report(uce["erasure"])
    text, plot = out["result"]
    assert "method: uce" in text and "Van Gogh" in text and "recoverability" in text
    assert text.startswith(uce["ui"]["text"][0] + "\n")  # the Erase node's headline comes first
    # every glyph of the plot's title exists in the font it is drawn with (no boxes)
    from PIL import Image, ImageDraw

    from concept_eraser.report import font as report_font
    from concept_eraser.report import plot_title

    font = report_font(13)

    def drawn(char):
        image = Image.new("L", (40, 30))
        ImageDraw.Draw(image).text((2, 2), char, font=font, fill=255)
        return image.tobytes()

    title = plot_title(uce["erasure"].report)
    assert [c for c in title if drawn(c) == drawn("\uffff")] == [], title
    assert plot.shape == (1, 420, 960, 3) and 0 <= plot.min() and plot.max() <= 1 and plot.std() > 0.05
    assert out["ui"]["text"] == [text] and out["ui"]["images"][0]["type"] == "temp"


@pytest.mark.host
def test_preview_grid_matches_the_host_sampler(host, sd15, uce):
    """Each cell of the grid is bit for bit what CLIPTextEncode + KSampler + VAEDecode render with the
    same prompt, seed and settings: column 'original' from the input model, 'erased' from the erased one."""
    nodes = host["nodes"]
    settings = dict(seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64)
    out = node(host, "ConceptEraserPreview").preview(sd15["model"], sd15["clip"], uce["model"], uce["clip"],
                                                     sd15["vae"], "a cat", "", erasure=uce["erasure"], **settings)
    grid = out["result"][0]
    assert grid.shape[0] == 1 and grid.shape[2] == 2 * 64 + 3 * 6 and out["ui"]["images"]

    @torch.inference_mode()  # the host's own nodes, as its executor runs them
    def render(model, clip):
        positive = nodes.CLIPTextEncode().encode(clip, "a cat")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        samples = nodes.KSampler().sample(model, 3, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
        return (nodes.VAEDecode().decode(sd15["vae"], samples)[0][0].detach().clamp(0, 1) * 255).round()

    top = grid.shape[1] - 64 - 6
    for column, (model, clip) in enumerate(((sd15["model"], sd15["clip"]), (uce["model"], uce["clip"]))):
        left = 6 + column * (64 + 6)
        cell = (grid[0, top:top + 64, left:left + 64] * 255).round()
        assert torch.equal(cell, render(model, clip)), column
