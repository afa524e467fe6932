"""install.py under both launchers, and the WebUI entry file: what each host loads and what it must not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_LAUNCH = """
import json, os
LOG = os.environ["FAKE_LAUNCH_LOG"]
INSTALLED = set(json.loads(os.environ["FAKE_INSTALLED"]))
def _log(entry):
    with open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\\n")
def is_installed(package):
    _log(["is_installed", package])
    return package in INSTALLED
def run_pip(command, desc=None, live=False):
    _log(["run_pip", command, desc])
"""


def run_installer(tmp_path: Path, installed, with_launch: bool = True) -> tuple[subprocess.CompletedProcess, list]:
    log = tmp_path / "launch.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_launch:
        (tmp_path / "launch.py").write_text(FAKE_LAUNCH)
        env["PYTHONPATH"] = str(tmp_path)  # as the WebUI runs it: PYTHONPATH = its root, where launch.py is
    env.update(FAKE_LAUNCH_LOG=str(log), FAKE_INSTALLED=json.dumps(sorted(installed)))
    done = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, entries


def test_under_the_webui_nothing_is_installed_when_all_is_there(tmp_path):
    done, entries = run_installer(tmp_path, {"safetensors", "transformers", "numpy", "open_clip"})
    assert done.returncode == 0, done.stderr
    assert [e[0] for e in entries] == ["is_installed"] * 4


def test_under_the_webui_only_what_is_missing_is_installed_without_dependencies(tmp_path):
    done, entries = run_installer(tmp_path, {"safetensors", "numpy"})
    assert done.returncode == 0, done.stderr
    pips = [e[1] for e in entries if e[0] == "run_pip"]
    assert pips == ['install --no-deps "transformers>=4.30"', 'install --no-deps "open-clip-torch>=2.20"']
    assert not any("torch" in p.split('"')[1].split(">")[0].replace("open-clip-torch", "") for p in pips)


def test_under_comfyui_manager_it_does_nothing(tmp_path):
    done, entries = run_installer(tmp_path, set(), with_launch=False)
    assert done.returncode == 0 and entries == [] and done.stdout == "" and done.stderr == ""


def test_comfyui_loading_the_repo_imports_nothing_of_the_webui_side():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("concept_eraser_pack", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["concept_eraser_pack"] = module
        spec.loader.exec_module(module)
        loaded = [m for m in sys.modules if m.startswith(("concept_eraser_webui", "gradio", "modules", "launch"))
                  or "concept_eraser_tab" in m or m.endswith(".scripts")]
        print(loaded)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_webui_loads_the_script_as_a1111_does_and_registers_the_callbacks(tmp_path):
    """modules/scripts.py `load_scripts`: the extension root is put first on sys.path while the file is
    executed with spec_from_file_location(basename); no package, so no relative imports."""
    fake = tmp_path / "modules"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "script_callbacks.py").write_text(textwrap.dedent("""
        registered = []
        def _register(kind):
            return lambda fn, **kw: registered.append((kind, fn.__module__))
        on_ui_tabs = _register("ui_tabs")
        on_app_started = _register("app_started")
        on_model_loaded = _register("model_loaded")
        on_after_component = _register("after_component")
    """))
    code = textwrap.dedent(f"""
        import importlib.util, os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        root, path = {str(ROOT)!r}, {str(ROOT / "scripts" / "concept_eraser_tab.py")!r}
        saved = sys.path
        sys.path = [root] + sys.path
        try:
            spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path = saved
        from modules import script_callbacks
        print(sorted(script_callbacks.registered))
        print(sorted(m for m in sys.modules if m in ("nodes", "comfy", "gradio", "folder_paths")
                     or m.startswith("nodes.")))
        # late imports inside callbacks work without the root on sys.path
        import concept_eraser_webui.preview, concept_eraser.checkpoint
        print("late imports ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == str(sorted([("after_component", "concept_eraser_webui.ui"),
                                   ("app_started", "concept_eraser_webui.entry"),
                                   ("model_loaded", "concept_eraser_webui.entry"),
                                   ("ui_tabs", "concept_eraser_webui.entry")]))
    assert lines[1] == "[]" and lines[2] == "late imports ok"


def test_only_one_entry_file_and_top_level_javascript():
    assert sorted(p.name for p in (ROOT / "scripts").iterdir() if p.suffix == ".py") == ["concept_eraser_tab.py"]
    scripts = [p for p in (ROOT / "javascript").glob("*.js")]
    assert [p.name for p in scripts] == ["concept_eraser.js"]
    text = scripts[0].read_text()
    assert "import " not in text.split("*/", 1)[-1] and "export " not in text  # a classic script, not a module
