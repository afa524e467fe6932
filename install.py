"""Dependency hook, run by two different launchers:

- AUTOMATIC1111 WebUI / Forge run it at start-up with their own Python and `launch` importable: it
  installs, with the WebUI's own `launch.run_pip`, only the packages the solver imports that are
  missing, each with ``--no-deps`` so pip never installs, upgrades or downgrades torch (or anything
  else the WebUI pinned). Both WebUIs already ship all of them, so normally nothing is installed.
- ComfyUI-Manager runs it with ComfyUI's Python (no `launch` module) after installing
  requirements.txt itself: then it does nothing.
"""

import sys

# (import name, pip requirement) of what the solver needs besides torch, which the host provides.
REQUIREMENTS = (
    ("safetensors", "safetensors>=0.4.2"),
    ("transformers", "transformers>=4.30"),
    ("numpy", "numpy>=1.24"),
    ("open_clip", "open-clip-torch>=2.20"),  # only its CLIP vocabulary file is used
)
NEVER = ("torch", "torchvision", "torchaudio", "xformers")


def webui_launcher():
    """The WebUI's `launch` module, or None outside the WebUI."""
    try:
        import launch
    except Exception:  # noqa: BLE001 - ImportError, or a `launch` that fails outside its WebUI
        return None
    if callable(getattr(launch, "is_installed", None)) and callable(getattr(launch, "run_pip", None)):
        return launch
    return None


def missing(is_installed) -> list:
    return [(module, requirement) for module, requirement in REQUIREMENTS if not is_installed(module)]


def main() -> int:
    launch = webui_launcher()
    if launch is None:
        return 0  # ComfyUI-Manager (or a plain `python install.py`): requirements.txt is its business
    for _module, requirement in missing(launch.is_installed):
        name = requirement.split(">")[0].split("=")[0].strip()
        if name in NEVER:
            continue
        launch.run_pip(f'install --no-deps "{requirement}"', f"Concept Eraser requirement: {requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
