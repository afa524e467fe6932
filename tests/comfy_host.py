"""Shared by the ComfyUI host tests: finding and importing the real ComfyUI, loading this repository as a
node pack the way ComfyUI does, and the generated host-loadable checkpoints (made once per process).

ComfyUI is found through COMFYUI_PATH, by default the unmodified v0.3.64 beside the project
(../shared/hosts/ComfyUI). Set CONCEPT_ERASER_TEST_CACHE to a folder to keep the generated checkpoints
between sessions (they are rebuilt when this generator changes).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "concept_eraser_comfy_pack"
PACK_DIR = "concept_eraser"  # the pack's folder name under custom_nodes in the test server
_FILES: dict[str, Path] = {}
_TMP: list[Path] = []


def host_threads() -> int:
    """Torch threads for host tests: 1 by default. On shared CI-sized machines (2 cores, other jobs
    running) one thread is several times faster than two fighting over the cores; set
    CONCEPT_ERASER_TEST_THREADS to use more."""
    return max(1, int(os.environ.get("CONCEPT_ERASER_TEST_THREADS", "1")))


def comfy_root() -> Path:
    default = REPO / ".." / "shared" / "hosts" / "ComfyUI"
    return Path(os.environ.get("COMFYUI_PATH") or default).resolve()


def require_comfy() -> Path:
    """ComfyUI's folder, or skip the calling test with the reason."""
    root = comfy_root()
    if not (root / "comfy" / "sd.py").is_file() or not (root / "main.py").is_file():
        pytest.skip(f"ComfyUI not found at {root} (set COMFYUI_PATH to a ComfyUI checkout)")
    return root


def import_comfy():
    """Import ComfyUI in this process for CPU (its folder first on sys.path, as its main.py runs it).
    Returns the `nodes` module; skips when ComfyUI is absent or not importable here."""
    root = require_comfy()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    handlers = list(logging.getLogger().handlers)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management
        import comfy.sd
        import folder_paths
        import nodes
    except Exception as exc:  # noqa: BLE001 - e.g. a requirement of ComfyUI missing here
        pytest.skip(f"ComfyUI at {root} is not importable here: {type(exc).__name__}: {exc}")
    finally:
        for handler in [h for h in logging.getLogger().handlers if h not in handlers]:
            logging.getLogger().removeHandler(handler)
    if Path(nodes.__file__).resolve().parent != root:
        pytest.skip(f"the module 'nodes' resolves to {nodes.__file__}, not ComfyUI's")
    assert folder_paths is not None
    return nodes


def release_comfy_path() -> None:
    root = str(comfy_root())
    if root in sys.path:
        sys.path.remove(root)


def load_pack(name: str = PACK_MODULE):
    """This repository imported as ComfyUI imports a custom node folder: a package under a synthetic name,
    its folder not on sys.path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _tmp() -> Path:
    if not _TMP:
        folder = Path(tempfile.mkdtemp(prefix="concept_eraser_comfy_"))
        _TMP.append(folder)
        atexit.register(shutil.rmtree, folder, True)
    return _TMP[0]


def scratch_dir(name: str) -> Path:
    folder = _tmp() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def checkpoint(family: str) -> Path:
    """The generated host-loadable checkpoint of `family` ("sd15", "sdxl"), made once per process."""
    if family in _FILES:
        return _FILES[family]
    import comfy_checkpoints

    cache = os.environ.get("CONCEPT_ERASER_TEST_CACHE")
    version = hashlib.sha256(Path(comfy_checkpoints.__file__).read_bytes()).hexdigest()[:12]
    folder = Path(cache) if cache else scratch_dir("checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny_{family}_{version}.safetensors"
    if not path.exists():
        partial = path.with_suffix(".partial")
        comfy_checkpoints.make_host_checkpoint(partial, family)
        partial.rename(path)
    _FILES[family] = path
    return path


def mmdit_files() -> dict[str, Path]:
    """The generated Flux.1 / SD3.5 files (`comfy_checkpoints.MMDIT_FILES`: diffusion models, text encoders, VAE),
    made once per process; {file name: path}."""
    if "mmdit" in _FILES:
        return {p.name: p for p in _FILES["mmdit"].iterdir()}
    import comfy_checkpoints

    cache = os.environ.get("CONCEPT_ERASER_TEST_CACHE")
    version = hashlib.sha256(Path(comfy_checkpoints.__file__).read_bytes()).hexdigest()[:12]
    folder = (Path(cache) if cache else scratch_dir("checkpoints")) / f"mmdit_{version}"
    if not folder.is_dir():
        partial = folder.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        comfy_checkpoints.make_mmdit_files(partial)
        partial.rename(folder)
    _FILES["mmdit"] = folder
    return {p.name: p for p in folder.iterdir()}


# ---- ComfyUI in this process ---------------------------------------------------------------------

def host_session(base: Path, folders: tuple[str, ...]):
    """ComfyUI imported here with the pack loaded, its output and temp folders under `base` and the model folders
    `folders` (e.g. "checkpoints", "erasures") at base/<folder>: yields {"nodes", "pack", "base", "folders"}
    (a module fixture's body), then puts everything back."""
    import torch

    nodes = import_comfy()
    import comfy.model_management
    import folder_paths

    threads = torch.get_num_threads()
    torch.set_num_threads(host_threads())
    saved = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    pack = load_pack()
    added = {name: base / name for name in folders}
    for name, folder in added.items():
        folder.mkdir()
        folder_paths.add_model_folder_path(name, str(folder), is_default=True)
    try:
        yield {"nodes": nodes, "pack": pack, "base": base, "folders": added}
    finally:
        for name, folder in added.items():
            paths = folder_paths.folder_names_and_paths[name][0]
            if str(folder) in paths:
                paths.remove(str(folder))
        folder_paths.set_output_directory(saved[0])
        folder_paths.set_temp_directory(saved[1])
        comfy.model_management.unload_all_models()
        torch.set_num_threads(threads)
        release_comfy_path()


def pack_module(name: str):
    import importlib

    return importlib.import_module(f"{load_pack().__name__}.{name}")


class Executed:
    """A node whose calls run as ComfyUI's executor runs them: under torch.inference_mode()."""

    def __init__(self, instance):
        self.instance = instance

    def __getattr__(self, name):
        import torch

        attr = getattr(self.instance, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with torch.inference_mode():
                return attr(*args, **kwargs)
        return call


def node(host, node_id: str) -> Executed:
    """One of the pack's nodes (`host` from `host_session`), called as the executor calls it."""
    return Executed(host["pack"].NODE_CLASS_MAPPINGS[node_id]())


def snapshot(patcher) -> dict:
    return {k: list(v) for k, v in patcher.patches.items()}


def baked(patcher, keys) -> dict:
    """The weights as ComfyUI bakes them when it loads this patcher (then unloaded again)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    state = patcher.model_state_dict()
    out = {k: state[k].detach().clone() for k in keys}
    comfy.model_management.unload_all_models()
    return out


# ---- a headless ComfyUI server --------------------------------------------------------------------

class Server:
    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path):
        self.base, self.port, self.process, self.log = base, port, process, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                body = r.read()
                return r.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def run(self, prompt: dict, workflow: dict | None = None, timeout: float = 600) -> dict:
        """Queue a prompt and wait for its history entry (outputs and status)."""
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow else {}
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "tests", "extra_data": extra})
        assert status == 200, body
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "ComfyUI exited:\n" + self.log.read_text()[-4000:]
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def image(self, info: dict):
        from PIL import Image

        query = urllib.parse.urlencode({k: info[k] for k in ("filename", "subfolder", "type")})
        return Image.open(io.BytesIO(self.get(f"/view?{query}")))

    def stop(self) -> None:
        """Stop the server process this helper started."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def free(self) -> None:
        """Unload models and drop every cached node output (the next prompt starts from scratch).

        ComfyUI's worker applies these flags between prompts; one can stay pending until the next prompt
        has run (its wake-up may be missed while it collects garbage). So a trivial prompt follows: after
        it the flags have surely been applied, and the next real prompt starts on an empty cache."""
        assert self.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
        flush = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        assert self.run(flush)["status"]["status_str"] == "success"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, port: int | None = None, timeout: float = 180) -> Server:
    """ComfyUI's main.py on the CPU with `base` as its base directory and this repository linked in as
    custom_nodes/concept_eraser; returns once it answers (the caller stops it)."""
    root = require_comfy()
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    port = port or free_port()
    log = base / "comfyui.log"
    threads = str(host_threads())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    command = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", f"sqlite:///{base}/db.sqlite",
               # CPUs run fp16 matmuls slowly; ComfyUI's own flag for a float32 text encoder
               "--fp32-text-enc"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(base, port, process, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError("ComfyUI exited at start:\n" + log.read_text()[-4000:])
        try:
            server.get("/object_info/ConceptEraserErase")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n" + log.read_text()[-4000:])
            time.sleep(0.5)



# ---- its frontend in headless Chromium -------------------------------------------------------------

def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    """The few Chrome DevTools protocol calls the tests need, over aiohttp's websocket client. Events that
    arrive meanwhile (console messages once `Runtime.enable` was called) are kept in `events`."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0
        self.events: list[dict] = []

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if "method" in message:
                self.events.append(message)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def console(self) -> list[str]:
        """The page's console messages and uncaught exceptions so far, as text."""
        out = []
        for event in self.events:
            if event["method"] == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in event["params"]["args"]))
            elif event["method"] == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                out.append(details.get("exception", {}).get("description", details.get("text", "")))
        return out

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")


def start_browser(profile: Path, window=(1800, 1050)) -> tuple[subprocess.Popen, int]:
    """Headless Chromium with the DevTools protocol on a free port (the caller terminates it)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium binary")
    port = free_port()
    process = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", f"--window-size={window[0]},{window[1]}",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


async def open_frontend(session, port: int, server: Server, timeout: float = 120) -> DevTools:
    """Navigate the browser's page to the server; returns once ComfyUI's app is up. Keep `session` open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{port}/json") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            break
        except Exception:  # noqa: BLE001 - the browser is still starting
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
    tools = DevTools(ws)
    await tools.call("Page.enable")
    await tools.call("Page.navigate", url=server.url)
    while not await tools.evaluate("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph)"):
        if time.monotonic() > deadline:
            raise TimeoutError("ComfyUI's frontend did not start")
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # extensions register after the app object exists
    return tools
