"""End to end in the real host: ComfyUI v0.3.64 started headless on the CPU with this repository linked into
its custom_nodes, driven over its HTTP/websocket API like the frontend drives it.

The example workflows (UI format, converted to API format here) run on generated SD1.5 and SDXL
checkpoints that ComfyUI's own detector recognises, at 64×64 with 2 steps (KPOP: 2 training steps). Checked:
the pack and its frontend module load; each example loads in the real frontend (headless Chromium) without a
link it has to repair; every example produces its images and files; the saved checkpoint loads back
through ComfyUI's loader and holds exactly the weights ComfyUI computes for the erased model; a branch
from the same loader renders bit-identically to a graph without the erase node, after an erase and
after a cancelled erase (so the loader's cached MODEL was never modified); bad inputs come back as node
errors that name the input.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import torch

from comfy_host import (PACK_DIR, checkpoint, chromium_binary, host_threads, import_comfy, load_pack, open_frontend,
                        release_comfy_path, start_browser, start_server)
from comfy_workflows import EXAMPLES, SOCKETS, examples, to_api

pytestmark = pytest.mark.host

SMALL = {"ConceptEraserPreview": {"steps": 2, "width": 64, "height": 64}}
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import_comfy()  # the in-process checks use the host's loader too
    base = tmp_path_factory.mktemp("comfy_server")
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    for family in ("sd15", "sdxl"):
        (ckpts / f"tiny_{family}.safetensors").symlink_to(checkpoint(family))
    from comfy_checkpoints import make_flux_like_file

    make_flux_like_file(ckpts / "flux_like.safetensors")
    srv = start_server(base)
    try:
        yield srv
    finally:
        srv.stop()
        release_comfy_path()


def error_messages(entry: dict) -> dict:
    return {kind: data for kind, data in entry["status"]["messages"] if kind.startswith("execution_")}


def assert_success(entry: dict) -> None:
    messages = error_messages(entry)
    assert entry["status"]["status_str"] == "success", messages.get("execution_error", messages)


def example(name: str, ckpt: str, **overrides) -> tuple[dict, dict]:
    workflow = json.loads((EXAMPLES / name).read_text())
    overrides = dict(SMALL, ConceptEraserLoadCheckpoint={"ckpt_name": ckpt}, **overrides)
    return workflow, to_api(workflow, overrides)


def node_id(prompt: dict, class_type: str, nth: int = 0) -> str:
    return [k for k, v in prompt.items() if v["class_type"] == class_type][nth]


# ---- loading -----------------------------------------------------------------------------------------

def test_server_loads_the_pack_and_its_frontend(server):
    info = server.get("/object_info")
    widget_types = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
    for node in SOCKETS:
        assert node in info, node
        declared = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        sockets = [(name, spec[0]) for name, spec in declared.items()
                   if isinstance(spec[0], str) and spec[0] not in widget_types]
        assert sockets == SOCKETS[node], node  # the link slots the examples use
    assert "ConceptEraserApplyPatch" in info
    log = server.log.read_text()
    # Only the pack's own import counts: ComfyUI's audio nodes fail without torchaudio, which CI leaves out.
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if PACK_DIR in line or "custom_nodes" in line], failed
    assert "concept_eraser" in log
    assert f"/extensions/{PACK_DIR}/concept_eraser.js" in server.get("/extensions")
    assert b"registerExtension" in server.get(f"/extensions/{PACK_DIR}/concept_eraser.js")
    templates = server.get("/api/workflow_templates")
    assert sorted(templates[PACK_DIR]) == sorted(Path(n).stem for n in examples())


def test_shipped_examples_are_the_defined_ones():
    for name, workflow in examples().items():
        assert json.loads((EXAMPLES / name).read_text()) == workflow, f"run python tests/comfy_workflows.py ({name})"


# ---- the frontend ------------------------------------------------------------------------------------

ERASE_WIDGETS = """(() => {
  const node = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'ConceptEraserErase');
  return {visible: node.widgets.filter(w => !w.hidden).map(w => [w.name, w.label || w.name]),
          height: node.size[1], needed: node.computeSize()[1]};
})()"""


# Values entered in the Erase node's number widgets, as the frontend keeps them (its change handler rounds and
# clamps): 0 for λ (> 0), an arrow up from SPACE's default iterations.
ENTERED = """(() => {
  const node = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'ConceptEraserErase');
  const widget = name => node.widgets.find(w => w.name === name);
  const lam = widget('uce_lam'), iterations = widget('space_iterations');
  lam.callback(0);
  iterations.callback(iterations.value + iterations.options.step2);
  return {lam: lam.value, iterations: iterations.value};
})()"""


async def frontend_session(server, port: int, workflow: dict) -> dict:
    """One page of the frontend: each shipped example loaded (console messages meanwhile, the graph it
    serialises), then `workflow` with its Erase node switched from UCE to SPACE."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        tools = await open_frontend(session, port, server)
        await tools.call("Runtime.enable")
        out = {"examples": {}}
        for name in examples():
            tools.events.clear()
            await tools.evaluate(f"window.comfyAPI.app.app.loadGraphData({(EXAMPLES / name).read_text()})")
            await asyncio.sleep(0.5)
            out["examples"][name] = (tools.console(),
                                     await tools.evaluate("window.comfyAPI.app.app.graph.serialize()"))
        await tools.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)})")
        await asyncio.sleep(1)
        out["uce"] = await tools.evaluate(ERASE_WIDGETS)
        await tools.evaluate("""(() => {
          const node = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'ConceptEraserErase');
          const method = node.widgets.find(w => w.name === 'method');
          method.value = 'space';
          method.callback(method.value);
        })()""")
        await asyncio.sleep(0.5)
        out["space"] = await tools.evaluate(ERASE_WIDGETS)
        out["saved"] = await tools.evaluate("window.comfyAPI.app.app.graph.serialize()")
        out["prompt"] = await tools.evaluate("window.comfyAPI.app.app.graphToPrompt().then(p => p.output)")
        out["entered"] = await tools.evaluate(ENTERED)
        await tools.ws.close()
    return out


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    """What ComfyUI's real frontend, in headless Chromium, did with the examples (see frontend_session)."""
    if chromium_binary() is None:
        pytest.skip("no chromium binary for the frontend tests (Debian: apt install chromium)")
    workflow, _ = example("concept_eraser_sd15_erase_preview_save.json", "tiny_sd15.safetensors")
    for node in workflow["nodes"]:
        if node["type"] == "ConceptEraserLoadCheckpoint":
            node["widgets_values"]["ckpt_name"] = "tiny_sd15.safetensors"
    browser, port = start_browser(tmp_path_factory.mktemp("chromium"))
    try:
        seen = asyncio.run(asyncio.wait_for(frontend_session(server, port, workflow), 300))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
    return {"workflow": workflow, **seen}


def test_examples_load_in_the_frontend_without_repairs(frontend):
    """ComfyUI's real frontend loads every example as it is: no link it has to repair (its link fixer logs
    'Expected node to match patched data' when a target_slot does not point at the linked input), and its own
    serialisation of the loaded graph has the file's links, slots included."""
    for name, (console, saved) in frontend["examples"].items():
        assert not [m for m in console if "patched data" in m or "bad link" in m.lower()], (name, console)
        workflow = json.loads((EXAMPLES / name).read_text())
        assert sorted(saved["links"]) == sorted(workflow["links"]), name


def test_frontend_shows_only_the_chosen_methods_parameters(server, frontend):
    """In ComfyUI's real frontend (headless Chromium): the Erase node shows only the chosen method's
    parameters, labelled by their own names; switching the method switches them; the pack's nodes save their
    widget values by name; and the frontend's own API-format prompt agrees with the conversion these tests use."""
    workflow, seen = frontend["workflow"], frontend
    optional = server.get("/object_info/ConceptEraserErase")["ConceptEraserErase"]["input"]["optional"]
    own = ["method", "targets", "guides", "preserve", "strength"]
    for method in ("uce", "space"):
        expected = own + [n for n, spec in optional.items() if spec[1]["concept_eraser_method"] in (method, "")]
        visible = seen[method]["visible"]
        assert [name for name, _ in visible] == expected, method
        assert all(label == optional[name][1]["concept_eraser_label"] for name, label in visible if name in optional)
    assert seen["uce"]["height"] < 700 and seen["space"]["height"] <= seen["space"]["needed"] + 1
    erase = next(n for n in seen["saved"]["nodes"] if n["type"] == "ConceptEraserErase")
    assert isinstance(erase["widgets_values"], dict) and erase["widgets_values"]["method"] == "space"
    assert erase["widgets_values"]["targets"] == "Van Gogh" and "uce_lam" in erase["widgets_values"]
    ours = to_api(workflow)
    theirs = seen["prompt"]
    assert set(ours) == set(theirs)
    for node, entry in ours.items():
        assert theirs[node]["class_type"] == entry["class_type"]
        for name, value in entry["inputs"].items():
            if not (entry["class_type"] == "ConceptEraserErase" and name == "method"):
                assert theirs[node]["inputs"][name] == value, (node, name)
    assert theirs[node_id(ours, "ConceptEraserErase")]["inputs"]["method"] == "space"
    # the least λ the widget keeps is shown as itself (not 5e-324 shown as 0.00); arrows land on round values
    assert seen["entered"] == {"lam": 0.01, "iterations": 501}


# ---- the examples -----------------------------------------------------------------------------------

def test_sd15_example_erases_previews_and_saves_a_checkpoint(server):
    from safetensors import safe_open

    workflow, prompt = example("concept_eraser_sd15_erase_preview_save.json", "tiny_sd15.safetensors")
    erase = node_id(prompt, "ConceptEraserErase")
    # a patch file of the same erasure, to rebuild the expected weights in this process
    prompt["900"] = {"class_type": "ConceptEraserSave", "inputs": {"erasure": [erase, 2], "format": "patch",
                                                                   "folder": "output", "filename_prefix": "check/sd15"}}
    entry = server.run(prompt, workflow)
    assert_success(entry)
    outputs = entry["outputs"]
    grid = server.image(outputs[node_id(prompt, "ConceptEraserPreview")]["images"][0])
    assert grid.size == (2 * 64 + 3 * 6, 28 + 2 * (22 + 64))  # two rows: original | erased, labelled
    assert server.image(outputs[node_id(prompt, "ConceptEraserReport")]["images"][0]).size == (960, 420)
    assert "Van Gogh" in outputs[node_id(prompt, "ConceptEraserReport")]["text"][0]
    assert outputs[erase]["text"][0].startswith("uce: erased Van Gogh in ")  # the headline, shown in the node
    saved = server.base / "models" / "checkpoints" / "concept_eraser" / "sd15_no_van_gogh_00001_.safetensors"
    patch_file = server.base / "output" / "check" / "sd15_00001_.safetensors"
    assert saved.is_file() and patch_file.is_file()
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["workflow"]) == workflow and json.loads(meta["prompt"])[erase]["inputs"]["method"] == "uce"
    steps = json.loads(meta["concept_eraser.steps"])
    assert [s["method"] for s in steps] == ["uce"] and steps[0]["source"]["name"] == "tiny_sd15.safetensors"
    assert meta["concept_eraser.erased"] == "Van Gogh"
    check_saved_checkpoint(saved, patch_file)


def check_saved_checkpoint(saved: Path, patch_file: Path) -> None:
    """Loaded back through ComfyUI's loader, the saved checkpoint holds bit for bit the weights ComfyUI
    computes for the original model with the erasure applied (here: by the Apply node, from the patch file
    the same run wrote), and untouched tensors as they were."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    torch.set_num_threads(host_threads())  # the server's thread count: same float reductions
    pack = load_pack()
    erasures = folder_paths.get_folder_paths("erasures")
    folder_paths.add_model_folder_path("erasures", str(patch_file.parent), is_default=True)
    try:
        original = comfy.sd.load_checkpoint_guess_config(str(checkpoint("sd15")), output_vae=False,
                                                         te_model_options={"dtype": torch.float32})[:2]
        applied = pack.NODE_CLASS_MAPPINGS["ConceptEraserApplyPatch"]().apply(*original, patch_file.name, 1.0)
        model = applied["result"][0]
        edited = [k for k in model.patches]
        comfy.model_management.load_models_gpu([model], force_patch_weights=True)
        expected = {k: v.detach().clone() for k, v in model.model_state_dict().items() if k in edited}
        comfy.model_management.unload_all_models()
        back = comfy.sd.load_checkpoint_guess_config(str(saved), output_vae=False, output_clip=False)[0]
        state = back.model_state_dict()
        assert len(expected) == 14
        for key, value in expected.items():
            assert torch.equal(state[key].cpu(), value.cpu()), key
        file = comfy.utils.load_torch_file(str(saved))
        source = comfy.utils.load_torch_file(str(checkpoint("sd15")))
        for key in ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_out.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.k_proj.weight"):
            assert torch.equal(file[key].float(), source[key].float()), key
    finally:
        folder_paths.folder_names_and_paths["erasures"][0][:] = erasures
        comfy.model_management.unload_all_models()


def test_sdxl_example_erases_previews_and_saves_a_lora(server):
    from safetensors import safe_open

    workflow, prompt = example("concept_eraser_sdxl_erase_preview_save.json", "tiny_sdxl.safetensors")
    entry = server.run(prompt, workflow)
    assert_success(entry)
    grid = server.image(entry["outputs"][node_id(prompt, "ConceptEraserPreview")]["images"][0])
    assert grid.size[0] == 2 * 64 + 18
    lora = server.base / "models" / "erasures" / "concept_eraser" / "sdxl_no_van_gogh_00001_.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert meta["concept_eraser.format"] == "lora" and meta["concept_eraser.architecture"] == "sdxl"
    assert len([n for n in names if n.endswith(".lora_up.weight")]) == 62  # every K/V of the 31 cross-attentions
    server.free()


def test_chain_example_runs_two_methods(server):
    from safetensors import safe_open

    workflow, prompt = example("concept_eraser_chain_uce_then_rece.json", "tiny_sd15.safetensors")
    entry = server.run(prompt, workflow)
    assert_success(entry)
    assert entry["outputs"][node_id(prompt, "ConceptEraserPreview")]["images"]
    saved = server.base / "models" / "checkpoints" / "concept_eraser" / "sd15_no_van_gogh_picasso_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        steps = json.loads(f.metadata()["concept_eraser.steps"])
    assert [(s["method"], s["concepts"]["erase"]) for s in steps] == \
        [("uce", ["Van Gogh"]), ("rece", ["Pablo Picasso"])]


def test_kpop_example_trains_in_the_server(server):
    """KPOP as ComfyUI runs it (every node under the executor's torch.inference_mode()), a few steps on the tiny
    checkpoint: the erased model previews, the patch and the learned prompt are saved."""
    from safetensors import safe_open

    quick = {"kpop_steps": 2, "kpop_ddim_steps": 2, "kpop_prompt_size": 1, "kpop_resolution": 64}
    workflow, prompt = example("concept_eraser_sd15_kpop.json", "tiny_sd15.safetensors", ConceptEraserErase=quick)
    entry = server.run(prompt, workflow)
    assert_success(entry)
    assert entry["outputs"][node_id(prompt, "ConceptEraserPreview")]["images"]
    assert "method: kpop" in entry["outputs"][node_id(prompt, "ConceptEraserReport")]["text"][0]
    patch = server.base / "models" / "erasures" / "concept_eraser" / "sd15_kpop_no_van_gogh_00001_.safetensors"
    learned = server.base / "output" / "concept_eraser" / "sd15_kpop_prompt_00001_.safetensors"
    for path, kind in ((patch, "patch"), (learned, "learned_prompt")):
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["concept_eraser.format"] == kind
    server.free()


# ---- the input model stays untouched ----------------------------------------------------------------

def plain_graph(seed: int, prefix: str) -> dict:
    """The same loader, then the core sampler: a graph without any erase node."""
    return {
        "1": {"class_type": "ConceptEraserLoadCheckpoint", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode",
              "inputs": {"clip": ["1", 1], "text": "a painting in the style of Van Gogh"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 6.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def erase_graph(targets: str, method: str = "uce") -> dict:
    return {
        "1": {"class_type": "ConceptEraserLoadCheckpoint", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "10": {"class_type": "ConceptEraserErase", "inputs": {"model": ["1", 0], "clip": ["1", 1], "method": method,
                                                             "targets": targets, "guides": "", "preserve": "",
                                                             "strength": 1.0}},
        "11": {"class_type": "ConceptEraserReport", "inputs": {"erasure": ["10", 2]}},
    }


def cached_nodes(entry: dict) -> list[str]:
    return error_messages(entry).get("execution_cached", {}).get("nodes", [])


def render_twice(server, seed: int) -> None:
    """Render the plain graph on the loader output the previous prompt used (cached), then from scratch;
    the pixels must agree bit for bit."""
    first = server.run(plain_graph(seed, f"plain_{seed}_shared"))
    assert_success(first)
    assert "1" in cached_nodes(first), "the loader output was not shared with the previous prompt"
    server.free()
    second = server.run(plain_graph(seed, f"plain_{seed}_fresh"))
    assert_success(second)
    assert "1" not in cached_nodes(second)
    a, b = (server.image(e["outputs"]["7"]["images"][0]) for e in (first, second))
    assert a.size == b.size == (64, 64) and a.tobytes() == b.tobytes()


def test_other_branch_renders_as_without_the_erase_node(server):
    server.free()
    entry = server.run(erase_graph("Van Gogh"))
    assert_success(entry)
    render_twice(server, seed=5)


def test_cancelled_erase_leaves_the_input_model_unchanged(server):
    import aiohttp

    server.free()
    prompt = erase_graph("Pablo Picasso")

    async def run_and_cancel() -> tuple[str, list]:
        client = uuid.uuid4().hex
        seen = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client}") as ws:
                async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client}) as r:
                    prompt_id = (await r.json())["prompt_id"]
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(message.data)
                    seen.append(data["type"])
                    if data["type"] == "progress" and data["data"].get("node") == "10" and "interrupt" not in seen:
                        seen.append("interrupt")
                        async with session.post(f"{server.url}/interrupt", json={}) as r:
                            assert r.status == 200
                    if data["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                        break
        return prompt_id, seen

    prompt_id, seen = asyncio.run(asyncio.wait_for(run_and_cancel(), 600))
    assert "interrupt" in seen and seen[-1] == "execution_interrupted", seen
    entry = server.wait(prompt_id)
    assert "execution_interrupted" in error_messages(entry)
    assert "11" not in entry.get("outputs", {})
    render_twice(server, seed=6)


# ---- errors -----------------------------------------------------------------------------------------

def test_bad_inputs_are_node_errors_naming_the_field(server):
    # checked before running: no targets (the node's own validation), a parameter out of its range
    for inputs, field in (({"targets": "  "}, "targets"), ({"uce_lam": -1.0}, "uce_lam")):
        prompt = erase_graph("Van Gogh")
        prompt["10"]["inputs"].update(inputs)
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": "tests"})
        assert status == 400, body
        errors = body["node_errors"]["10"]["errors"]
        assert errors[0]["extra_info"]["input_name"] == field and errors[0]["details"].startswith(field), errors
    # found when running, before anything is patched: an unknown method parameter, a model that is not SD
    prompt = erase_graph("Van Gogh")
    prompt["10"]["inputs"]["uce_lamda"] = 0.3
    failure = error_messages(server.run(prompt))["execution_error"]
    assert failure["node_id"] == "10" and failure["exception_message"].startswith("uce_lamda: unknown parameter")
    prompt = erase_graph("Van Gogh")
    prompt["1"]["inputs"]["ckpt_name"] = "flux_like.safetensors"
    failure = error_messages(server.run(prompt))["execution_error"]
    assert failure["node_id"] == "1" and failure["exception_message"].startswith("ckpt_name: Flux"), failure
