"""Callbacks the WebUI calls: the tab (`on_ui_tabs`), the HTTP route (`on_app_started`, also with
`--nowebui`), checkpoint changes (`on_model_loaded`), and the txt2img widgets the Preview reads
(`on_after_component`). `scripts/concept_eraser_tab.py` calls `register` each time the WebUI loads
its scripts (it clears all callbacks before, e.g. on "Reload UI"); the session lives on in this
module, like the erased weights in the loaded model."""

from __future__ import annotations

import weakref

from .host import Host
from .service import Service

TITLE = "Concept Eraser"
_service: Service | None = None
_apps: "weakref.WeakSet" = weakref.WeakSet()


def service() -> Service:
    global _service
    if _service is None:
        _service = Service(Host())
    return _service


def on_ui_tabs():
    from .ui import build

    return [(build(service()), TITLE, "concept_eraser")]


def on_app_started(_demo, app) -> None:
    from .routes import register as register_routes

    if app in _apps:
        return
    register_routes(app, service)
    _apps.add(app)


def on_model_loaded(sd_model) -> None:
    service().on_model_loaded(sd_model)


def register() -> None:
    from modules import script_callbacks

    from .ui import capture_txt2img

    script_callbacks.on_after_component(capture_txt2img)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_model_loaded(on_model_loaded)
