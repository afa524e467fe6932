"""Our per-token text features against ComfyUI's own encoding of the same prompts, same checkpoint.

The erasure edits cross-attention K/V, so the features it solves with must be exactly the context
the host feeds to `attn2.to_k/to_v`. For SD1, SD2 and SDXL a seeded random checkpoint with
real-size text encoders is written; ComfyUI (unmodified, found through COMFYUI_PATH) builds its CLIP
from that file the way `comfy.sd.load_state_dict_guess_config` does, with the family's default clip
layer, and encodes each prompt with `clip.tokenize` + `clip.encode_from_tokens`; we encode the same
prompts with `CheckpointModel(path).text_encoder`. Token ids, prompt lengths and features must agree.

Tolerance: both sides run float32 on the CPU over the very same weights (fp16 in the file, exact in
float32), so they differ only by float32 rounding in differently ordered kernels (ComfyUI's own
attention and manual-cast linears vs transformers' SDPA). ComfyUI's CPU default (fp16 storage,
manual cast to float32 for compute) gives bit-identical features here, the checkpoint being fp16.
Measured: max |diff| ~1e-6 of the feature scale for every family. The bound,
|ours - comfy| <= 1e-4·|comfy| + 1e-4·max|comfy|, leaves two orders of magnitude of headroom for
other CPUs, while the mistakes it guards against (wrong layer,
missing or extra final norm, wrong padding id) move features by ~2e-1 of the scale or more; the
controls test checks that on ComfyUI's side, so this comparison cannot pass vacuously.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.host

FAMILIES = ("sd1", "sd2", "sdxl")
PROMPTS = (
    "",
    "a photo of a cat",
    "Van Gogh",
    "a red circle on a striped background, highly detailed",
    "3 dogs, 2.5 cats & 1 bird: 100% real!!! #wow - v1.0 (c) 2024",
)
# ComfyUI reads "( ... )" as prompt weighting: escape the parentheses so the text is taken literally
# there, exactly as our tokenizer (which knows no weighting syntax) takes it.
COMFY_PROMPTS = tuple(p.replace("(", "\\(").replace(")", "\\)") for p in PROMPTS)
RTOL = 1e-4
ATOL_OF_SCALE = 1e-4
SLOTS = {"clip_l": "l", "clip_h": "h", "clip_g": "g"}  # our encoder names -> ComfyUI tokenizer keys
COMFY_CONFIGS = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL"}  # comfy.supported_models classes
WRONG_LAYER = {"sd1": -2, "sd2": -1, "sdxl": -1}  # a layer other than the family default
PAD = {"l": 49407, "h": 0, "g": 0}  # what each ComfyUI tokenizer pads with (sd1_clip / sd2_clip / sdxl_clip)


def _comfy_root() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "hosts" / "ComfyUI"
    return Path(os.environ.get("COMFYUI_PATH") or default).resolve()


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules, imported in-process for CPU; skips when ComfyUI is absent or not importable."""
    root = _comfy_root()
    if not (root / "comfy" / "sd.py").is_file():
        pytest.skip(f"ComfyUI not found at {root} (set COMFYUI_PATH to a ComfyUI checkout)")
    added_path = str(root) not in sys.path
    if added_path:
        sys.path.insert(0, str(root))  # as ComfyUI's main.py does: its own top-level modules win
    before_modules = set(sys.modules)
    before_handlers = list(logging.getLogger().handlers)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)  # the default already; never parse pytest's argv
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported
        import comfy.model_management
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    except Exception as exc:  # noqa: BLE001 - e.g. torchvision or a requirement missing
        for name in set(sys.modules) - before_modules:
            if name == "comfy" or name.startswith("comfy."):
                del sys.modules[name]
        if added_path:
            sys.path.remove(str(root))
        pytest.skip(f"ComfyUI at {root} is not importable here: {type(exc).__name__}: {exc}")
    finally:
        # ComfyUI logs through the root logger at import time, which installs a stderr handler on
        # the root logger when it has none: take it off again.
        for handler in [h for h in logging.getLogger().handlers if h not in before_handlers]:
            logging.getLogger().removeHandler(handler)
    new_top = {name.split(".")[0] for name in set(sys.modules) - before_modules}
    assert "concept_eraser" not in new_top and "tests" not in new_top, new_top
    try:
        yield comfy
    finally:
        comfy.model_management.unload_all_models()
        # ComfyUI's modules (comfy.*, node_helpers) stay imported, like any installed package: no
        # name of ours clashes with them, and unloading torch-heavy modules is not safe. Only its
        # folder leaves sys.path, so it can shadow nothing for the tests that follow.
        if added_path and str(root) in sys.path:
            sys.path.remove(str(root))


def _comfy_clip(comfy, path: Path, family: str):
    """ComfyUI's CLIP for the checkpoint at `path`, built as load_state_dict_guess_config builds it.

    That loader would first detect the model config from the U-Net, which fails for the tiny U-Net,
    so the family's config class is taken directly; the rest is ComfyUI's path: clip_target,
    process_clip_state_dict, CLIP(...), load_sd(full_model=True)."""
    config_class = getattr(comfy.supported_models, COMFY_CONFIGS[family])
    model_config = config_class(dict(config_class.unet_config))
    sd = comfy.utils.load_torch_file(str(path))
    target = model_config.clip_target(state_dict=sd)
    clip_sd = model_config.process_clip_state_dict(sd)
    cpu = torch.device("cpu")
    options = {"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
    clip = comfy.sd.CLIP(target, embedding_directory=None, tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd), model_options=options)
    missing, _unexpected = clip.load_sd(clip_sd, full_model=True)
    # Only what ComfyUI itself tolerates as missing (sd.py: logit_scale, CLIP-L's text projection).
    missing = [k for k in missing if ".logit_scale" not in k and ".transformer.text_projection.weight" not in k]
    assert not missing, f"ComfyUI's CLIP is missing weights: {missing[:5]}"
    return clip


def _comfy_encode(clip, text: str, layer: int | None = None, pad_swap: bool = False):
    """(token ids per slot, word count per slot, features [77, d], pooled [p]) for one prompt, through ComfyUI."""
    tokens = clip.tokenize(text, return_word_ids=True)
    assert all(len(chunks) == 1 for chunks in tokens.values()), "test prompts fit one 77-token window"
    ids = {slot: [t for t, _w, _word in chunks[0]] for slot, chunks in tokens.items()}
    words = {slot: sum(1 for _t, _w, word in chunks[0] if word > 0) for slot, chunks in tokens.items()}
    if pad_swap:  # the other padding convention: EOS-padding where ComfyUI pads with 0 and vice versa
        tokens = {slot: [[(PAD["g"] if t == PAD["l"] else PAD["l"], w, word) if i > words[slot] + 1 else (t, w, word)
                          for i, (t, w, word) in enumerate(chunks[0])]] for slot, chunks in tokens.items()}
    if layer is not None:
        clip = clip.clone()
        clip.clip_layer(layer)
    features, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert features.shape[:2] == (1, 77), features.shape
    return ids, words, features[0].float(), pooled[0].float()


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, comfy, tmp_path_factory):
    """Everything the tests compare for one family; the checkpoint and both encoders are freed after."""
    from concept_eraser import CheckpointModel
    from concept_eraser.tiny import make_tiny_checkpoint

    family = request.param
    start = time.perf_counter()
    folder = tmp_path_factory.mktemp(f"comfy_features_{family}")
    path = make_tiny_checkpoint(folder / f"tiny_{family}.safetensors", family, seed=0, dtype=torch.float16, text="full")
    try:
        clip = _comfy_clip(comfy, path, family)
        encoded = [_comfy_encode(clip, p) for p in COMFY_PROMPTS]
        controls = {
            "wrong layer": _comfy_encode(clip, COMFY_PROMPTS[1], layer=WRONG_LAYER[family])[2],
            "wrong padding": _comfy_encode(clip, COMFY_PROMPTS[1], pad_swap=True)[2],
        }
        del clip
        comfy.model_management.unload_all_models()
        gc.collect()

        model = CheckpointModel(path)
        ours = model.text_encoder.encode(PROMPTS)
        arch = model.arch
        del model
        gc.collect()
    finally:
        path.unlink(missing_ok=True)
    data = {
        "family": family,
        "arch": arch,
        "comfy_ids": [e[0] for e in encoded],
        "comfy_words": [e[1] for e in encoded],
        "comfy": torch.stack([e[2] for e in encoded]),
        "comfy_pooled": torch.stack([e[3] for e in encoded]),
        "controls": controls,
        "ours": ours,
    }
    print(f"\n[{family}] built, encoded on both sides in {time.perf_counter() - start:.1f} s")
    return data


def _tolerance(reference: torch.Tensor) -> float:
    return ATOL_OF_SCALE * reference.abs().max().item()


def test_token_ids_match_comfy(case):
    from concept_eraser.tokenizer import EOS_ID, tokenize

    for prompt, comfy_ids in zip(PROMPTS, case["comfy_ids"]):
        assert set(comfy_ids) == {SLOTS[e.name] for e in case["arch"].encoders}
        for spec in case["arch"].encoders:
            slot = SLOTS[spec.name]
            pad = EOS_ID if spec.pad_token == "eos" else 0
            assert pad == PAD[slot], f"{spec.name} pads with {pad}, ComfyUI with {PAD[slot]}"
            assert list(tokenize(prompt, pad).ids) == comfy_ids[slot], (case["family"], spec.name, prompt)


def test_lengths_match_comfy_word_tokens(case):
    for prompt, length, words in zip(PROMPTS, case["ours"].lengths, case["comfy_words"]):
        assert {length - 2} == set(words.values()), (case["family"], prompt, length, words)


def test_features_match_comfy(case):
    ours, ref = case["ours"], case["comfy"]
    assert ours.prompts == PROMPTS
    assert ours.features.dtype == torch.float32
    assert ours.features.shape == ref.shape == (len(PROMPTS), 77, case["arch"].context_dim)
    assert torch.isfinite(ref).all()
    diff = (ours.features - ref).abs()
    scale = ref.abs().max().item()
    print(f"\n[{case['family']}] max |ours - comfy| = {diff.max().item():.3g} "
          f"({diff.max().item() / scale:.3g} of the feature scale {scale:.3g})")
    torch.testing.assert_close(ours.features, ref, rtol=RTOL, atol=_tolerance(ref))


def test_pooled_matches_comfy(case):
    """Where our encoder also gives the pooled embedding (SDXL: bigG's projected EOS state, which the
    U-Net reads through label_emb), it is ComfyUI's pooled output."""
    pooled = getattr(case["ours"], "pooled", None)
    if pooled is None:
        if case["family"] == "sdxl":
            pytest.skip("this encoder gives no pooled embedding")
        return
    ref = case["comfy_pooled"]
    assert pooled.shape == ref.shape, (pooled.shape, ref.shape)
    diff = (pooled - ref).abs().max().item()
    print(f"\n[{case['family']}] pooled: max |ours - comfy| = {diff:.3g} of scale {ref.abs().max().item():.3g}")
    torch.testing.assert_close(pooled.float(), ref, rtol=RTOL, atol=_tolerance(ref))


def test_controls_show_the_comparison_is_sensitive(case):
    """A wrong layer or padding convention on ComfyUI's side lands far outside the tolerance."""
    ref = case["comfy"][1]
    for name, feats in case["controls"].items():
        gap = (feats - ref).abs().max().item()
        print(f"\n[{case['family']}] {name}: max |diff| = {gap:.3g}")
        assert gap > 100 * _tolerance(case["comfy"]), (case["family"], name, gap)
