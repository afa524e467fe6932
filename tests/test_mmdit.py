"""Flux.1 and SD3 (MMDiT) on tiny seeded files with the real key layouts: detection and refusals, the command line
(all-in-one files and diffusion-model-only files with text encoders beside), the UCE solve on their entry
projections, and the LoRA through ComfyUI's own LoRA key mapping. Features against ComfyUI: test_mmdit_comfy."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from concept_eraser.checkpoint import CheckpointModel
from concept_eraser.cli import main
from concept_eraser.concepts import Concepts
from concept_eraser.errors import InvalidParameterError, UnsupportedModelError
from concept_eraser.models.arch import CONTEXT, ENCODER_PREFIXES, POOLED, UNET_PREFIX, detect
from concept_eraser.tiny import MMDIT_FAMILIES, tiny_mmdit_files, tiny_mmdit_parts
from concept_eraser.tokenizer import use_t5_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "photo", "of", "cat", "dog", "tree", "painting", "by", "van", "gogh"]


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    """A small word-level tokenizer.json with T5's special ids (<pad> 0, </s> 1), set as the T5 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("t5tok") / "tokenizer.json"
    tokenizer.save(str(path))
    use_t5_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmdit")
    return {(family, layout): tiny_mmdit_files(folder, family, layout)
            for family in MMDIT_FAMILIES for layout in ("all_in_one", "separate")}


def shapes_of(family, layout="separate", drop=(), swap=None, swap_back=None):
    """The shapes CheckpointModel sees for a tiny model: encoders mounted under the all-in-one names; `swap`
    (to, from): one slot given the other's encoder (and `swap_back` too: the two exchanged)."""
    parts = tiny_mmdit_parts(family)
    given = dict(parts)
    for to, source in filter(None, (swap, swap_back)):
        parts[to] = given[source]
    shapes = {}
    for slot, tensors in parts.items():
        if slot in drop:
            continue
        prefix = ("" if layout == "separate" else UNET_PREFIX) if slot == "model" else ENCODER_PREFIXES[slot]
        shapes |= {prefix + k: tuple(v.shape) for k, v in tensors.items()}
    return shapes


@pytest.mark.parametrize("layout", ["separate", "all_in_one"])
@pytest.mark.parametrize("family,title,variant,maps,encoders", [
    ("flux_dev", "Flux.1", "dev", ("txt_in.weight", "vector_in.in_layer.weight"), ("t5xxl", "clip_l")),
    ("flux_schnell", "Flux.1", "schnell", ("txt_in.weight", "vector_in.in_layer.weight"), ("t5xxl", "clip_l")),
    ("sd3", "Stable Diffusion 3", "2 joint blocks", ("context_embedder.weight", "y_embedder.mlp.0.weight"),
     ("clip_l", "clip_g", "t5xxl")),
])
def test_detects_each_family_in_each_layout_with_the_files_own_key_names(layout, family, title, variant, maps,
                                                                       encoders):
    arch = detect(shapes_of(family, layout))
    prefix = UNET_PREFIX if layout == "all_in_one" else ""
    assert (arch.title, arch.variant, arch.denoiser, arch.denoiser_prefix) == (title, variant, "mmdit", prefix)
    assert arch.map_keys(CONTEXT) == (prefix + maps[0],) and arch.map_keys(POOLED) == (prefix + maps[1],)
    assert tuple(e.name for e in arch.encoders) == encoders
    assert arch.is_denoiser_key(prefix + "txt_in.bias") and not arch.is_denoiser_key(ENCODER_PREFIXES["t5xxl"] + "x")


@pytest.mark.parametrize("family,change,message", [
    ("flux_dev", {"drop": ("t5xxl",)}, r"the t5xxl \(txt_in\) text encoder is missing.*--t5\)"),
    ("flux_dev", {"drop": ("clip_l", "t5xxl")},
     r"the t5xxl \(txt_in\) and clip_l \(vector_in\) text encoders are missing.*--t5, --clip-l\)"),
    ("flux_dev", {"swap": ("t5xxl", "clip_l")}, r"t5xxl slot holds a CLIP text model \(64 wide\), not T5"),
    ("flux_dev", {"swap": ("clip_l", "t5xxl")}, r"clip_l slot holds a T5 encoder \(192 wide\), not CLIP"),
    ("sd3", {"swap": ("clip_l", "clip_g")}, "96 .clip_l. and 96 .clip_g. wide, but y_embedder reads 160"),
    ("sd3", {"drop": ("clip_l", "clip_g", "t5xxl")}, r"Stable Diffusion 3: the clip_l \(.*\), clip_g \(.*\) and "
     r"t5xxl \(context_embedder\) text encoders are missing: .* give each .*--clip-l, --clip-g, --t5\)"),
    ("sd3", {"swap": ("clip_l", "clip_g"), "swap_back": ("clip_g", "clip_l")},
     r"clip_l text encoder \(3 layers × 96\) is larger than the clip_g one \(3 × 64\): they look swapped.*"
     r"--clip-l / --clip-g"),
    ("sd3", {"drop": ("t5xxl",)}, "the t5xxl .context_embedder. text encoder is missing"),
])
def test_wrong_or_missing_text_encoders_are_refused_naming_what_was_found(family, change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        detect(shapes_of(family, **change))


def test_a_clip_g_in_fluxs_clip_l_slot_is_refused_by_width():
    shapes = shapes_of("flux_dev")
    parts = tiny_mmdit_parts("sd3")
    shapes = {k: v for k, v in shapes.items() if not k.startswith(ENCODER_PREFIXES["clip_l"])}
    shapes |= {ENCODER_PREFIXES["clip_l"] + k: tuple(v.shape) for k, v in parts["clip_g"].items()}
    with pytest.raises(UnsupportedModelError, match="clip_l text encoder is 96 wide, but vector_in reads 64"):
        detect(shapes)


def test_other_transformer_layouts_are_refused_by_name():
    flux = shapes_of("flux_dev")
    chroma = {k: v for k, v in flux.items() if not k.startswith("vector_in.")} | {
        "distilled_guidance_layer.in_proj.weight": (64, 64)}
    with pytest.raises(UnsupportedModelError, match="Chroma"):
        detect(chroma)
    with pytest.raises(UnsupportedModelError, match="Flux.1: unknown transformer layout: txt_in.weight is missing"):
        detect({k: v for k, v in flux.items() if not k.startswith("txt_in.")})
    with pytest.raises(UnsupportedModelError, match="Flux transformer in diffusers layout"):
        detect({"single_transformer_blocks.0.attn.to_q.weight": (3, 3), "x_embedder.weight": (3, 3)})
    with pytest.raises(UnsupportedModelError, match="MMDiT model in diffusers layout"):
        detect({"transformer_blocks.0.attn.add_k_proj.weight": (3, 3)})
    with pytest.raises(UnsupportedModelError, match="Flux.1: a scaled-fp8 file .txt_in.scale_weight"):
        detect(flux | {"txt_in.scale_weight": (), "scaled_fp8": (0,)})
    with pytest.raises(UnsupportedModelError, match="a T5 text encoder only"):
        detect({k: tuple(v.shape) for k, v in tiny_mmdit_parts("flux_dev")["t5xxl"].items()})


@pytest.mark.parametrize("denoiser,encoder", [
    (("positional_encoding", "register_tokens", "cond_seq_linear.weight"), "pile_t5xl"),  # AuraFlow
    (("layers.0.attention.qkv.weight", "cap_embedder.1.weight"), "qwen3_4b"),  # Lumina 2
])
def test_an_all_in_one_file_of_another_transformer_is_refused_naming_what_was_found(denoiser, encoder):
    """ComfyUI stores every denoiser under model.diffusion_model.: one without a U-Net's keys is not taken for a
    U-Net lacking its text encoder."""
    shapes = {UNET_PREFIX + k: (4, 4) for k in denoiser} | {
        f"text_encoders.{encoder}.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4)}
    with pytest.raises(UnsupportedModelError, match=re.escape(
            f"found a denoiser under '{UNET_PREFIX}' that is neither a U-Net nor a Flux.1 / SD3 transformer "
            f"(first keys: {UNET_PREFIX}{denoiser[0]}, ") + f".*, with text encoders {encoder}$"):
        detect(shapes)


def test_encoder_files_are_checked_when_mounted(files, tmp_path):
    allinone = files[("flux_dev", "all_in_one")]["model"]
    separate = files[("flux_dev", "separate")]
    with pytest.raises(InvalidParameterError, match="^--t5: flux_dev.safetensors already holds a t5xxl"):
        CheckpointModel(allinone, text_encoders={"t5xxl": separate["t5xxl"]}, encoder_fields={"t5xxl": "--t5"})
    scaled = tmp_path / "t5_scaled.safetensors"
    save_file({"scaled_fp8": torch.zeros(0), "shared.weight": torch.zeros(2, 2)}, str(scaled))
    with pytest.raises(InvalidParameterError, match="^t5xxl: t5_scaled.safetensors is a scaled-fp8 file"):
        CheckpointModel(separate["model"], text_encoders={"t5xxl": scaled, "clip_l": separate["clip_l"]})


@pytest.mark.parametrize("family,layout", [("flux_dev", "separate"), ("sd3", "all_in_one")])
def test_uce_on_the_entry_projections_solves_its_objective_over_every_segments_last_word(files, t5_tokenizer,
                                                                                        family, layout):
    """The edited maps satisfy UCE's normal equations with columns picked here from the features: the last word of
    each segment (SD3: CLIP's at length − 2 behind BOS, T5's at length − 2 behind no BOS, 77 further on)."""
    from concept_eraser.api import erase

    paths = dict(files[(family, layout)])
    model = CheckpointModel(paths.pop("model"), text_encoders=paths)
    concepts = Concepts.build(["cat"], ["dog"], ["tree"])
    params = {"token_policy": "last_word", "lam": 0.5, "preserve_scale": 1.0, "pooled_edit": True}
    result = erase(model, "uce", concepts, params)
    enc = model.text_encoder.encode(["cat", "dog", "tree", ""])
    assert enc.features.shape == (4, 256 if family.startswith("flux") else 154, model.arch.context_dim)

    def last_words(i):
        return [s.start + max(s.lengths[i] - 2, 0) for s in enc.parts]

    if family == "sd3":  # "cat": BOS cat EOS in CLIP's 77, cat EOS in T5's
        assert last_words(0) == [1, 77]
        assert enc.features[0, 80:, 160:].abs().max() > 0 and enc.features[0, :77, 160:].abs().max() == 0
    c_e, c_g = enc.features[0, last_words(0)].T.double(), enc.features[1, last_words(1)].T.double()
    c_p = torch.cat([enc.features[i, last_words(i)] for i in (2, 3)]).T.double()
    for m in model.arch.maps:
        w_o = model.weight(m.key).double()
        w = result.patch.apply_to(m.key, model.weight(m.key).float()).double()
        if m.reads == POOLED:
            c_e, c_g = enc.pooled[0:1].T.double(), enc.pooled[1:2].T.double()
            c_p = enc.pooled[2:4].T.double()
        grad = (w @ c_e - w_o @ c_g) @ c_e.T + (w - w_o) @ c_p @ c_p.T + 0.5 * (w - w_o)
        assert (w - w_o).norm() > 1e-3 * w_o.norm()
        assert grad.norm() < 1e-3 * (w_o @ c_g @ c_e.T).norm(), m.key


def test_rece_and_space_edit_the_context_map_and_by_default_the_pooled_one(files, t5_tokenizer):
    from concept_eraser.api import erase

    paths = dict(files[("flux_schnell", "separate")])
    model = CheckpointModel(paths.pop("model"), text_encoders=paths)
    for method, params in (("rece", {"epochs": 1}), ("space", {})):
        result = erase(model, method, Concepts.build(["cat"]), params)
        # pooled_edit auto is on for an MMDiT: its pooled vector modulates every block
        assert result.report["params"]["pooled_edit"] is True
        assert set(result.patch.edits) == {"txt_in.weight", "vector_in.in_layer.weight"}, method
        assert result.report["layers"]["txt_in.weight"]["relative_change"] > 0
        assert "cat" in result.report["probe"]["targets"]


@pytest.mark.parametrize("method,reason", [("kpop", "no cross-attention")])
def test_methods_that_cannot_edit_an_mmdit_refuse_up_front(files, t5_tokenizer, method, reason):
    from concept_eraser.api import erase

    model = CheckpointModel(files[("flux_dev", "all_in_one")]["model"])
    with pytest.raises(InvalidParameterError, match=f"^method: {method} cannot edit Flux.1: .*{reason}"):
        erase(model, method, Concepts.build(["cat"]))
    with pytest.raises(InvalidParameterError, match="^expand: .*Flux.1 reads prompts through t5xxl"):
        erase(model, "uce", Concepts.build(["cat"]), {"expand": 2})
    assert model._text_encoder is None  # refused before any encoder was built


def run_cli(*args):
    return main([str(a) for a in args])


def test_cli_erases_a_flux_file_with_encoders_beside_as_lora_checkpoint_and_patch(files, t5_tokenizer, tmp_path,
                                                                                 capsys):
    paths = files[("flux_dev", "separate")]
    common = [paths["model"], "--t5", paths["t5xxl"], "--clip-l", paths["clip_l"], "--t5-tokenizer", t5_tokenizer,
              "--erase", "cat", "--preserve", "dog", "--set", "token_policy=last_word", "--set", "pooled_edit=true"]
    for fmt in ("lora", "checkpoint", "patch"):
        assert run_cli("erase", *common, "--format", fmt, "--out", tmp_path / f"{fmt}.safetensors") == 0
    out = capsys.readouterr().out
    assert "Flux.1 (dev): text-conditioning maps txt_in.weight 64×192 (context)" in out
    with safe_open(str(paths["model"]), "pt") as src, safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as dst:
        assert list(dst.keys()) == list(src.keys())  # the model file's own names, no encoder mounted in it
        changed = [k for k in src.keys() if not torch.equal(src.get_tensor(k), dst.get_tensor(k))]
        assert changed == ["txt_in.weight", "vector_in.in_layer.weight"]
        meta = dst.metadata()
    step = json.loads(meta["concept_eraser.steps"])[0]
    assert meta["concept_eraser.erased"] == "cat" and step["source"]["text_encoders"] == {
        "t5xxl": "flux_dev_t5xxl.safetensors", "clip_l": "flux_dev_clip_l.safetensors"}
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as lora:
        names = sorted({k.split(".")[0] for k in lora.keys()})
        assert json.loads(lora.metadata()["concept_eraser.steps"])[0]["architecture"] == "flux"
    assert names == ["lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
    # apply the patch to the same file: the diffusion model alone, no text encoder needed
    applied = tmp_path / "applied.safetensors"
    assert run_cli("apply", paths["model"], tmp_path / "patch.safetensors", "--out", applied) == 0
    assert run_cli("inspect", paths["model"]) == 0
    assert "Flux.1 (dev): text-conditioning maps txt_in.weight" in capsys.readouterr().out
    with safe_open(str(applied), "pt") as a, \
            safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as c:
        assert all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in c.keys())


def test_a_patch_applies_across_the_two_file_layouts(files, t5_tokenizer, tmp_path):
    """The same Flux weights as an all-in-one checkpoint (`model.diffusion_model.txt_in.weight`, ComfyUI's names)
    and as a diffusion-model-only file (`txt_in.weight`): a patch made on either fits the other, and gives there
    what erasing that file directly gives."""
    separate, together = files[("flux_dev", "separate")], files[("flux_dev", "all_in_one")]
    encoders = ["--t5", separate["t5xxl"], "--clip-l", separate["clip_l"]]
    concept = ["--t5-tokenizer", t5_tokenizer, "--erase", "cat"]
    made = {"separate": [separate["model"], *encoders], "together": [together["model"]]}
    for name, source in made.items():
        patch = tmp_path / f"{name}-patch.safetensors"
        assert run_cli("erase", *source, *concept, "--format", "patch", "--out", patch) == 0
        assert run_cli("erase", *source, *concept, "--out", tmp_path / f"{name}.safetensors") == 0
    for patch, onto in (("separate", "together"), ("together", "separate")):
        out = tmp_path / f"{patch}-on-{onto}.safetensors"
        assert run_cli("apply", made[onto][0], tmp_path / f"{patch}-patch.safetensors", "--out", out) == 0
        with safe_open(str(out), "pt") as got, safe_open(str(tmp_path / f"{onto}.safetensors"), "pt") as direct:
            assert list(got.keys()) == list(direct.keys())
            for key in got.keys():
                torch.testing.assert_close(got.get_tensor(key), direct.get_tensor(key), rtol=0, atol=1e-3)


def test_cli_erases_an_all_in_one_sd3_checkpoint_keeping_its_names(files, t5_tokenizer, tmp_path, capsys):
    path = files[("sd3", "all_in_one")]["model"]
    assert run_cli("erase", path, "--t5-tokenizer", t5_tokenizer, "--erase", "van gogh", "--out",
                   tmp_path / "sd3.safetensors") == 0
    with safe_open(str(path), "pt") as src, safe_open(str(tmp_path / "sd3.safetensors"), "pt") as dst:
        assert list(dst.keys()) == list(src.keys())
        changed = [k for k in src.keys() if not torch.equal(src.get_tensor(k), dst.get_tensor(k))]
    # the per-token map and, pooled_edit being auto (on for an MMDiT), the pooled one
    assert changed == ["model.diffusion_model.context_embedder.weight", "model.diffusion_model.y_embedder.mlp.0.weight"]
    assert run_cli("inspect", tmp_path / "sd3.safetensors") == 0
    assert "model.diffusion_model.y_embedder.mlp.0.weight  64×160  reads pooled" in capsys.readouterr().out


def test_cli_refuses_sd3s_clip_encoders_swapped_naming_the_options(files, t5_tokenizer, tmp_path, capsys):
    """Widths alone cannot tell: CLIP-L ⊕ CLIP-G is as wide as CLIP-G ⊕ CLIP-L, and a CLIP-L file may carry a
    text_projection.weight as CLIP-G's does."""
    paths = files[("sd3", "separate")]
    clip_l = tmp_path / "clip_l_with_projection.safetensors"
    with safe_open(str(paths["clip_l"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | {"text_projection.weight": torch.eye(64, dtype=torch.float16)}, str(clip_l))
    out = tmp_path / "out.safetensors"
    assert run_cli("erase", paths["model"], "--t5", paths["t5xxl"], "--clip-l", paths["clip_g"], "--clip-g", clip_l,
                   "--t5-tokenizer", t5_tokenizer, "--erase", "cat", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --clip-l: Stable Diffusion 3: the clip_l text encoder (3 layers × 96) is larger "
                          "than the clip_g one (3 × 64): they look swapped"), err
    assert "(command line: --clip-l / --clip-g)" in err and not out.exists()


@pytest.mark.parametrize("extra,field,message", [
    ([], "--t5-tokenizer", "Flux.1 reads prompts through T5: give T5's tokenizer.json"),
    (["--t5-tokenizer", "{missing}"], "--t5-tokenizer", "is not a file"),
    (["--t5-tokenizer", "{model}"], "--t5-tokenizer", "is not a tokenizer.json"),
    (["--t5", "{t5}"], "model", "the clip_l .vector_in. text encoder is missing"),
    (["--t5", "{t5}", "--clip-l", "{clip}", "--clip-g", "{clip}"], "--clip-g", "Flux.1 reads no clip_g text encoder"),
    (["--t5", "{clip}", "--clip-l", "{clip}"], "--t5", "t5xxl slot holds a CLIP text model"),
    (["--t5", "{t5}", "--clip-l", "{t5}"], "--clip-l", "clip_l slot holds a T5 encoder"),
    (["--method", "kpop", "--t5-tokenizer", "{tok}"], "method", "kpop cannot edit Flux.1"),
])
def test_cli_refuses_bad_flux_input_naming_the_field(files, t5_tokenizer, tmp_path, capsys, extra, field, message):
    paths = files[("flux_dev", "separate")]
    names = {"missing": tmp_path / "none.json", "model": paths["model"], "clip": paths["clip_l"], "tok": t5_tokenizer,
             "t5": paths["t5xxl"]}
    args = [a.format(**names) for a in extra]
    if "--t5" not in args:
        args += ["--t5", str(paths["t5xxl"]), "--clip-l", str(paths["clip_l"])]
    out = tmp_path / "out.safetensors"
    assert run_cli("erase", paths["model"], *args, "--erase", "cat", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}: ") and re.search(message, err), err
    assert not out.exists()


def test_the_lora_is_applied_by_comfyuis_own_lora_key_mapping(files, t5_tokenizer, tmp_path):
    """comfy/lora.py maps the LoRA's names onto Flux's and SD3's weights (model_lora_keys_unet, load_lora) and the
    weight it applies (up · down · alpha / rank) is the erasure's."""
    from tests.comfy_host import import_comfy, release_comfy_path

    import_comfy()
    try:
        import comfy.lora
        import comfy.model_base
        import comfy.model_detection
    finally:
        release_comfy_path()
    from safetensors.torch import load_file

    from concept_eraser.api import erase
    from concept_eraser.checkpoint import save_lora

    for family, base in (("flux_dev", comfy.model_base.Flux), ("sd3", comfy.model_base.SD3)):
        paths = dict(files[(family, "separate")])
        config = comfy.model_detection.model_config_from_unet(load_file(paths["model"]), "")
        assert type(config).__name__ == {"flux_dev": "Flux", "sd3": "SD3"}[family]  # ComfyUI's own detection
        model = CheckpointModel(paths.pop("model"), text_encoders=paths)
        result = erase(model, "uce", Concepts.build(["cat"]), {"token_policy": "last_word", "pooled_edit": True})
        lora_path = save_lora(result.patch, tmp_path / f"{family}_lora.safetensors", arch=model.arch)

        class HostModel(base):  # what model_lora_keys_unet reads: the class, its config, the diffusion model's keys
            def __init__(self):
                torch.nn.Module.__init__(self)
                self.model_config = config

            def state_dict(self):
                return {"diffusion_model." + k: None for k in model.keys() if model.arch.is_denoiser_key(k)}

        key_map = comfy.lora.model_lora_keys_unet(HostModel(), {})
        with safe_open(str(lora_path), "pt") as f:
            lora = {k: f.get_tensor(k) for k in f.keys()}
        patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
        assert sorted(patches) == sorted("diffusion_model." + k for k in result.patch.edits)
        for key in result.patch.edits:
            original = model.weight(key).float()
            applied = patches["diffusion_model." + key].calculate_weight(original.clone(), key, 1.0, 1.0, None,
                                                                        lambda w: w)
            torch.testing.assert_close(applied, result.patch.apply_to(key, original), rtol=1e-4, atol=1e-5)
            assert not torch.equal(applied, original)


def test_a_t5_file_with_only_the_tied_embed_tokens_gives_the_same_features(files, t5_tokenizer, tmp_path):
    paths = dict(files[("flux_schnell", "separate")])
    with safe_open(str(paths["t5xxl"]), "pt") as f:
        tensors = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "t5_embed_tokens.safetensors"))
    model = paths.pop("model")
    features = [CheckpointModel(model, text_encoders=dict(paths, t5xxl=t5)).text_encoder.encode(["a cat"]).features
                for t5 in (paths["t5xxl"], tmp_path / "t5_embed_tokens.safetensors")]
    assert torch.equal(*features)
