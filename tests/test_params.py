"""The shared parameter parsing (`concept_eraser.params`), which the command line, the ComfyUI nodes and the
WebUI's tab and route all go through."""

from __future__ import annotations

import pytest

from concept_eraser.errors import InvalidParameterError
from concept_eraser.methods import METHODS
from concept_eraser.params import resolve
from concept_eraser_webui.inputs import RequestError, parse_erase

PARAMS = [(name, p) for name, method in METHODS.items() for p in method.params]


@pytest.mark.parametrize("name,param", [(n, p) for n, p in PARAMS if p.kind in (int, float) and not p.choices],
                         ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("flag", [True, False])
def test_a_boolean_is_not_a_number(name, param, flag):
    with pytest.raises(InvalidParameterError) as err:
        resolve(METHODS[name].params, {param.name: flag}, name)
    assert err.value.field == param.name and repr(flag) in str(err.value)


@pytest.mark.parametrize("name,param", [(n, p) for n, p in PARAMS if p.kind is bool],
                         ids=lambda v: getattr(v, "name", v))
def test_a_number_is_not_a_boolean_but_text_is_read(name, param):
    for value in (1, 0, 1.0):
        with pytest.raises(InvalidParameterError, match="not true or false"):
            resolve(METHODS[name].params, {param.name: value}, name)
    assert resolve(METHODS[name].params, {param.name: "yes"}, name)[param.name] is True  # --set name=yes
    assert resolve(METHODS[name].params, {param.name: False}, name)[param.name] is False


def test_a_choice_must_be_text():
    with pytest.raises(InvalidParameterError, match="not text"):
        resolve(METHODS["uce"].params, {"token_policy": 1}, "uce")


@pytest.mark.parametrize("name,param", [(n, p) for n, p in PARAMS if p.kind is str and not p.choices],
                         ids=lambda v: getattr(v, "name", v))
def test_free_text_is_described_as_text(name, param):
    # the description is what the command line's help, ComfyUI's tooltip and the WebUI's info show
    assert param.describe_range() == "text"
    with pytest.raises(InvalidParameterError, match=r"^.*3 is not text$"):
        resolve(METHODS[name].params, {param.name: 3}, name)


def test_numbers_still_come_as_numbers_or_text():
    assert resolve(METHODS["uce"].params, {"lam": "0.25"}, "uce").lam == 0.25
    assert resolve(METHODS["uce"].params, {"lam": 2}, "uce").lam == 2.0


def test_resolved_values_are_read_as_attributes_and_recorded_as_a_dict():
    values = resolve(METHODS["rece"].params, {"epochs": "3"}, "rece")
    assert values.epochs == 3 and values.lam == 2.0 and values.epoch is None
    assert dict(values) == {p.name: values[p.name] for p in METHODS["rece"].params}  # reports and provenance
    with pytest.raises(AttributeError, match="no parameter 'epoch_count'.*epochs"):
        values.epoch_count  # noqa: B018 - a misspelt parameter is an error, not None
    with pytest.raises(AttributeError, match="read-only"):
        values.lam = 1.0
    changed = values.replace(token_policy="all_tokens")
    assert changed.token_policy == "all_tokens" and values.token_policy == "last_word_to_end"


def test_the_route_and_tab_refuse_lam_true_naming_the_field():
    with pytest.raises(RequestError) as err:
        parse_erase({"erase": "van gogh", "params": {"lam": True}})
    assert err.value.field == "params.lam" and err.value.status == 400
