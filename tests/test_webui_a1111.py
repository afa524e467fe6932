"""Concept Eraser inside a real AUTOMATIC1111 WebUI 1.10, headless on the CPU.

Needs an A1111 install (not on PyPI; ../shared/hosts/a1111/setup.sh builds one from repository
snapshots) and is skipped, saying why, when these are not set:

    CONCEPT_ERASER_A1111          the WebUI folder (holding launch.py and repositories/)
    CONCEPT_ERASER_A1111_PYTHON   its venv's python (default: <WebUI>/../a1111-venv/bin/python)
    CONCEPT_ERASER_BROWSER_PYTHON a python with selenium, for the browser test (Debian's chromium and
                                  chromium-driver must be installed); that test is skipped without it
    CONCEPT_ERASER_SCREENSHOTS    folder for the browser test's screenshots (optional)

The WebUI runs from a temporary data folder (`--data-dir`) with this repository linked into its
extensions/ and a generated tiny SD1 checkpoint (random weights; text encoder 64 wide with one head,
so the solver's own encoder rebuilds it exactly): the install itself is not modified.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from test_webui_realhost import (
    API,
    BROWSER,
    K0,
    QUICK,
    WebUIServer,
    check_erase_changes_the_image_and_restore_gives_it_back,
    make_checkpoint,
)

WEBUI = os.environ.get("CONCEPT_ERASER_A1111")
WEBUI_PYTHON = os.environ.get("CONCEPT_ERASER_A1111_PYTHON") or (
    str(Path(WEBUI).resolve().parent / "a1111-venv" / "bin" / "python") if WEBUI else None)
BROWSER_PYTHON = os.environ.get("CONCEPT_ERASER_BROWSER_PYTHON")
SCREENSHOTS = os.environ.get("CONCEPT_ERASER_SCREENSHOTS")

if not WEBUI or not (Path(WEBUI) / "launch.py").exists():
    pytest.skip("no AUTOMATIC1111 WebUI: set CONCEPT_ERASER_A1111 to an A1111 1.10 folder (and "
                "CONCEPT_ERASER_A1111_PYTHON to its venv python); ../shared/hosts/a1111/setup.sh builds one",
                allow_module_level=True)
if not WEBUI_PYTHON or not Path(WEBUI_PYTHON).exists():
    pytest.skip(f"the WebUI's python {WEBUI_PYTHON} does not exist: set CONCEPT_ERASER_A1111_PYTHON",
                allow_module_level=True)

pytestmark = pytest.mark.host


def server(tmp_path_factory, name: str) -> WebUIServer:
    data = tmp_path_factory.mktemp(name)
    webui = WebUIServer("a1111", WEBUI, WEBUI_PYTHON, data, "tiny-sd1.safetensors")
    make_checkpoint(WEBUI_PYTHON, WEBUI, webui.ckpt_dir, "tiny", "tiny-sd1")
    return webui


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    webui = server(tmp_path_factory, "a1111")
    try:
        webui.started_in = webui.start()
        yield webui
    finally:
        webui.stop()


def test_the_extension_loads_and_registers_its_tab(webui):
    log = webui.log.read_text()
    assert "Error loading script: concept_eraser_tab.py" not in log
    assert not any("concept_eraser" in trace[:3000] for trace in log.split("Traceback")[1:]), log[-3000:]
    config = webui.get("/config")
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "Concept Eraser" in labels
    assert {"concept_eraser_erase_button", "concept_eraser_preview_button", "concept_eraser_restore_button",
            "concept_eraser_save_button", "concept_eraser_status", "concept_eraser_method",
            "concept_eraser_uce_lam"} <= ids
    assert "concept_eraser.js" in urllib.request.urlopen(webui.url + "/").read().decode()


def test_status_and_methods_through_the_route(webui):
    status = webui.get(f"{API}/status")
    assert status["host"] == "AUTOMATIC1111 WebUI" and status["checkpoint"].startswith("tiny-sd1.safetensors")
    assert status["erasures"] == []
    assert "uce" in webui.get(f"{API}/methods")


def test_host_text_features_equal_the_solvers_own_encoder(webui):
    from concept_eraser.checkpoint import CheckpointModel

    prompts = ["van gogh", "", "a photo of a cat, oil painting by monet"]
    status, host = webui.post(f"{API}/encode", {"prompts": prompts})
    assert status == 200, host
    own = CheckpointModel(webui.ckpt_dir / "tiny-sd1.safetensors").text_encoder.encode(prompts)
    assert tuple(host["lengths"]) == own.lengths
    torch.testing.assert_close(torch.tensor(host["features"]), own.features, rtol=0, atol=2e-5)


def test_bad_input_is_a_400_naming_the_field(webui):
    status, payload = webui.post(f"{API}/erase", {"erase": "van gogh", "params": {"lam": -1}})
    assert (status, payload["field"]) == (400, "params.lam") and "out of range" in payload["error"]
    status, payload = webui.post(f"{API}/erase", {"method": "magic", "erase": "x"})
    assert (status, payload["field"]) == (400, "method")
    status, payload = webui.post(f"{API}/save", {"format": "zip", "name": "x"})
    assert (status, payload["field"]) == (400, "format")


def test_erase_changes_cross_attention_and_restore_gives_the_original_bytes(webui):
    original = webui.get(f"{API}/weights")["tensors"]
    assert len(original) == 32
    status, erased = webui.post(f"{API}/erase", {"method": "uce", "erase": ["van gogh"], "preserve": ["monet"]})
    assert status == 200, erased
    assert erased["status"]["changed_tensors"] == 32 and "1 erasure(s) active" in erased["status"]["text"]
    after = webui.get(f"{API}/weights")["tensors"]
    assert all(after[k]["sha256"] != original[k]["sha256"] and after[k]["changed"] for k in original)
    progress = webui.get("/sdapi/v1/progress")
    assert progress["state"]["job"] == ""  # the job ended
    status, restored = webui.post(f"{API}/restore")
    assert status == 200 and restored["restored_tensors"] == 32
    assert webui.get(f"{API}/weights")["tensors"] == original


@pytest.mark.parametrize("method", ["rece", "space", "erasepro"])
def test_every_method_erases_in_place_and_restores_bit_identically(webui, method):
    original = webui.get(f"{API}/weights")
    text_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    original_text = webui.get(f"{API}/weights?keys={text_key}")["tensors"][text_key]
    features = webui.post(f"{API}/encode", {"prompts": ["van gogh"]})[1]["features"]
    status, erased = webui.post(f"{API}/erase", {"method": method, "erase": "van gogh", "preserve": "monet"})
    assert status == 200, erased
    changed = webui.get(f"{API}/weights")
    assert changed["tensors"] != original["tensors"]
    if method == "erasepro":  # edits the text encoder too: the host's own encoder now reads differently
        assert webui.get(f"{API}/weights?keys={text_key}")["tensors"][text_key]["sha256"] != original_text["sha256"]
        assert webui.post(f"{API}/encode", {"prompts": ["van gogh"]})[1]["features"] != features
    assert webui.post(f"{API}/restore")[0] == 200
    assert webui.get(f"{API}/weights")["tensors"] == original["tensors"]
    assert webui.get(f"{API}/weights?keys={text_key}")["tensors"][text_key] == original_text
    assert webui.post(f"{API}/encode", {"prompts": ["van gogh"]})[1]["features"] == features


@pytest.mark.parametrize("method", list(QUICK))
def test_every_method_changes_the_target_image_and_restore_gives_it_back_bit_for_bit(webui, method):
    erased = check_erase_changes_the_image_and_restore_gives_it_back(webui, method)
    assert erased["erased"]["method"] == method


@pytest.mark.parametrize("params", [{}, {"edit_unet": False}, {"token_policy": "first_k"}],
                         ids=["defaults", "text_encoder_only", "first_k"])
def test_erasepro_in_place_renders_like_its_saved_checkpoint_with_an_empty_negative_prompt(webui, params):
    """The WebUI's default negative prompt is empty: after an in-place ErasePro its conditioning must be what
    the same erasure saved as a checkpoint and loaded fresh gives (finite: no black images). Loading that file
    drops the in-place erasure, which the status and the console must say."""
    import numpy as np

    name = "erasepro-" + "-".join(f"{k}_{v}" for k, v in params.items())
    status, erased = webui.post(f"{API}/erase", {"method": "erasepro", "erase": "van gogh", "params": params})
    assert status == 200, erased
    in_place = [webui.txt2img(prompt) for prompt in ("van gogh", "a cat")]
    status, saved = webui.post(f"{API}/save", {"format": "checkpoint", "name": name})
    assert status == 200, saved
    original_title = webui.get(f"{API}/status")["checkpoint"]
    assert webui.post("/sdapi/v1/options", {"sd_model_checkpoint": saved["title"]})[0] == 200
    try:
        status = webui.get(f"{API}/status")
        assert status["erasures"] == [] and "dropped" in status["notice"] and "van gogh" in status["text"]
        assert status["notice"] in webui.log.read_text()  # on the console, where the WebUI shows warnings
        from_file = [webui.txt2img(prompt) for prompt in ("van gogh", "a cat")]
    finally:
        assert webui.post("/sdapi/v1/options", {"sd_model_checkpoint": original_title})[0] == 200
    for mine, theirs in zip(in_place, from_file):
        assert mine.std() > 1.0, "a flat (black: NaN) image after the in-place erase"
        assert np.abs(mine - theirs).mean() < 1.0  # the file is fp16, the live weights fp32 (--no-half)


def test_saved_checkpoint_loads_back_with_exactly_the_patched_weights(webui):
    from concept_eraser.safetensors_io import SafetensorsReader
    from concept_eraser_webui.live import digest

    source = SafetensorsReader(webui.ckpt_dir / "tiny-sd1.safetensors")
    assert webui.post(f"{API}/erase", {"erase": "van gogh", "params": {"token_policy": "last_word"}})[0] == 200
    assert webui.post(f"{API}/erase", {"erase": "picasso"})[0] == 200  # stacked
    status, saved = webui.post(f"{API}/save", {"format": "checkpoint", "name": "tiny-erased"})
    assert status == 200, saved
    assert webui.post(f"{API}/save", {"format": "checkpoint", "name": "tiny-erased"})[0] == 409  # no silent overwrite
    path = Path(saved["path"])
    assert path.parent == webui.ckpt_dir and path.with_suffix(".yaml").exists()
    titles = [m["title"] for m in webui.get("/sdapi/v1/sd-models")]
    assert saved["title"] in titles
    file = SafetensorsReader(path)
    steps = json.loads(file.metadata["concept_eraser.steps"])
    assert [s["concepts"]["erase"] for s in steps] == [["van gogh"], ["picasso"]]
    assert not torch.equal(file.get(K0), source.get(K0))
    status, _ = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": saved["title"]})
    assert status == 200
    loaded = webui.get(f"{API}/weights")
    assert loaded["checkpoint"].startswith("tiny-erased.safetensors")
    for key, info in loaded["tensors"].items():  # --no-half: the fp16 file upcast, bit for bit
        assert info["sha256"] == digest(file.get(key).float()), key
    status = webui.get(f"{API}/status")
    assert status["erasures"] == [] and "picasso" in status["text"]  # the file says what it had erased
    original_title = next(t for t in titles if t.startswith("tiny-sd1.safetensors"))
    assert webui.post("/sdapi/v1/options", {"sd_model_checkpoint": original_title})[0] == 200
    back = webui.get(f"{API}/weights")["tensors"]
    assert back[K0]["sha256"] == digest(source.get(K0).float())  # the erased model did not stay in memory





@pytest.mark.skipif(not BROWSER_PYTHON, reason="set CONCEPT_ERASER_BROWSER_PYTHON to a python with selenium (and "
                                                "install Debian's chromium + chromium-driver) for the browser test")
def test_the_tab_in_a_headless_browser(webui, tmp_path):
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([BROWSER_PYTHON, "-c", BROWSER, webui.url, str(shots)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status_initial"].startswith("No erasure active on tiny-sd1.safetensors")
    assert "params.lam" in result["bad_message"]
    assert "UCE erased van gogh" in result["erase_message"]
    assert "1 erasure(s) active" in result["status_erased"] and "keeping monet" in result["status_erased"]
    assert "seed 777" in result["preview_message"]
    assert [c.split(" · ")[0] for c in result["captions"]] == ["original", "erased"] * 2, result["captions"]
    assert "saved" in result["save_message"] and (webui.ckpt_dir / "browser-erased.safetensors").exists()
    assert "restored 32 tensors" in result["restore_message"]
    assert result["status_restored"].startswith("No erasure active")
    assert "learnable prompt" in result["method_help"] and "KPOP erased van gogh" in result["kpop_message"]
    assert "restored" in result["kpop_restore_message"]
    assert (shots / "concept_eraser_tab.png").exists()


def test_the_builtin_lora_loader_applies_the_erasure_lora_and_its_backups_never_undo_an_erasure(webui):
    """hosts.md §9: the LoRA extension backs weights up on first use and restores that backup whenever the
    set of LoRAs changes; erasing or restoring while it holds a backup must neither lose the erasure nor
    bake the LoRA in."""
    base = webui.get(f"{API}/weights")["tensors"]
    uce = {"erase": "van gogh", "params": {"token_policy": "last_word"}}  # a rank-2 edit: it fits a LoRA
    assert webui.post(f"{API}/erase", uce)[0] == 200
    erased = webui.get(f"{API}/weights")["tensors"]
    status, lora = webui.post(f"{API}/save", {"format": "lora", "name": "erasure-lora"})
    assert status == 200, lora
    img_erased = webui.txt2img("van gogh")
    assert webui.post(f"{API}/restore")[0] == 200
    img_original = webui.txt2img("van gogh")
    img_lora = webui.txt2img(f"van gogh {lora['prompt']}")  # the LoRA extension edits the weights in place
    assert abs(img_original - img_erased).mean() > 1.0  # the erasure is visible on this random model
    assert abs(img_lora - img_erased).mean() < 0.05 * abs(img_original - img_erased).mean()  # LoRA == erasure
    # erase while the LoRA extension holds a backup of the original weights (the LoRA was just used)
    assert webui.post(f"{API}/erase", uce)[0] == 200
    assert webui.get(f"{API}/weights")["tensors"] == erased  # solved on W, not on W + LoRA
    assert abs(webui.txt2img("van gogh") - img_erased).max() == 0  # the stale backup did not undo it
    webui.txt2img(f"van gogh {lora['prompt']}")  # LoRA on top of the erasure: a fresh backup of the erased W
    assert webui.post(f"{API}/restore")[0] == 200
    assert webui.get(f"{API}/weights")["tensors"] == base  # the LoRA was not baked into the restored weights
    assert abs(webui.txt2img("van gogh") - img_original).max() == 0


@pytest.fixture(scope="module")
def api_only(tmp_path_factory):
    webui = server(tmp_path_factory, "a1111-nowebui")
    try:
        webui.start(extra=("--nowebui",))
        yield webui
    finally:
        webui.stop()


def test_the_route_exists_with_nowebui(api_only):
    status = api_only.get(f"{API}/status")
    assert status["checkpoint"].startswith("tiny-sd1.safetensors") and status["erasures"] == []
    assert api_only.request("GET", "/config")[0] == 404  # no UI at all
    before = api_only.get(f"{API}/weights")["tensors"]
    code, payload = api_only.post(f"{API}/erase", {"erase": ["van gogh"], "guide": "a painter"})
    assert code == 200 and payload["status"]["erasures"][0]["guide"] == ["a painter"]
    assert api_only.get(f"{API}/weights")["tensors"] != before
    code, payload = api_only.post(f"{API}/erase", {"erase": []})
    assert (code, payload["field"]) == (400, "erase")
    assert api_only.post(f"{API}/restore")[0] == 200
    assert api_only.get(f"{API}/weights")["tensors"] == before
