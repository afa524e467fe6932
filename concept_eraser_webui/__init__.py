"""Concept Eraser inside AUTOMATIC1111's WebUI and Forge: the tab, the HTTP route and the adapter that
lets the solver (`concept_eraser`) work on the checkpoint the WebUI has loaded.

The WebUI executes `scripts/concept_eraser_tab.py` with the extension root on `sys.path`; that file
imports this package, which imports the solver as the top-level package `concept_eraser`. ComfyUI
never imports this package (it loads only the root `__init__.py` and `nodes/`). Nothing of the WebUI
(`modules.*`, `backend.*`, `gradio`) is imported at import time: `host.py` is the only module that
talks to the WebUI, and it imports on use, so the pure logic here is testable without a WebUI.
"""
