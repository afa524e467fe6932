"""The "Concept Eraser" tab. Widgets for each method's parameters are generated from the solver's
declarations (`METHODS[name].params`), so the tab, the command line and the ComfyUI nodes offer the
same knobs with the same defaults, ranges and help. Gradio use is limited to what gradio 3.41
(AUTOMATIC1111 1.10) and 4.x (Forge) share: Blocks/Row/Column/Group/Accordion, Textbox, Number,
Checkbox, Dropdown, Radio, Button, Gallery, Image, HTML and `gr.update`.

`Tab` holds the handlers (plain functions of the widget values, testable without gradio);
`build` lays the widgets out and wires them.
"""

from __future__ import annotations

import html
import logging
import warnings
from typing import Any, Callable, Sequence

from concept_eraser.errors import EraserError
from concept_eraser.methods import METHODS
from concept_eraser.params import AUTO_BOOL, Param, auto_bool_choice
from concept_eraser.report import duration, layer_plot

from .inputs import FORMATS, RequestError, parse_erase, parse_save
from .preview import TXT2IMG_SETTINGS
from .routes import error_payload

log = logging.getLogger("concept_eraser")
ELEM = "concept_eraser"

# txt2img components, captured as the WebUI creates them (before the extension tabs): elem_id → component
TXT2IMG: dict[str, Any] = {}


def capture_txt2img(component, **kwargs) -> None:
    """`on_after_component` callback: keep the txt2img settings widgets the Preview reads."""
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    if elem_id in TXT2IMG_SETTINGS:
        TXT2IMG[elem_id] = component


def widget_spec(method: str, p: Param) -> tuple[str, dict]:
    """(gradio component name, keyword arguments) for one declared parameter."""
    common = {"label": p.name, "info": p.help, "elem_id": f"{ELEM}_{method}_{p.name}"}
    if p.kind is bool and p.nullable:  # a checkbox cannot say "auto"
        return "Dropdown", {**common, "choices": list(AUTO_BOOL), "value": auto_bool_choice(p.default)}
    if p.kind is bool:
        return "Checkbox", {**common, "value": bool(p.default)}
    if p.choices:
        return "Dropdown", {**common, "choices": list(p.choices), "value": p.default}
    if p.nullable or p.kind is str:
        value = "" if p.default is None else str(p.default)
        info = p.help + (f" (empty: automatic; else {p.describe_range()})" if p.nullable else "")
        return "Textbox", {**common, "info": info, "value": value, "lines": 1}
    if p.kind is int:
        return "Number", {**common, "info": f"{p.help} ({p.describe_range()})", "value": int(p.default), "precision": 0}
    return "Number", {**common, "info": f"{p.help} ({p.describe_range()})", "value": float(p.default)}


def param_layout() -> list[tuple[str, Param]]:
    """Every (method, parameter) in registry order: the order of the parameter widgets' values."""
    return [(name, p) for name, method in METHODS.items() for p in method.params]


def message_html(text: str, kind: str = "info") -> str:
    if not text:
        return ""
    icon = {"error": "⚠", "ok": "✓", "info": ""}[kind]
    return f'<div class="{ELEM}-message {ELEM}-{kind}">{icon} {html.escape(text)}</div>'


def method_name(choice: str) -> str:
    """The method the dropdown's display name (or the internal name, as the route takes it) stands for."""
    return next((name for name, m in METHODS.items() if choice in (m.title, name)), choice)


def method_help(choice: str) -> str:
    method = METHODS.get(method_name(choice))
    return f'<div class="{ELEM}-method-help">{html.escape(method.summary)}</div>' if method else ""


def problem_text(exc: BaseException) -> str:
    _status, payload = error_payload(exc)
    field = payload.get("field")
    return f"{field}: {payload['error']}" if field else payload["error"]


class Tab:
    def __init__(self, service):
        self.service = service
        self.layout = param_layout()

    # ---- helpers ---------------------------------------------------------------------------------
    def status_line(self) -> str:
        try:
            status = self.service.status()
        except Exception as exc:  # noqa: BLE001 - the status line must always render
            return f"Status unavailable: {exc}"
        return status["text"] + (f" ({status['notice']})" if status.get("notice") else "")

    def params_for(self, method: str, values: Sequence[Any]) -> dict:
        return {p.name: v for (name, p), v in zip(self.layout, values) if name == method}

    def _guard(self, action: Callable[[], tuple], id_task: str | None = None) -> tuple:
        try:
            return action()
        except (RequestError, EraserError) as exc:
            return None, message_html(problem_text(exc), "error")
        except Exception as exc:  # noqa: BLE001 - report it in the tab, keep the UI alive
            log.exception("concept_eraser: internal error")
            return None, message_html(f"internal error: {type(exc).__name__}: {exc}", "error")
        finally:
            if id_task:  # the progress bar the click started stops even when the job never began
                try:
                    self.service.host.finish_task(id_task)
                except Exception:  # noqa: BLE001
                    log.debug("concept_eraser: could not finish task %s", id_task)

    # ---- handlers (values in, widget values out) -------------------------------------------------------
    def erase(self, id_task, targets, guides, preserve, method, *values):
        method = method_name(method)

        def run():
            request = parse_erase({"method": method, "erase": targets or "", "guide": guides or "",
                                   "preserve": preserve or "", "params": self.params_for(method, values)})
            with warnings.catch_warnings(record=True) as caught:  # shown in the message (and the console)
                warnings.simplefilter("always")
                result = self.service.erase(request, id_task or None)
            warned = [str(w.message) for w in caught]
            for message in warned:
                log.warning("concept_eraser: %s", message)
            e = result["erased"]
            text = (f"{METHODS[e['method']].title} erased {', '.join(e['erase'])} in {duration(e['seconds'])} "
                    f"({e['tensors']} tensors changed)")
            text += "".join(f"; WARNING: {w}" for w in warned)
            if result.get("notice"):
                text += f"; before it: {result['notice']}"
            # the same text and plot as ComfyUI's Erasure Report node (`concept_eraser.report`)
            shown = (result["text"], layer_plot(self.service.session.records[-1].report))
            return shown, message_html(text, "info" if warned or result.get("notice") else "ok")

        shown, message = self._guard(run, id_task)
        text, plot = shown if shown is not None else ("", None)
        return self.status_line(), message, text, plot

    def restore(self, id_task):
        def run():
            result = self.service.restore(id_task or None)
            n = result["restored_tensors"]
            text = f"restored {n} tensors: the weights are the checkpoint's again" if n else "nothing to restore"
            return None, message_html(text, "ok")

        _unused, message = self._guard(run, id_task)
        return self.status_line(), message

    def preview(self, id_task, prompts, *txt2img_values):
        settings = {TXT2IMG_SETTINGS[elem]: v for elem, v in zip(self.txt2img_ids(), txt2img_values)}

        def run():
            lines = [line for line in (prompts or "").splitlines() if line.strip()]
            gallery, seed = self.service.preview(lines, settings, id_task or None)
            return gallery, message_html(f"left original, right erased; seed {seed}", "ok")

        gallery, message = self._guard(run, id_task)
        return (gallery if gallery is not None else []), self.status_line(), message

    def save(self, fmt, name, overwrite):
        def run():
            result = self.service.save(parse_save({"format": fmt, "name": name or self.service.default_name(),
                                                   "overwrite": bool(overwrite)}))
            extra = f"; use it as {result['prompt']}" if result.get("prompt") else ""
            if result["format"] == "checkpoint":
                # the WebUI lists it, but its checkpoint dropdown shows the new list only after a page reload or 🔄
                extra = f"; press 🔄 next to the checkpoint list to see it there as {result['title']}"
            return None, message_html(f"saved {result['path']}{extra}", "ok")

        _unused, message = self._guard(run)
        return self.status_line(), message

    def default_name(self):
        try:
            return self.service.default_name()
        except Exception:  # noqa: BLE001
            return ""

    def interrupt(self):
        self.service.host.interrupt()

    @staticmethod
    def txt2img_ids() -> list[str]:
        return [elem for elem in TXT2IMG_SETTINGS if elem in TXT2IMG]

    def method_visibility(self, method: str) -> list[bool]:
        return [name == method_name(method) for name in METHODS]


def build(service):
    """The tab's Blocks, for `on_ui_tabs`."""
    import gradio as gr

    tab = Tab(service)
    hidden = {"visible": False}
    # the JavaScript run before a click: `_js=` in gradio 3 (A1111), `js=` in gradio 4 (Forge also translates `_js`)
    js = "js" if int(gr.__version__.split(".")[0]) >= 4 else "_js"
    submit = {js: "conceptEraserSubmit"}
    with gr.Blocks(analytics_enabled=False) as blocks:
        id_task = gr.Textbox(elem_id=f"{ELEM}_id_task", **hidden)
        with gr.Row():
            with gr.Column(variant="compact", scale=1):
                status = gr.Textbox(label="Status", value=tab.status_line, interactive=False, lines=2,
                                    elem_id=f"{ELEM}_status")
                message = gr.HTML(elem_id=f"{ELEM}_message")
                targets = gr.Textbox(label="Concepts to erase", lines=3, elem_id=f"{ELEM}_erase",
                                     placeholder="one per line, e.g.\nVan Gogh")
                guides = gr.Textbox(label="Guide concepts", lines=2, elem_id=f"{ELEM}_guide",
                                    placeholder="what each erased concept becomes: one for all, or one per line "
                                                "(empty: the empty prompt)")
                preserve = gr.Textbox(label="Concepts to preserve", lines=3, elem_id=f"{ELEM}_preserve",
                                      placeholder="one per line, e.g.\nMonet\nRembrandt")
                first = next(iter(METHODS.values()))
                method = gr.Dropdown(label="Method", choices=[m.title for m in METHODS.values()], value=first.title,
                                     elem_id=f"{ELEM}_method")
                help_text = gr.HTML(method_help(first.title), elem_id=f"{ELEM}_method_help")
                with gr.Row(elem_id=f"{ELEM}_actions"):  # four narrow buttons: one row, Interrupt included
                    erase_button = gr.Button("Erase", variant="primary", elem_id=f"{ELEM}_erase_button", min_width=60)
                    preview_button = gr.Button("Preview", elem_id=f"{ELEM}_preview_button", min_width=60)
                    restore_button = gr.Button("Restore", elem_id=f"{ELEM}_restore_button", min_width=60)
                    interrupt_button = gr.Button("Interrupt", elem_id=f"{ELEM}_interrupt_button", min_width=60)
                groups, widgets = [], []
                with gr.Accordion("Method parameters", open=False, elem_id=f"{ELEM}_parameters"):
                    for name in METHODS:
                        with gr.Group(visible=name == next(iter(METHODS)), elem_id=f"{ELEM}_params_{name}") as group:
                            for method_name, p in tab.layout:
                                if method_name == name:
                                    kind, kwargs = widget_spec(name, p)
                                    widgets.append(getattr(gr, kind)(**kwargs))
                        groups.append(group)
                with gr.Accordion("Preview prompts", open=True):
                    prompts = gr.Textbox(label="Prompts", lines=3, elem_id=f"{ELEM}_prompts",
                                         placeholder="one per line (empty: the erased concepts); rendered with the "
                                                     "txt2img tab's seed, steps, sampler, CFG and size")
                with gr.Accordion("Save", open=True):
                    fmt = gr.Radio(label="Save as", choices=list(FORMATS), value="checkpoint", elem_id=f"{ELEM}_format")
                    name = gr.Textbox(label="File name", elem_id=f"{ELEM}_name",
                                      placeholder="empty: <checkpoint>-erased-<concepts>")
                    overwrite = gr.Checkbox(label="Overwrite an existing file", value=False,
                                            elem_id=f"{ELEM}_overwrite")
                    save_button = gr.Button("Save", elem_id=f"{ELEM}_save_button")
                refresh_button = gr.Button("Refresh status", elem_id=f"{ELEM}_refresh")
            with gr.Column(scale=1):
                gr.HTML(f'<div id="{ELEM}_progress_anchor"></div>', elem_id=f"{ELEM}_progress")
                gallery = gr.Gallery(label="Preview: original | erased", columns=2, elem_id=f"{ELEM}_gallery")
                with gr.Accordion("Report", open=False):
                    report = gr.Textbox(label="Last erasure", lines=16, interactive=False, elem_id=f"{ELEM}_report")
                    plot = gr.Image(label="Relative change per tensor", type="pil", interactive=False,
                                    elem_id=f"{ELEM}_plot")

        method.change(lambda m: [method_help(m), *(gr.update(visible=v) for v in tab.method_visibility(m))],
                      inputs=[method], outputs=[help_text, *groups])
        erase_button.click(tab.erase, **submit,
                           inputs=[id_task, targets, guides, preserve, method, *widgets],
                           outputs=[status, message, report, plot])
        restore_button.click(tab.restore, **submit, inputs=[id_task], outputs=[status, message])
        txt2img = [TXT2IMG[elem] for elem in tab.txt2img_ids()]
        preview_button.click(tab.preview, **submit, inputs=[id_task, prompts, *txt2img],
                             outputs=[gallery, status, message])
        save_button.click(tab.save, inputs=[fmt, name, overwrite], outputs=[status, message])
        interrupt_button.click(tab.interrupt, inputs=[], outputs=[], queue=False)
        refresh_button.click(tab.status_line, inputs=[], outputs=[status])
    return blocks
