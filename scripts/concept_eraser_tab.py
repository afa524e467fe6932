"""AUTOMATIC1111 WebUI / Forge entry of Concept Eraser: registers the "Concept Eraser" tab and the
/concept-eraser/v1 HTTP route.

The WebUI executes every .py directly in an extension's scripts/ folder at start-up, with the
extension's root on sys.path while it does, so the two packages beside this folder import here: the
host-free solver `concept_eraser` and its WebUI adapter `concept_eraser_webui`. Nothing else of the
repository is imported (ComfyUI's entry `__init__.py` and `nodes/` stay untouched), and ComfyUI never
runs this file.
"""

from concept_eraser_webui import entry

entry.register()
