"""One entry point for every host: validate, run the method, wrap the result as a patch with provenance."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import torch

from .concepts import Concepts
from .editable import EditableModel, Progress, no_progress
from .errors import InvalidParameterError
from .expansion import with_expansion
from .methods import get_method
from .params import resolve
from .patch import ErasurePatch, check_written_finite, provenance_step, source_fingerprint
from .pooled import resolve_pooled, with_pooled_edit
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
    reason = chosen.unsupported(model.arch)
    if reason:
        raise InvalidParameterError("method", f"{chosen.name} cannot edit {model.arch.title}: {reason}")
    values = resolve_pooled(model.arch, values)
    start = time.perf_counter()
    asked = concepts
    concepts, expansion = with_expansion(model, concepts, values, progress)
    output = chosen.run(model, concepts, values, progress)
    sparse = set(output.edits) if chosen.sparse else set()
    output = with_pooled_edit(model, concepts, values, output, progress)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    unnamed = ErasurePatch(model.arch.family, output.edits)
    # Every method's result is probed the same way (see `probe`): can some input still recreate the targets?
    # The per-layer figures are taken from the same application of the patch.
    layers = LayerChanges(unnamed, sparse)
    probe = recoverability(model, unnamed, asked.targets, progress=progress, each_edit=layers.add)
    layers.check()
    # the source's fingerprint lets every host refuse this patch on another checkpoint (`patch.check_fits`)
    source = dict(model.source(), fingerprint=source_fingerprint(model.arch, model.weight))
    earlier = model.prior_steps()
    if earlier:  # solved on their result: this step alone fits the source only with them applied
        source["after"] = [f"{s.get('method')}: {', '.join(s.get('concepts', {}).get('erase', []))}" for s in earlier]
    step = provenance_step(chosen.name, values, concepts.as_dict(), source, model.arch.family)
    step["results"] = {**output.summary, "probe": brief(probe)}
    patch = ErasurePatch(model.arch.family, output.edits, (step,))
    report = {
        "method": chosen.name,
        "params": dict(values),
        "concepts": concepts.as_dict(),
        "architecture": model.arch.family,
        "source": source,
        "seconds": round(seconds, 4),
        "layers": layers.figures,
        "probe": probe,
        **({"expansion": expansion.as_report()} if expansion else {}),
        **output.details,
    }
    return ErasureResult(patch, report, output.artifacts)


class LayerChanges:
    """Per edited tensor: relative change ‖W − W_o‖ / ‖W_o‖, the edit's form and, for the tensors of a sparse
    method's result (`sparse`, the keys it edited), the fraction of zeros in the new weights. Refuses a result that
    is not finite in the model's own dtype (what any host writes or patches in); `check` warns when the erasure is
    a no-op or leaves matrices all zero."""

    def __init__(self, patch: ErasurePatch, sparse: Collection[str] = ()):
        self.patch = patch
        self.sparse = sparse
        self.figures: dict[str, dict[str, float]] = {}
        self.zeroed: list[str] = []

    def add(self, key: str, new: torch.Tensor, original: torch.Tensor) -> None:
        check_written_finite(key, new)
        stages = self.patch.edits[key]
        new, original = new.float(), original.float()
        base = original.norm().item()
        self.figures[key] = {
            "relative_change": (new - original).norm().item() / base if base else 0.0,
            "form": "+".join(s.kind for s in stages),
        }
        if key in self.sparse:
            self.figures[key]["zeros"] = 1.0 - torch.count_nonzero(new).item() / new.numel()
        if base and not new.any():
            self.zeroed.append(key)

    def check(self) -> None:
        self.figures = figures = {key: self.figures[key] for key in self.patch.edits if key in self.figures}
        if figures and not any(v["relative_change"] for v in figures.values()):
            warnings.warn("the erasure changed no weight: every edited matrix is exactly as before", stacklevel=3)
        if self.zeroed:
            warnings.warn(f"{len(self.zeroed)} of the {len(figures)} edited matrices are now all zero, so those "
                          "layers ignore every prompt (SPACE: lower mu)", stacklevel=3)
