"""Method parameters, declared once and shared by the command line, ComfyUI and the WebUI.

Each method lists its `Param`s; `resolve` fills defaults, converts text (``--set name=value``)
and checks ranges, raising `InvalidParameterError` that names the field and the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParameterError

AUTO_BOOL = ("auto", "true", "false")  # what UIs offer for a nullable boolean (None = auto)


def auto_bool_choice(value: bool | None) -> str:
    """The `AUTO_BOOL` entry a UI shows for a nullable boolean's value (None = auto)."""
    return AUTO_BOOL[0] if value is None else AUTO_BOOL[1] if value else AUTO_BOOL[2]


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, int, bool or str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False  # e.g. λ > 0
    choices: tuple[str, ...] | None = None
    step: float | None = None  # UI hint only
    nullable: bool = False  # None means "use the rule described in help"

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "text"
        low = "" if self.min is None else (f"> {self.min}" if self.min_exclusive else f">= {self.min}")
        high = "" if self.max is None else f"<= {self.max}"
        bounds = " and ".join(b for b in (low, high) if b)
        return f"a{'n integer' if self.kind is int else ' number'}" + (f" {bounds}" if bounds else "")

    def convert(self, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "auto", "")):
            if self.nullable:
                return None
            if value is None:
                raise InvalidParameterError(self.name, f"a value is required ({self.describe_range()})")
        # JSON and Python make true == 1: a boolean is never taken for a number, nor a number for a boolean
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise InvalidParameterError(self.name, f"{value!r} is not true or false")
        if isinstance(value, bool):
            raise InvalidParameterError(self.name, f"{value!r} is not {self.describe_range()}")
        if self.kind is str:
            if not isinstance(value, str):
                choices = f" ({self.describe_range()})" if self.choices else ""
                raise InvalidParameterError(self.name, f"{value!r} is not text{choices}")
            text = value.strip()
            if self.choices and text not in self.choices:
                raise InvalidParameterError(self.name, f"{text!r} is not {self.describe_range()}")
            return text
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidParameterError(self.name, f"{value!r} is not {self.describe_range()}") from None
        if not math.isfinite(number):
            raise InvalidParameterError(self.name, f"{value!r} is not a finite number")
        if self.kind is int:
            if not number.is_integer():
                raise InvalidParameterError(self.name, f"{value!r} is not an integer")
            number = int(number)
        too_low = self.min is not None and (number <= self.min if self.min_exclusive else number < self.min)
        too_high = self.max is not None and number > self.max
        if too_low or too_high:
            raise InvalidParameterError(self.name, f"{value!r} is out of range: must be {self.describe_range()}")
        return number


class Values(Mapping[str, Any]):
    """A method's parameter values, resolved: read as attributes (`values.lam`); a read-only mapping where they
    are recorded (`dict(values)` in reports and provenance)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; the parameters are {', '.join(self._values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("parameter values are read-only: use replace()")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Values({self._values!r})"

    def replace(self, **changes: Any) -> Values:
        """These values with some of them changed (already converted: no check)."""
        unknown = set(changes) - set(self._values)
        if unknown:
            raise AttributeError(f"no parameter {min(unknown)!r}")
        return Values({**self._values, **changes})


def resolve(params: Sequence[Param], values: Mapping[str, Any], method: str) -> Values:
    """Defaults overlaid with `values`, converted and range-checked; unknown names are refused."""
    known = {p.name: p for p in params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidParameterError(
            unknown[0], f"unknown parameter for method {method!r}; its parameters are: {', '.join(known)}"
        )
    return Values({p.name: p.convert(values[p.name]) if p.name in values else p.default for p in params})


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["lam=0.1", "policy=all_tokens"]`` → dict, for the command line's ``--set``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidParameterError("--set", f"{item!r} is not NAME=VALUE")
        name = name.strip()
        if name in out:  # which one was meant is not for us to guess
            raise InvalidParameterError(name, f"given twice ({out[name]!r} and {value.strip()!r}): give it once")
        out[name] = value.strip()
    return out
