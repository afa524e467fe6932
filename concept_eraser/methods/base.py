"""What every erasure method provides; the registry in `methods/__init__.py` lists them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..concepts import Concepts
from ..editable import EditableModel, Progress
from ..expansion import EXPANSION_PARAMS
from ..models.arch import ArchSpec
from ..params import Param, Values
from ..patch import Edit
from ..pooled import POOLED_PARAMS

# Options every method offers, declared once: appended to each method's `params` (so every host UI and
# `--set` lists them) and applied by `api.erase`: the expansion before the method runs, the pooled edit after.
COMMON_PARAMS: tuple[Param, ...] = EXPANSION_PARAMS + POOLED_PARAMS


@dataclass
class MethodOutput:
    edits: dict[str, tuple[Edit, ...]]
    details: dict[str, Any]  # method-specific figures for the report
    # a few headline figures kept in the output file's provenance (shown by `inspect`); small, JSON-able
    summary: dict[str, Any] = field(default_factory=dict)
    # tensors a method learns besides the edit, kept apart from the patch (KPOP's prompt, which re-enables
    # the concept): name → tensor, saved with `checkpoint.save_artifacts`
    artifacts: dict[str, Any] = field(default_factory=dict)


class ErasureMethod:
    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]  # one line: what it is for (tooltips, README table)
    params: ClassVar[tuple[Param, ...]]  # the method's own, then COMMON_PARAMS (added here)
    # its result is sparse by design (SPACE): the report gives the zeros of every tensor it edits, in whichever
    # form each is stored (a CSR only when that is smaller)
    sparse: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("params")
        if own is None:
            return
        extra = tuple(p for p in COMMON_PARAMS if p not in own)
        clash = {p.name for p in own} & {p.name for p in extra}
        if clash:
            raise TypeError(f"{cls.__name__} declares {sorted(clash)}, which every method already has (COMMON_PARAMS)")
        cls.params = tuple(own) + extra

    def unsupported(self, arch: ArchSpec) -> str | None:
        """Why this method cannot edit a model of this architecture (None: it can); `api.erase` refuses before
        any work. Methods that edit only the text-conditioning maps edit any."""
        return None

    def run(
        self, model: EditableModel, concepts: Concepts, values: Values, progress: Progress
    ) -> MethodOutput:
        raise NotImplementedError
