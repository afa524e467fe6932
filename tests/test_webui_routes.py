"""The HTTP route's logic (`routes.handle`, FastAPI-free): answers, and 4xx errors naming the field."""

from __future__ import annotations

import pytest
from test_webui_support import install_fake_webui, load_fake_a1111, tiny_sd1_file

from concept_eraser.methods import METHODS
from concept_eraser_webui.host import Host
from concept_eraser_webui.inputs import RequestError, parse_erase, parse_save
from concept_eraser_webui.routes import handle, methods_table, parse_body
from concept_eraser_webui.service import Service


@pytest.fixture
def service(monkeypatch, tmp_path):
    webui = install_fake_webui(monkeypatch, tmp_path)
    service = Service(Host("a1111"))
    service.webui = webui
    return service


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ("van gogh", "body"),
    ({}, "erase"),
    ({"erase": ""}, "erase"),
    ({"erase": 3}, "erase"),
    ({"erase": "a", "method": "nope"}, "method"),
    ({"erase": "a", "method": 5}, "method"),
    ({"erase": "a", "colour": "red"}, "colour"),
    ({"erase": "a", "params": {"lam": 0}}, "params.lam"),
    ({"erase": "a", "params": {"lam": "much"}}, "params.lam"),
    ({"erase": "a", "params": {"bogus": 1}}, "params.bogus"),
    ({"erase": "a", "params": [1]}, "params"),
    ({"erase": "a", "params": {"token_policy": "some"}}, "params.token_policy"),
    ({"erase": ["a", "a"]}, "erase"),
    ({"erase": ["a", "b", "c"], "guide": ["x", "y"]}, "guide"),
    ({"erase": "a", "preserve": "a"}, "preserve"),
    ({"erase": "a", "preserve": [1]}, "preserve"),
])
def test_bad_erase_input_is_a_400_naming_the_field(service, body, field):
    status, payload = handle(service, "erase", body)
    assert status == 400, payload
    assert payload["field"] == field and payload["error"]


@pytest.mark.parametrize("body, field", [
    ({"format": "zip", "name": "x"}, "format"),
    ({"format": "checkpoint"}, "name"),
    ({"format": "checkpoint", "name": "../x"}, "name"),
    ({"format": "checkpoint", "name": "a/b"}, "name"),
    ({"format": "checkpoint", "name": ".hidden"}, "name"),
    ({"format": "checkpoint", "name": "x", "overwrite": "yes"}, "overwrite"),
    ({"format": "checkpoint", "name": "x", "where": "/tmp"}, "where"),
    ({"format": "patch", "name": "x" * 250}, "name"),  # the file system's limit: 255 bytes with .safetensors
    ({"format": "checkpoint", "name": "é" * 122}, "name"),  # 244 bytes in UTF-8
])
def test_bad_save_input_is_a_400_naming_the_field(service, body, field):
    status, payload = handle(service, "save", body)
    assert (status, payload["field"]) == (400, field), payload


def test_restore_takes_no_fields(service):
    assert handle(service, "restore", {"all": True}) == (400, {"error": "unknown field; restore takes no fields",
                                                               "field": "all"})
    assert handle(service, "restore", [1])[0] == 400


def test_invalid_json_names_the_body():
    with pytest.raises(RequestError) as info:
        parse_body(b"{not json")
    assert info.value.field == "body"
    assert parse_body(b"") is None and parse_body(b'{"a": 1}') == {"a": 1}


def test_without_a_model_erase_is_a_409_on_model(service):
    status, payload = handle(service, "erase", {"erase": "van gogh"})
    assert (status, payload["field"]) == (409, "model")
    assert handle(service, "weights")[0] == 409
    status, payload = handle(service, "status")
    assert status == 200 and payload["text"] == "No checkpoint loaded."


def test_erase_status_weights_restore_roundtrip(service):
    webui = service.webui
    path, state = tiny_sd1_file(webui.ckpt_dir)
    load_fake_a1111(webui, path, state)
    _, before = handle(service, "weights")
    kv = before["tensors"]
    assert len(kv) == 32 and not any(v["changed"] for v in kv.values())
    status, payload = handle(service, "erase", {"method": "uce", "erase": ["van gogh"], "preserve": "monet\nrembrandt",
                                                "params": {"lam": "0.5", "token_policy": "last_word"}})
    assert status == 200, payload
    assert payload["erased"]["erase"] == ["van gogh"] and payload["erased"]["preserve"] == ["monet", "rembrandt"]
    assert payload["status"]["erasures"][0]["params"]["token_policy"] == "last_word"
    _, after = handle(service, "weights")
    assert all(after["tensors"][k]["sha256"] != kv[k]["sha256"] for k in kv)
    assert handle(service, "status")[1]["changed_tensors"] == 32
    status, payload = handle(service, "restore", {})
    assert status == 200 and payload["restored_tensors"] == 32
    assert handle(service, "weights")[1]["tensors"] == kv  # the original bytes
    key = next(iter(kv))
    assert set(handle(service, "weights", query={"keys": key})[1]["tensors"]) == {key}
    assert handle(service, "weights", query={"keys": "nope.weight"})[1]["field"] == "keys"


def test_save_conflicts_are_409(service):
    webui = service.webui
    path, state = tiny_sd1_file(webui.ckpt_dir)
    load_fake_a1111(webui, path, state)
    assert handle(service, "save", {"format": "patch", "name": "p"})[0] == 409  # nothing erased yet
    assert handle(service, "erase", {"erase": "van gogh"})[0] == 200
    assert handle(service, "save", {"format": "patch", "name": "p"})[0] == 200
    status, payload = handle(service, "save", {"format": "patch", "name": "p.safetensors"})
    assert (status, payload["field"]) == (409, "name")


def test_methods_table_lists_every_declared_parameter():
    table = methods_table()
    assert set(table) == set(METHODS)
    for name, method in METHODS.items():
        assert [p["name"] for p in table[name]["params"]] == [p.name for p in method.params]


def test_parsers_accept_text_or_lists():
    request = parse_erase({"erase": "a\n\n b \n", "guide": "g", "preserve": ["p", " "]})
    assert request.concepts.targets == ("a", "b") and request.concepts.guides == ("g", "g")
    assert request.concepts.preserve == ("p",) and request.method == "uce"
    assert parse_save({"format": "lora", "name": "x.safetensors"}).name == "x"
    assert parse_save({"format": "patch", "name": "x" * 243}).name == "x" * 243


def test_an_empty_guide_in_a_list_is_the_empty_prompt():
    """As the command line's --guide "": one guide per concept, the first the empty prompt."""
    request = parse_erase({"erase": ["van gogh", "monet"], "guide": ["", "a photo"]})
    assert request.concepts.guides == ("", "a photo")
    assert parse_erase({"erase": ["a", "b"], "guide": [""]}).concepts.guides == ("", "")
    assert parse_erase({"erase": ["a", "b"], "guide": "\n"}).concepts.guides == ("", "")  # the tab's empty box
    with pytest.raises(RequestError) as info:
        parse_erase({"erase": ["a", "b"], "guide": ["", "x", "y"]})
    assert info.value.field == "guide"
