"""What every erasure method provides; the registry in `methods/__init__.py` lists them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..concepts import Concepts
from ..editable import EditableModel, Progress
from ..params import Param
from ..patch import Edit


@dataclass
class MethodOutput:
    edits: dict[str, tuple[Edit, ...]]
    details: dict[str, Any]  # method-specific figures for the report


class ErasureMethod:
    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]  # one line: what it is for (tooltips, README table)
    params: ClassVar[tuple[Param, ...]]

    def run(
        self, model: EditableModel, concepts: Concepts, values: Mapping[str, Any], progress: Progress
    ) -> MethodOutput:
        raise NotImplementedError
