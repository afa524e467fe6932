"""Screenshots of a real run for the README: `python tests/comfy_screenshots.py [out_dir]` (default docs/).

Starts ComfyUI headless on the CPU with the pack linked in and the generated tiny SD1.5 checkpoint
under the name the example workflow asks for, opens its frontend in headless Chromium (driven over
the DevTools protocol), loads each example workflow, queues it, waits for it to finish and saves a
screenshot. It also reads back, from the live frontend, which Erase Concept inputs are visible: only
the chosen method's parameters should be. Needs ComfyUI (COMFYUI_PATH) and a `chromium` binary. The
checkpoint is random, so the images are noise; the screenshots show the nodes, widgets and outputs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_host import REPO, checkpoint, chromium_binary, import_comfy, open_frontend, start_browser, start_server  # noqa: E402
from comfy_workflows import EXAMPLES  # noqa: E402

SHOTS = {"concept_eraser_sd15_erase_preview_save.json": "comfyui_erase_preview_save.png",
         "concept_eraser_chain_uce_then_rece.json": "comfyui_chain_uce_then_rece.png"}
# close-ups of one node after the run: shot → (workflow, node type)
CLOSE_UPS = {"comfyui_erase_node_after_run.png": ("concept_eraser_sd15_erase_preview_save.json", "ConceptEraserErase")}
WINDOW = (1800, 1050)
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
            "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False}


async def capture(server, port: int, out: Path) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        tools = await open_frontend(session, port, server)
        for name, shot in SHOTS.items():
            workflow = json.loads((EXAMPLES / name).read_text())
            for node in workflow["nodes"]:
                if node["type"] == "ConceptEraserPreview":
                    node["widgets_values"].update(width=128, height=128, steps=4)
            await tools.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)})")
            await asyncio.sleep(2)
            visible = await tools.evaluate(
                "window.comfyAPI.app.app.graph._nodes.filter(n => n.type === 'ConceptEraserErase')"
                ".map(n => [n.widgets.find(w => w.name === 'method').value,"
                " n.widgets.filter(w => !w.hidden).map(w => w.label || w.name)])")
            print(f"{name}: visible Erase Concept inputs: {visible}")
            before = set(server.get("/history"))
            await tools.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1)")
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                new = set(server.get("/history")) - before
                if new:
                    entry = server.get(f"/history/{new.pop()}")
                    print(f"  run: {next(iter(entry.values()))['status']['status_str']}")
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(3)
            data = (await tools.call("Page.captureScreenshot", format="png"))["data"]
            save(base64.b64decode(data), out / shot)
            for close_up, (source, node_type) in CLOSE_UPS.items():
                if source == name:
                    await capture_node(tools, node_type, out / close_up)
        await tools.ws.close()


async def capture_node(tools, node_type: str, path: Path) -> None:
    """A screenshot of one node (title bar included) at zoom 1, moved to the canvas' top left corner."""
    x, y, width, height = await tools.evaluate(f"""(() => {{
      const app = window.comfyAPI.app.app, ds = app.canvas.ds;
      const node = app.graph._nodes.find(n => n.type === '{node_type}');
      const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30, rect = app.canvas.canvas.getBoundingClientRect();
      ds.scale = 1;
      ds.offset[0] = 60 - node.pos[0];
      ds.offset[1] = 60 + title - node.pos[1];
      app.canvas.setDirty(true, true);
      return [rect.left + 50, rect.top + 50, node.size[0] + 20, node.size[1] + title + 20];
    }})()""")
    await asyncio.sleep(1)
    clip = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
    data = (await tools.call("Page.captureScreenshot", format="png", clip=clip))["data"]
    save(base64.b64decode(data), path, width=None)


def save(png: bytes, path: Path, width: int | None = 1500) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else REPO / "docs"
    if not chromium_binary():
        print("no chromium binary found", file=sys.stderr)
        return 1
    import_comfy()
    base = Path(tempfile.mkdtemp(prefix="concept_eraser_shots_"))
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "v1-5-pruned-emaonly-fp16.safetensors").symlink_to(checkpoint("sd15"))
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(SETTINGS))
    server = start_server(base)
    browser, port = start_browser(base / "chromium", WINDOW)
    try:
        asyncio.run(capture(server, port, out))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
