"""The ComfyUI node pack. Node modules import ComfyUI only inside their functions, so this package (and
the repository's root `__init__.py`) imports without the host; a module that fails to import is logged
and leaves the others working."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("concept_eraser")

MODULES = ("files", "erase", "views")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
FAILED: dict[str, str] = {}

for _name in MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except Exception as exc:  # noqa: BLE001 - report and keep the other nodes
        FAILED[_name] = f"{type(exc).__name__}: {exc}"
        log.exception("[Concept Eraser] nodes module %r failed to import", _name)
        continue
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

if "files" not in FAILED:
    from .files import register_folders

    register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "FAILED"]
