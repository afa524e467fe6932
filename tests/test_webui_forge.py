"""Concept Eraser inside a real Forge ("Forge 2": lllyasviel/stable-diffusion-webui-forge, gradio 4), headless
on the CPU (`--always-cpu`).

Skipped, saying why, unless these are set:

    CONCEPT_ERASER_FORGE          the Forge folder (launch.py; repositories/ with huggingface_guess,
                                  stable-diffusion-webui-assets and BLIP at the commits its launch_utils pins)
    CONCEPT_ERASER_FORGE_PYTHON   its venv's python (default: <Forge>/../venv/bin/python)
    and a checkpoint Forge recognises as SD 1.5 (U-Net 320 wide, context 768, full CLIP-L and VAE), either
    CONCEPT_ERASER_FORGE_CKPT     an existing file, or
    CONCEPT_ERASER_A1111 (+ _PYTHON) an A1111 install whose ldm code generates one (random, ~640 MB, ~1 min)
    CONCEPT_ERASER_BROWSER_PYTHON / CONCEPT_ERASER_SCREENSHOTS as for test_webui_a1111.py

Forge loads the checkpoint lazily (at the first generation; here at the first erase).
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

FORGE = os.environ.get("CONCEPT_ERASER_FORGE")
FORGE_PYTHON = os.environ.get("CONCEPT_ERASER_FORGE_PYTHON") or (
    str(Path(FORGE).resolve().parent / "venv" / "bin" / "python") if FORGE else None)
CKPT = os.environ.get("CONCEPT_ERASER_FORGE_CKPT")
A1111 = os.environ.get("CONCEPT_ERASER_A1111")
A1111_PYTHON = os.environ.get("CONCEPT_ERASER_A1111_PYTHON") or (
    str(Path(A1111).resolve().parent / "a1111-venv" / "bin" / "python") if A1111 else None)
BROWSER_PYTHON = os.environ.get("CONCEPT_ERASER_BROWSER_PYTHON")
SCREENSHOTS = os.environ.get("CONCEPT_ERASER_SCREENSHOTS")

if not FORGE or not (Path(FORGE) / "launch.py").exists() or not (Path(FORGE) / "modules_forge").exists():
    pytest.skip("no Forge: set CONCEPT_ERASER_FORGE to a stable-diffusion-webui-forge folder (and "
                "CONCEPT_ERASER_FORGE_PYTHON to its venv python)", allow_module_level=True)
if not FORGE_PYTHON or not Path(FORGE_PYTHON).exists():
    pytest.skip(f"Forge's python {FORGE_PYTHON} does not exist: set CONCEPT_ERASER_FORGE_PYTHON",
                allow_module_level=True)
if not (CKPT and Path(CKPT).exists()) and not (A1111 and A1111_PYTHON and Path(A1111_PYTHON).exists()):
    pytest.skip("no SD 1.5 checkpoint for Forge: set CONCEPT_ERASER_FORGE_CKPT, or CONCEPT_ERASER_A1111 to generate "
                "one with its ldm code", allow_module_level=True)

pytestmark = pytest.mark.host
NAME = "forge-sd15"


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data = tmp_path_factory.mktemp("forge")
    webui = WebUIServer("forge", FORGE, FORGE_PYTHON, data, f"{NAME}.safetensors")
    if CKPT and Path(CKPT).exists():
        (webui.ckpt_dir / f"{NAME}.safetensors").symlink_to(Path(CKPT).resolve())
    else:
        make_checkpoint(A1111_PYTHON, A1111, webui.ckpt_dir, "full", NAME)
    try:
        webui.started_in = webui.start()
        yield webui
    finally:
        webui.stop()


def test_the_extension_loads_and_registers_its_tab(forge):
    log = forge.log.read_text()
    assert "Error loading script: concept_eraser_tab.py" not in log
    assert not any("concept_eraser" in trace[:3000] for trace in log.split("Traceback")[1:]), log[-3000:]
    config = forge.get("/config")
    props = [c.get("props", {}) for c in config["components"]]
    assert "Concept Eraser" in [p.get("label") for p in props]
    ids = {p.get("elem_id") for p in props}
    assert {"concept_eraser_erase_button", "concept_eraser_status", "concept_eraser_uce_lam"} <= ids
    assert "concept_eraser.js" in urllib.request.urlopen(forge.url + "/").read().decode()


def test_status_route_before_and_after_the_lazy_load(forge):
    status = forge.get(f"{API}/status")
    assert status["host"] == "Forge"
    code, payload = forge.post(f"{API}/erase", {"erase": "van gogh", "params": {"lam": 0}})
    assert (code, payload["field"]) == (400, "params.lam")
    assert forge.post(f"{API}/erase", {"erase": "x"})[0] == 200  # loads the checkpoint, then erases
    assert forge.post(f"{API}/restore")[0] == 200
    status = forge.get(f"{API}/status")
    assert status["checkpoint"].startswith(f"{NAME}.safetensors") and status["erasures"] == []


def test_host_text_features_equal_the_solvers_own_encoder(forge):
    from concept_eraser.checkpoint import CheckpointModel

    prompts = ["van gogh", "", "a photo of a cat, oil painting by monet"]
    code, host = forge.post(f"{API}/encode", {"prompts": prompts})
    assert code == 200, host
    own = CheckpointModel(forge.ckpt_dir / f"{NAME}.safetensors").text_encoder.encode(prompts)
    assert tuple(host["lengths"]) == own.lengths
    torch.testing.assert_close(torch.tensor(host["features"]), own.features, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["uce", "erasepro"])
def test_erase_in_place_and_restore_bit_identically(forge, method):
    text_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    original = forge.get(f"{API}/weights")["tensors"]
    original_text = forge.get(f"{API}/weights?keys={text_key}")["tensors"]
    code, erased = forge.post(f"{API}/erase", {"method": method, "erase": "van gogh", "preserve": "monet"})
    assert code == 200, erased
    after = forge.get(f"{API}/weights")["tensors"]
    assert all(after[k]["sha256"] != original[k]["sha256"] for k in original)
    if method == "erasepro":
        assert forge.get(f"{API}/weights?keys={text_key}")["tensors"] != original_text
    forge.txt2img("van gogh")  # generating with the erased model works
    assert forge.post(f"{API}/restore")[0] == 200
    assert forge.get(f"{API}/weights")["tensors"] == original
    assert forge.get(f"{API}/weights?keys={text_key}")["tensors"] == original_text


@pytest.mark.parametrize("method", list(QUICK))
def test_every_method_changes_the_target_image_and_restore_gives_it_back_bit_for_bit(forge, method):
    erased = check_erase_changes_the_image_and_restore_gives_it_back(forge, method)
    assert erased["erased"]["method"] == method


def test_forge_lora_merges_never_undo_an_erasure_nor_get_baked_in(forge):
    base = forge.get(f"{API}/weights")["tensors"]
    uce = {"erase": "van gogh", "params": {"token_policy": "last_word"}}
    assert forge.post(f"{API}/erase", uce)[0] == 200
    erased = forge.get(f"{API}/weights")["tensors"]
    code, lora = forge.post(f"{API}/save", {"format": "lora", "name": "forge-erasure-lora"})
    assert code == 200, lora
    img_erased = forge.txt2img("van gogh")
    assert forge.post(f"{API}/restore")[0] == 200
    img_original = forge.txt2img("van gogh")
    img_lora = forge.txt2img(f"van gogh {lora['prompt']}")  # Forge merges the LoRA into the weights
    assert abs(img_original - img_erased).mean() > 0.5
    assert abs(img_lora - img_erased).mean() < 0.1 * abs(img_original - img_erased).mean()
    assert forge.post(f"{API}/erase", uce)[0] == 200  # while Forge holds the merged LoRA and its backup
    assert forge.get(f"{API}/weights")["tensors"] == erased
    assert abs(forge.txt2img("van gogh") - img_erased).max() == 0
    forge.txt2img(f"van gogh {lora['prompt']}")
    assert forge.post(f"{API}/restore")[0] == 200
    assert forge.get(f"{API}/weights")["tensors"] == base
    assert abs(forge.txt2img("van gogh") - img_original).max() == 0


def test_saved_checkpoint_loads_back_with_exactly_the_patched_weights(forge):
    from concept_eraser.safetensors_io import SafetensorsReader
    from concept_eraser_webui.live import digest

    assert forge.post(f"{API}/erase", {"erase": "van gogh"})[0] == 200
    code, saved = forge.post(f"{API}/save", {"format": "checkpoint", "name": "forge-erased"})
    assert code == 200, saved
    assert forge.post(f"{API}/save", {"format": "checkpoint", "name": "forge-erased"})[0] == 409
    file = SafetensorsReader(saved["path"])
    titles = [m["title"] for m in forge.get("/sdapi/v1/sd-models")]
    title = next(t for t in titles if t.startswith("forge-erased.safetensors"))
    assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": title})[0] == 200
    forge.txt2img("a cat")  # Forge loads the selected checkpoint at the next generation
    loaded = forge.get(f"{API}/weights")
    assert loaded["checkpoint"].startswith("forge-erased.safetensors")
    for key, info in loaded["tensors"].items():  # fp32 on the CPU: the fp16 file upcast, bit for bit
        assert info["sha256"] == digest(file.get(key).float()), key
    assert forge.get(f"{API}/status")["erasures"] == []
    original = next(t for t in titles if t.startswith(f"{NAME}.safetensors"))
    assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": original})[0] == 200
    forge.txt2img("a cat")
    source = SafetensorsReader(forge.ckpt_dir / f"{NAME}.safetensors")
    assert forge.get(f"{API}/weights")["tensors"][K0]["sha256"] == digest(source.get(K0).float())


@pytest.mark.skipif(not BROWSER_PYTHON, reason="set CONCEPT_ERASER_BROWSER_PYTHON to a python with selenium (and "
                                                "install Debian's chromium + chromium-driver) for the browser test")
def test_the_tab_in_a_headless_browser(forge, tmp_path):
    shots = Path(SCREENSHOTS) / "forge" if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([BROWSER_PYTHON, "-c", BROWSER, forge.url, str(shots)], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "params.lam" in result["bad_message"]
    assert "UCE erased van gogh" in result["erase_message"]
    assert "1 erasure(s) active" in result["status_erased"] and "keeping monet" in result["status_erased"]
    assert [c.split(" · ")[0] for c in result["captions"]] == ["original", "erased"] * 2, result["captions"]
    assert "saved" in result["save_message"] and (forge.ckpt_dir / "browser-erased.safetensors").exists()
    assert "restored" in result["restore_message"] and result["status_restored"].startswith("No erasure active")
    assert "learnable prompt" in result["method_help"] and "KPOP erased van gogh" in result["kpop_message"]
    assert "restored" in result["kpop_restore_message"]
