"""One entry point for every host: validate, run the method, wrap the result as a patch with provenance."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .concepts import Concepts
from .editable import EditableModel, Progress, no_progress
from .methods import get_method
from .params import resolve
from .patch import ErasurePatch, provenance_step
from .pooled import check_pooled, with_pooled_edit
from .probe import brief, recoverability


@dataclass(frozen=True)
class ErasureResult:
    patch: ErasurePatch  # this erasure's own step; compose with earlier ones via ErasurePatch.then
    report: dict[str, Any]
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)  # see MethodOutput.artifacts


def erase(
    model: EditableModel,
    method: str,
    concepts: Concepts,
    params: Mapping[str, Any] | None = None,
    progress: Progress = no_progress,
) -> ErasureResult:
    """Erase `concepts` from `model` with `method`; the model itself is never modified."""
    chosen = get_method(method)
    values = resolve(chosen.params, params or {}, chosen.name)
    check_pooled(model.arch, values)
    start = time.perf_counter()
    output = chosen.run(model, concepts, values, progress)
    output = with_pooled_edit(model, concepts, values, output, progress)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    # Every method's result is probed the same way (see `probe`): can some input still recreate the targets?
    kv_changes: dict[str, float] = {}
    probe = recoverability(model, ErasurePatch(model.arch.family, output.edits), concepts.targets, progress=progress,
                           changes=kv_changes)
    step = provenance_step(chosen.name, values, concepts.as_dict(), model.source(), model.arch.family)
    step["results"] = {**output.summary, "probe": brief(probe)}
    patch = ErasurePatch(model.arch.family, output.edits, (step,))
    report = {
        "method": chosen.name,
        "params": values,
        "concepts": concepts.as_dict(),
        "architecture": model.arch.family,
        "source": model.source(),
        "seconds": round(seconds, 4),
        "layers": layer_changes(model, patch, kv_changes),
        "probe": probe,
        **output.details,
    }
    return ErasureResult(patch, report, output.artifacts)


def layer_changes(model: EditableModel, patch: ErasurePatch,
                  known: Mapping[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Per edited matrix: relative change ‖W − W_o‖ / ‖W_o‖ (from `known` where already measured) and the
    edit's form."""
    out = {}
    for key, stages in patch.edits.items():
        if known and key in known:
            change = known[key]
        else:
            weight = model.weight(key)
            original = weight.float()
            base = original.norm().item()
            change = (patch.apply_to(key, weight).float() - original).norm().item() / base if base else 0.0
        out[key] = {"relative_change": change, "form": "+".join(s.kind for s in stages)}
    return out
