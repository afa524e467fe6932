"""RECE — Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024, arXiv 2407.12383).

UCE first, then T epochs of derive-and-erase, as RECE's code (``train.py``,
``close_form_emb.py`` 'close_regzero', ``uce.py::edit_model_adversarial``) does it:

1. W ← UCE(W_o; targets → guides, preserved kept), columns by `token_policy` (RECE starts from
   checkpoints made with UCE's paper-era code, hence ``last_word_to_end``).
2. For epoch t = 1..T, with the CURRENT weights W_i (all K and V matrices i):

       c' = (λ_r I + Σ_i W_iᵀ W_i)⁻¹ (Σ_i W_iᵀ W_{o,i}) c        (RECE Eq. 8; see `probe`)

   for all 77 token positions c of each target prompt (BOS and padding included, as RECE's code),
   one d × d matrix shared by all targets of the epoch. Then the UCE closed form erases {c'} from
   the current weights, each c' paired position by position with the guide's 77 tokens, and the
   preserved prompts' 77 tokens kept:

       W ← W (λ I + s_e C_G C'ᵀ + s_p C_P C_Pᵀ)(λ I + s_e C' C'ᵀ + s_p C_P C_Pᵀ)⁻¹

   (targets map to W c_guide and preserved prompts to W c_p of the current weights, as in RECE).

Variables → paper symbols: ``lam`` λ₂ of Eq. 2 (UCE's ridge), ``preserve_scale`` λ₁, ``lam_r`` the λ
of Eqs. 6–8, ``epochs`` T of Alg. 1.

Defaults: λ = λ_p = 0.1 (RECE's published runs, after [16]); T = 5 and λ_r = 0.1, the paper's
setting for unsafe content. Of the two published settings (art: T = 10, λ_r = 1e-3) it is the
conservative one: a larger λ_r keeps c' small, which the paper's ablation (Fig. 6) shows keeps
unrelated concepts intact, and fewer epochs change the model less. RECE's authors then pick the epoch
whose derived embedding no longer shows the concept (epoch 2 for nudity; their README uses 1–3
epochs): the report lists the probe's figures after every epoch so the same choice can be made here
with `epoch`, and the output for ``epoch=k`` is exactly that of ``epochs=k``.

Each matrix's result is a tuple of stages, the UCE edit then one per epoch, each an exact update
ΔW = W A Bᵀ of rank ≤ n_e (77 per target in the epochs): low-rank where that is smaller.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from ..concepts import Concepts
from ..editable import EditableModel, Progress
from ..errors import InvalidParameterError
from ..linalg import right_update_edits, uce_factors
from ..params import Param
from ..probe import RecoveryProbe
from .base import ErasureMethod, MethodOutput
from .uce import SOLVE_DTYPES, UCE_PARAMS, gather_columns

_UCE = {p.name: p for p in UCE_PARAMS}

RECE_PARAMS = (
    Param("epochs", int, 5,
          "T: derive-and-erase epochs after the UCE step (RECE paper: 5 for unsafe content, 10 for art styles; "
          "its README: 1-3). 0 = UCE only", min=0, max=50, step=1),
    Param("lam_r", float, 0.1,
          "λ_r: regularisation of the derived embedding; larger keeps it small and spares unrelated concepts "
          "(RECE: 0.1 for unsafe content, 1e-3 for art styles)", min=0.0, min_exclusive=True, max=1e3, step=0.01),
    Param("epoch", int, None,
          "which epoch's weights to return (0 = the UCE step); empty = the last. The report shows every epoch's "
          "probe figures; epoch=k gives exactly the result of epochs=k", min=0, max=50, step=1, nullable=True),
    replace(_UCE["lam"], default=0.1, help="λ: weight of ‖W − W_o‖² in every UCE solve (RECE: 0.1)"),
    Param("preserve_scale", float, 0.1, "λ_p: weight of the preserve term in every UCE solve (RECE: 0.1)",
          min=0.0, max=1e4, step=0.05),
    _UCE["erase_scale"],
    replace(_UCE["token_policy"], help="token features of the first (UCE) step: last_word_to_end (UCE paper, "
            "which made RECE's starting checkpoints), last_word, all_tokens; the epochs always use all 77 "
            "tokens, as RECE's code"),
    replace(_UCE["preserve_empty"], help="always preserve the empty prompt (RECE's scripts do)"),
    _UCE["solve_dtype"],
)


class RECE(ErasureMethod):
    name = "rece"
    title = "RECE"
    summary = ("Reliable and Efficient Concept Erasure: UCE, then epochs that derive the embeddings which still "
               "evoke the concept and erase them too; seconds, more robust than UCE")
    params = RECE_PARAMS

    def run(
        self, model: EditableModel, concepts: Concepts, values: Mapping[str, Any], progress: Progress
    ) -> MethodOutput:
        epochs, lam_r = values["epochs"], values["lam_r"]
        chosen = epochs if values["epoch"] is None else values["epoch"]
        if chosen > epochs:
            raise InvalidParameterError(
                "epoch", f"{chosen} is beyond epochs={epochs}: choose 0..{epochs} or raise epochs")
        lam, s_e, s_p = values["lam"], values["erase_scale"], values["preserve_scale"]
        dtype = SOLVE_DTYPES[values["solve_dtype"]]

        progress(0, 1, "encoding prompts")
        first = gather_columns(model, concepts, values)
        every = gather_columns(model, concepts, dict(values, token_policy="all_tokens"))
        # Probe figures over each target's positions 1-76 (BOS is shared by all prompts; see `probe`).
        groups = {t: [j for j, o in enumerate(every.erase_owner) if o == i][1:] for i, t in enumerate(concepts.targets)}
        keys = model.arch.kv_keys
        originals = {key: model.weight(key) for key in keys}
        steps, done = (2 * epochs + 2) * len(keys), 0

        def tick(message: str):
            nonlocal done
            done += 1
            progress(done, steps, message)

        # 1. UCE (the epochs' "W^new" starts here).
        A, B = uce_factors(first.erase, first.guide, first.preserve, lam, s_e, s_p, dtype)
        stages = [right_update_edits(originals, A, B, lambda i, n: tick("UCE step"))]
        current = {key: stages[0][key].apply(originals[key]) for key in keys}

        # 2. Derive on the current weights (the figures of state t), then erase what was derived.
        figures = []
        for t in range(epochs + 1):
            probe = RecoveryProbe(every.erase)
            for key in keys:
                probe.add(current[key], originals[key])
                tick(f"epoch {t}: deriving embeddings")
            derived = probe.derive(lam_r)
            figures.append({"epoch": t, "weight_change": probe.weight_change,
                            "targets": probe.measure(derived, groups)})
            if t == epochs:
                break
            A, B = uce_factors(derived, every.guide, every.preserve, lam, s_e, s_p, dtype)
            stages.append(right_update_edits(current, A, B, lambda i, n: tick(f"epoch {t + 1}: erasing")))
            current = {key: stages[-1][key].apply(current[key]) for key in keys}

        kept = stages[: chosen + 1]
        return MethodOutput(
            {key: tuple(stage[key] for stage in kept) for key in keys},
            {
                "epoch_returned": chosen,
                "epochs": figures,
                "epoch_figures": "probe of the weights after each epoch (0 = UCE step) with RECE's lam_r, "
                                 "over each target's positions 1-76",
                "columns": {"uce_step": first.erase.shape[1], "epochs": every.erase.shape[1],
                            "preserve": every.preserve.shape[1]},
            },
            {"epoch": chosen, "residual_by_epoch": {t: [round(f["targets"][t]["residual"], 4) for f in figures]
                                                    for t in concepts.targets}},
        )
