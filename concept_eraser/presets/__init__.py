"""Curated concept lists shipped as data: one wording per line in `<name>.txt`, provenance and licence in
each file's header (written by hand for this project, CC0-1.0). The command line's `--preset NAME` adds a
list's wordings to the concepts to erase; the expansion (`expand`) can then widen them further."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidParameterError

FOLDER = Path(__file__).parent


def names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in FOLDER.glob("*.txt")))


def load(name: str) -> tuple[str, ...]:
    """The wordings of preset `name` (comments and blank lines dropped)."""
    path = FOLDER / f"{name.strip().lower()}.txt"
    if name.strip().lower() not in names():
        raise InvalidParameterError("preset", f"{name!r} is not a preset; choose one of {', '.join(names())}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))
