"""Inputs of the tab and of the HTTP route, checked the same way: every problem is a `RequestError`
naming the field (``erase``, ``method``, ``params.lam``, ``format`` …) and saying what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from concept_eraser.checkpoint import FORMATS
from concept_eraser.concepts import Concepts
from concept_eraser.errors import InvalidParameterError
from concept_eraser.methods import METHODS, get_method
from concept_eraser.params import resolve


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400):
        self.field = field
        self.message = message
        self.status = status
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class EraseRequest:
    method: str
    concepts: Concepts
    params: dict[str, Any]  # as given (the solver resolves them); already checked


@dataclass(frozen=True)
class SaveRequest:
    format: str
    name: str
    overwrite: bool


ERASE_FIELDS = ("method", "erase", "guide", "preserve", "params")
SAVE_FIELDS = ("format", "name", "overwrite")
_BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")
NAME_MAX = 255  # bytes in a file name on the usual file systems (ext4, NTFS, APFS)


def _object(body: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(str(unknown[0]), f"unknown field; the fields are: {', '.join(allowed)}")
    return body


def lines(value: Any, field: str, keep_empty: bool = False) -> list[str]:
    """Text with one entry per line (blank lines are skipped), or a list of strings (empty ones too, with
    `keep_empty`: a guide "" is the empty prompt, as the command line's --guide "")."""
    if value is None:
        return []
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if keep_empty or v.strip()]
    raise RequestError(field, "must be text (one entry per line) or a list of strings")


def parse_erase(body: Any) -> EraseRequest:
    body = _object(body, ERASE_FIELDS)
    name = body.get("method", "uce")
    if not isinstance(name, str):
        raise RequestError("method", f"must be a string, one of {', '.join(METHODS)}")
    try:
        method = get_method(name)
    except InvalidParameterError as exc:
        raise RequestError("method", exc.detail) from None
    targets = lines(body.get("erase"), "erase")
    guides = lines(body.get("guide"), "guide", keep_empty=True)
    preserve = lines(body.get("preserve"), "preserve")
    if not targets:
        raise RequestError("erase", "give at least one concept to erase")
    try:
        concepts = Concepts.build(targets, guides, preserve)
    except InvalidParameterError as exc:
        raise RequestError(exc.field, exc.detail) from None
    params = body.get("params") or {}
    if not isinstance(params, Mapping):
        raise RequestError("params", f"must be an object of {method.name}'s parameters")
    try:
        resolve(method.params, params, method.name)
    except InvalidParameterError as exc:
        raise RequestError(f"params.{exc.field}", exc.detail) from None
    return EraseRequest(method.name, concepts, dict(params))


def parse_save(body: Any) -> SaveRequest:
    body = _object(body, SAVE_FIELDS)
    fmt = body.get("format", "checkpoint")
    if fmt not in FORMATS:
        raise RequestError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    name = body.get("name", "")
    if not isinstance(name, str) or not name.strip():
        raise RequestError("name", "give a file name")
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if _BAD_NAME.search(name) or name in (".", "..") or name.startswith("."):
        raise RequestError("name", f"{name!r} is not a plain file name (no folders, no \\ / : * ? \" < > |)")
    size = len(name.encode())
    if size + len(".safetensors") > NAME_MAX:  # its .yaml companion is shorter
        raise RequestError("name", f"is too long ({size} bytes in UTF-8): at most {NAME_MAX - len('.safetensors')}, "
                           "as a file name takes 255 with .safetensors")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise RequestError("overwrite", "must be true or false")
    return SaveRequest(fmt, name, overwrite)


def parse_prompts(body: Any, limit: int = 16) -> list[str]:
    body = _object(body, ("prompts",))
    prompts = body.get("prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts", "give a list of prompts (strings; the empty prompt is allowed)")
    if len(prompts) > limit:
        raise RequestError("prompts", f"at most {limit} prompts at a time")
    return prompts


def default_name(checkpoint_filename: str, records) -> str:
    """`<checkpoint>-erased-<first concepts>`: a name that says what was done."""
    import os

    stem = os.path.splitext(os.path.basename(checkpoint_filename))[0] or "model"
    concepts = [c for r in records for c in r.concepts.get("erase", [])]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", "-".join(concepts[:3])).strip("_")[:48]
    return f"{stem}-erased" + (f"-{slug}" if slug else "")
