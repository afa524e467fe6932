"""Registry of erasure methods: name → instance. Hosts build their method choices from it."""

from __future__ import annotations

from ..errors import InvalidParameterError
from .base import ErasureMethod, MethodOutput
from .erasepro import ErasePro
from .kpop import KPOP
from .rece import RECE
from .space import SPACE
from .uce import UCE

METHODS: dict[str, ErasureMethod] = {m.name: m for m in (UCE(), RECE(), SPACE(), ErasePro(), KPOP())}


def get_method(name: str) -> ErasureMethod:
    key = (name or "").strip().lower()
    if key not in METHODS:
        raise InvalidParameterError("method", f"{name!r} is not a known method; choose one of {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["METHODS", "ErasureMethod", "MethodOutput", "get_method"]
