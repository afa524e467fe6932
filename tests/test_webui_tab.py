"""The tab's logic without gradio: widgets generated from the methods' declared parameters, and the
handlers (messages naming the field, the status line, Preview reading the txt2img settings)."""

from __future__ import annotations

import html

import pytest
from test_webui_support import install_fake_webui, load_fake_a1111, tiny_sd1_file

from concept_eraser.methods import METHODS
from concept_eraser_webui.host import Host
from concept_eraser_webui.service import Service
from concept_eraser.report import duration, report_text
from concept_eraser_webui.ui import TXT2IMG, Tab, capture_txt2img, method_help, param_layout, widget_spec


@pytest.fixture
def tab(monkeypatch, tmp_path):
    webui = install_fake_webui(monkeypatch, tmp_path)
    path, state = tiny_sd1_file(webui.ckpt_dir)
    load_fake_a1111(webui, path, state)
    tab = Tab(Service(Host("a1111")))
    tab.webui = webui
    return tab


def values_for(method: str, **overrides):
    return [overrides.get(p.name, widget_spec(name, p)[1]["value"]) for name, p in param_layout()]


def test_every_declared_parameter_gets_one_widget_with_its_default_and_help():
    layout = param_layout()
    assert [p for _, p in layout] == [p for m in METHODS.values() for p in m.params]
    for name, p in layout:
        kind, kwargs = widget_spec(name, p)
        assert kwargs["label"] == p.name and p.help in kwargs["info"]
        assert kwargs["elem_id"] == f"concept_eraser_{name}_{p.name}"
        if p.kind is bool and p.nullable:
            assert kind == "Dropdown" and kwargs["choices"] == ["auto", "true", "false"] and kwargs["value"] == "auto"
            assert [p.convert(v) for v in kwargs["choices"]] == [None, True, False]
        elif p.kind is bool:
            assert kind == "Checkbox" and kwargs["value"] is p.default
        elif p.choices:
            assert kind == "Dropdown" and kwargs["choices"] == list(p.choices) and kwargs["value"] == p.default
        elif p.nullable or p.kind is str:
            assert kind == "Textbox" and kwargs["value"] == ("" if p.default is None else str(p.default))
        else:
            assert kind == "Number" and kwargs["value"] == p.default
            assert kwargs.get("precision") == (0 if p.kind is int else None)


def test_default_widget_values_resolve_to_the_methods_defaults():
    from concept_eraser.params import resolve

    tab = Tab(service=None)
    for name, method in METHODS.items():
        given = tab.params_for(name, values_for(name))
        assert resolve(method.params, given, name) == resolve(method.params, {}, name)


def test_erase_with_a_bad_value_shows_a_message_naming_the_field(tab):
    status, message, report, plot = tab.erase("task(bad)", "van gogh", "", "", "uce", *values_for("uce", lam=-1))
    assert "params.lam" in message and "⚠" in message and report == "" and plot is None
    assert ("finish", "task(bad)") in tab.webui.progress.events  # the progress bar stops
    assert status.startswith("No erasure active on tiny-sd1.safetensors")
    status, message, _, _ = tab.erase("", "", "", "", "uce", *values_for("uce"))
    assert "erase: give at least one concept" in message


def test_erase_restore_and_status_line(tab):
    status, message, report, plot = tab.erase("task(abc)", "van gogh", "", "monet", "uce", *values_for("uce"))
    assert "✓" in message and "UCE erased van gogh" in message
    assert status.startswith("1 erasure(s) active on tiny-sd1.safetensors") and "keeping monet" in status
    # the human-readable report and plot of ComfyUI's Erasure Report node, not JSON
    assert report.startswith("uce: erased van gogh in ") and "\nmethod: uce " in report and "recoverability" in report
    assert plot.size == (960, 420) and len(set(plot.getdata())) > 3
    assert ("start", "task(abc)") in tab.webui.progress.events and ("finish", "task(abc)") in tab.webui.progress.events
    status, message = tab.restore("")
    assert "restored 32 tensors" in message and status.startswith("No erasure active")
    assert "nothing to restore" in tab.restore("")[1]


def test_erasures_dropped_by_a_checkpoint_switch_are_said_by_the_next_erase(tab):
    """The notice of dropped erasures is in the status until the next erasure clears it: when that erasure is
    the next action, its message says it instead."""
    tab.erase("", "van gogh", "", "", "UCE", *values_for("uce"))
    other, state = tiny_sd1_file(tab.webui.ckpt_dir, "other.safetensors", seed=1)
    tab.service.on_model_loaded(load_fake_a1111(tab.webui, other, state))  # as A1111 calls it
    status, message, _report, _plot = tab.erase("", "monet", "", "", "UCE", *values_for("uce"))
    assert "UCE erased monet" in message and "; before it: other.safetensors" in message and "dropped" in message
    assert "✓" not in message and status.startswith("1 erasure(s) active on other.safetensors")
    _status, message, _report, _plot = tab.erase("", "picasso", "", "", "UCE", *values_for("uce"))
    assert "dropped" not in message and "✓" in message


def test_an_unconverged_space_run_says_so_in_the_message(tab):
    _status, message, report, _plot = tab.erase("", "van gogh", "", "", "space", *values_for("space", iterations=2))
    assert "SPACE erased van gogh" in message and "WARNING: SPACE stopped at iterations=2" in message
    assert "✓" not in message and "converged: NO after 2 passes" in report


def test_preview_reads_the_captured_txt2img_settings(tab, monkeypatch):
    monkeypatch.setattr("concept_eraser_webui.ui.TXT2IMG", {})
    from concept_eraser_webui import ui

    class Component:
        def __init__(self, elem_id):
            self.elem_id = elem_id

    for elem in ("txt2img_seed", "txt2img_steps", "img2img_steps", "txt2img_width"):
        capture_txt2img(Component(elem), elem_id=elem)
    assert set(ui.TXT2IMG) == {"txt2img_seed", "txt2img_steps", "txt2img_width"}
    assert tab.txt2img_ids() == ["txt2img_steps", "txt2img_width", "txt2img_seed"]
    tab.erase("", "van gogh", "", "", "uce", *values_for("uce"))
    gallery, status, message = tab.preview("", "a cat\n", 4, 64, 1234)
    assert len(gallery) == 2 and "seed 1234" in message
    p = tab.webui.processing.calls[0]
    assert (p.steps, p.width, p.seed, p.height) == (4, 64, 1234, 512)
    assert "erasure(s) active" in status


def test_save_uses_a_default_name_and_never_overwrites(tab):
    tab.erase("", "van gogh", "", "", "uce", *values_for("uce"))
    status, message = tab.save("patch", "", False)
    assert "saved" in message and "tiny-sd1-erased-van_gogh.safetensors" in message
    status, message = tab.save("patch", "", False)
    assert "⚠ name:" in message and "Overwrite" in message
    assert "saved" in tab.save("patch", "", True)[1]
    _status, message = tab.save("checkpoint", "erased", False)  # A1111 lists it; its dropdown needs 🔄
    assert "saved" in message and "press 🔄 next to the checkpoint list to see it there as erased" in message


def test_method_choice_shows_only_that_methods_parameters_and_help():
    tab = Tab(service=None)
    for name, method in METHODS.items():
        assert tab.method_visibility(method.title) == [n == name for n in METHODS]
        assert tab.method_visibility(name) == [n == name for n in METHODS]  # the route's names work too
        help_html = method_help(method.title)
        assert html.escape(method.summary) in help_html
        assert not any(html.escape(m.summary) in help_html for m in METHODS.values() if m is not method)


def test_the_tab_offers_display_names_and_erases_with_them(tab):
    _status, message, report, _ = tab.erase("", "van gogh", "", "", METHODS["uce"].title, *values_for("uce"))
    assert "UCE erased van gogh" in message and "\nmethod: uce " in report
    status, message, report, _ = tab.erase("", "monet", "", "", "ErasePro", *values_for("erasepro"))
    assert "ErasePro erased monet" in message and "\nmethod: erasepro " in report
    assert "1. UCE: van gogh; 2. ErasePro: monet" in status  # display names in the status line too


def test_a_fast_erasure_reports_milliseconds():
    assert duration(0.0123) == "12 ms" and duration(0.9994) == "999 ms"
    assert duration(1.0) == "1.0 s" and duration(83.26) == "83.3 s"
    report = {"method": "uce", "concepts": {"erase": ["van gogh"]}, "seconds": 0.0123, "layers": {}}
    assert "in 12 ms;" in report_text(report) and "solve time: 12 ms on" in report_text(report)  # the Report box


def test_lam_true_is_refused_in_the_tab(tab):
    _status, message, report, _ = tab.erase("", "van gogh", "", "", "UCE", *values_for("uce", lam=True))
    assert "params.lam" in message and "⚠" in message and report == ""


def test_txt2img_capture_is_module_state():
    assert isinstance(TXT2IMG, dict)
