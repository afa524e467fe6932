"""What the nodes share: the category, the ERASURE socket type, node inputs generated from the solver's
declared parameters, and turning solver errors into messages that name the node's input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..concept_eraser.errors import (EraserError, ErasureFileError, InvalidParameterError, UnsafeFileError,
                                     UnsupportedModelError)
from ..concept_eraser.methods import METHODS
from ..concept_eraser.models.arch import ArchSpec
from ..concept_eraser.params import AUTO_BOOL, Param, auto_bool_choice
from ..concept_eraser.patch import ErasurePatch

try:  # options every method offers (declared once in the solver); absent in older solver versions
    from ..concept_eraser.methods.base import COMMON_PARAMS
except ImportError:  # pragma: no cover
    COMMON_PARAMS = ()

CATEGORY = "Concept Eraser"
ERASURE = "ERASURE"
# Widget bounds where a parameter declares none (the frontend needs finite ones).
UNBOUNDED = 1e9
# What to do with a patch or erasure LoRA given where a checkpoint is expected, in ComfyUI.
ERASURE_FILE_ADVICE = ("put it in the models/erasures folder and apply it to its checkpoint's MODEL and CLIP with "
                       "the Apply Erasure Patch node")
# Concept-list fields of the solver (`Concepts.build`) → the node inputs they come from.
CONCEPT_FIELDS = {"erase": "targets", "guide": "guides", "preserve": "preserve"}


@dataclass(frozen=True)
class Erasure:
    """What an ERASURE socket carries: one erase node's edit (at full strength), its report, the strength
    the node applied it at, and the architecture it was solved for."""

    patch: ErasurePatch
    report: Mapping[str, Any]
    strength: float
    arch: ArchSpec
    # provenance of every erasure on the erased MODEL, oldest first (this one last)
    lineage: tuple[dict, ...] = field(default_factory=tuple)
    # what the method learned besides the edit (KPOP's prompt), for Save Erasure's 'learned_prompt' format
    artifacts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def results(self) -> Mapping[str, Any]:
        """The headline figures its provenance step keeps (`concept_eraser.report` shows them)."""
        return self.patch.steps[-1].get("results", {}) if self.patch.steps else {}


def lines(text: str | None) -> list[str]:
    """One concept per line; blank lines and surrounding spaces are ignored."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# ---- method parameters as node inputs ------------------------------------------------------------

def is_common(param: Param) -> bool:
    return any(param == c for c in COMMON_PARAMS)


def input_name(method: str, param: Param) -> str:
    """The node input of a method parameter: `<method>_<param>` (stable as methods are added); options every
    method shares (`COMMON_PARAMS`) are one input, under their own name."""
    return param.name if is_common(param) else f"{method}_{param.name}"


def param_inputs() -> dict[str, tuple[str, dict]]:
    """Every method's parameters as optional node inputs, in registry order, with their defaults, ranges
    and help as tooltips. Each carries the method it belongs to (for the frontend, which shows only the
    chosen method's) and its own name as a label."""
    out: dict[str, tuple[str, dict]] = {}
    shared: dict[str, tuple[str, dict]] = {}
    for method in METHODS.values():
        for p in method.params:
            name = input_name(method.name, p)
            target = shared if is_common(p) else out
            if name in target:
                if is_common(p):
                    continue
                raise RuntimeError(f"two method parameters map to the node input {name!r}")
            spec = widget(p)
            spec[1]["concept_eraser_method"] = "" if is_common(p) else method.name
            spec[1]["concept_eraser_label"] = p.name
            target[name] = spec
    if set(out) & set(shared):
        raise RuntimeError(f"method parameters clash with shared ones: {sorted(set(out) & set(shared))}")
    out.update(shared)  # options every method has come last, after the chosen method's own
    clash = set(out) & {"model", "clip", "method", "targets", "guides", "preserve", "strength"}
    if clash:
        raise RuntimeError(f"method parameters clash with the node's own inputs: {sorted(clash)}")
    return out


def widget(p: Param) -> tuple[str, dict]:
    """One `Param` as a ComfyUI input: BOOLEAN, a combo, INT, FLOAT, or STRING for "empty = rule" values."""
    default = p.default
    tooltip = f"{p.help} ({p.describe_range()}"
    if p.nullable:
        tooltip += "; 'auto' = the rule described"
    tooltip += ")"
    if p.kind is bool and p.nullable:  # a BOOLEAN cannot say "auto"
        return list(AUTO_BOOL), {"default": auto_bool_choice(default), "tooltip": tooltip}
    if p.kind is bool:
        return "BOOLEAN", {"default": bool(default), "tooltip": tooltip}
    if p.choices:
        return list(p.choices), {"default": default, "tooltip": tooltip}
    if p.nullable or p.kind is str:
        text = "auto" if default is None else str(default)
        return "STRING", {"default": text, "multiline": False, "tooltip": tooltip}
    low = -UNBOUNDED if p.min is None else p.min
    high = UNBOUNDED if p.max is None else p.max
    if p.kind is int:
        low = low + 1 if p.min is not None and p.min_exclusive else low  # ComfyUI's min is inclusive
        return "INT", {"default": int(default), "min": int(low), "max": int(high), "step": int(p.step or 1),
                       "tooltip": tooltip}
    step = p.step or _float_step(default)
    unit = float_unit(step)
    if p.min is not None and p.min_exclusive:  # the least value the solver accepts that the widget can show
        low = p.min + unit
    return "FLOAT", {"default": float(default), "min": float(low), "max": float(high), "step": step,
                     "round": unit, "tooltip": tooltip}


def _float_step(default: float) -> float:
    if not default:
        return 0.01
    return 10.0 ** math.floor(math.log10(abs(default)))


def float_unit(step: float) -> float:
    """What ComfyUI's frontend rounds a FLOAT widget to by default: one unit of the step's last decimal
    (`useFloatWidget`: precision = max(0, -floor(log10(step)))). Given as the widget's `round`, so that
    the value shown is the value sent."""
    return 10.0 ** -max(0, -math.floor(math.log10(step)))


def method_values(method: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen method's parameter values from the node's inputs (absent ones take their defaults)."""
    chosen = METHODS[method]
    return {p.name: inputs[input_name(chosen.name, p)] for p in chosen.params if input_name(chosen.name, p) in inputs}


def unknown_inputs(given: Mapping[str, Any], declared: set[str]) -> list[str]:
    """Inputs of an API-format graph that look like method parameters but are none (typos, removed
    parameters): `<method>_<anything>` or a bare parameter name. Other unknown keys are the host's business."""
    prefixes = tuple(f"{m}_" for m in METHODS)
    bare = {p.name for m in METHODS.values() for p in m.params}
    return sorted(k for k in given if k not in declared and (k.startswith(prefixes) or k in bare))


# ---- errors --------------------------------------------------------------------------------------

def node_error(exc: EraserError, method: str | None = None, model_field: str = "model",
               file_field: str | None = None) -> ValueError:
    """A ValueError whose message starts with the node input at fault, as ComfyUI shows it: `model_field` for a
    model that cannot be edited, `file_field` for a file that cannot be read (not safetensors)."""
    if isinstance(exc, InvalidParameterError):
        field_name, text = exc.field, exc.detail
        if field_name in CONCEPT_FIELDS:
            field_name = CONCEPT_FIELDS[field_name]
        elif method and method in METHODS:
            param = next((p for p in METHODS[method].params if p.name == field_name), None)
            if param is not None:
                field_name = input_name(method, param)
        return ValueError(f"{field_name}: {text}")
    if isinstance(exc, ErasureFileError):  # the solver's advice names the command line's `apply`
        exc = ErasureFileError(exc.kind, ERASURE_FILE_ADVICE)
    if isinstance(exc, UnsupportedModelError):
        return ValueError(f"{model_field}: {exc}")
    if isinstance(exc, UnsafeFileError) and file_field:
        return ValueError(f"{file_field}: {exc}")
    return ValueError(str(exc))
