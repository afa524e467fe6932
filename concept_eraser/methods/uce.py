"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761).

Closed-form edit of every cross-attention K and V matrix (see `linalg` for the formula). The
defaults reproduce the paper-era code that produced the published results: λ = 0.5, erase scale 1,
preserve scale max(0.1, 1 / #preserved prompts) with the empty prompt always preserved, and the
``last_word_to_end`` token policy (see `concepts`).
"""

from __future__ import annotations

import torch

from ..concepts import Columns, Concepts, concept_columns
from ..editable import EditableModel, Progress, WeightView
from ..linalg import right_update_edits, uce_factors
from ..params import Param, Values
from .base import ErasureMethod, MethodOutput

SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}

UCE_PARAMS = (
    Param("lam", float, 0.5, "λ: weight of ‖W − W_o‖²; larger keeps the model closer to the original",
          min=0.0, min_exclusive=True, max=1e6, step=0.05),
    Param("erase_scale", float, 1.0, "weight of the erase term (target → guide)", min=0.0, max=1e4, step=0.1),
    Param("preserve_scale", float, None,
          "weight of the preserve term; empty = max(0.1, 1/#preserved prompts), as UCE's paper code",
          min=0.0, max=1e4, step=0.05, nullable=True),
    Param("token_policy", str, "last_word_to_end",
          "which token features stand for a prompt: last_word_to_end (UCE paper), last_word (UCE's current "
          "script), all_tokens", choices=("last_word_to_end", "last_word", "all_tokens")),
    Param("preserve_empty", bool, True, "always preserve the empty prompt (UCE paper code does)"),
    Param("solve_dtype", str, "float64", "precision of the factorisation (the edit is written in the model's dtype)",
          choices=tuple(SOLVE_DTYPES)),
)


def preserve_scale_for(scale: float | None, columns_prompts: int) -> float:
    """The preserve scale given, or UCE's rule max(0.1, 1 / #preserved prompts) when none is."""
    if scale is not None:
        return float(scale)
    return max(0.1, 1.0 / max(columns_prompts, 1))


def gather_columns(model: EditableModel, concepts: Concepts, values: Values) -> Columns:
    columns = concept_columns(model.text_encoder, concepts, values.token_policy, values.preserve_empty)
    return Columns(*(c.to(model.device) for c in (columns.erase, columns.guide, columns.preserve)), columns.erase_owner)


class UCE(ErasureMethod):
    name = "uce"
    title = "UCE"
    summary = "Unified Concept Editing: one closed-form edit of every cross-attention K/V; seconds, the baseline"
    params = UCE_PARAMS

    def run(self, model: EditableModel, concepts: Concepts, values: Values, progress: Progress) -> MethodOutput:
        progress(0, 1, "encoding prompts")
        columns = gather_columns(model, concepts, values)
        n_preserved = len(concepts.preserve) + (1 if values.preserve_empty and "" not in concepts.preserve else 0)
        scale_p = preserve_scale_for(values.preserve_scale, n_preserved)
        A, B = uce_factors(columns.erase, columns.guide, columns.preserve, values.lam, values.erase_scale,
                           scale_p, SOLVE_DTYPES[values.solve_dtype])
        edits = right_update_edits(WeightView(model, model.arch.map_keys()), A, B,
                                   lambda i, n: progress(i, n, "editing cross-attention"))
        return MethodOutput(
            {k: (e,) for k, e in edits.items()},
            {"preserve_scale_used": scale_p, "columns": {"erase": columns.erase.shape[1],
                                                         "preserve": columns.preserve.shape[1]}},
        )
