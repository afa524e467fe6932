"""The pooled text path: an optional closed-form edit of the maps that read the pooled embedding (`POOLED` maps
of the model's family: SDXL's first ADM layer, Flux's vector_in.in_layer, SD3's y_embedder.mlp.0), offered by
every method.

SDXL's U-Net reads the prompt twice: per-token features through the cross-attention K/V (what the
methods edit), and the pooled bigG embedding p — the final layer-normed EOS state times
`text_projection`, 1280 values — as the first block of the 2816-wide ADM vector
y = [p, six 256-wide size/crop embeddings] (ComfyUI comfy/model_base.py `SDXL.encode_adm`), which
enters through `label_emb.0.0` (Linear 2816 → 1280). K/V edits never touch this path, so the concept
leaks through it (UCE's SDXL erasure is reported weak, its issue #35); UCE's FLUX script edits the
pooled-text embedder for the same reason.

With `pooled_edit`, after the method has run, the pooled columns W = label_emb.0.0.weight[:, :1280]
get UCE's ridge (`linalg.uce_factors`); the size/crop columns and the bias are kept:

    min_W  ‖W P_E − W_o P_G‖² + s_p ‖W P_P − W_o P_P°‖² + λ ‖W − W_o‖²
    W = W_o + W_o [(P_G − P_E) P_Eᵀ + s_p (P_P° − P_P) P_Pᵀ] M⁻¹,   M = λI + P_E P_Eᵀ + s_p P_P P_Pᵀ

Columns: P_E the targets' pooled embeddings, P_G their guides', P_P the preserved prompts' plus the
empty prompt's (the usual negative, so unconditional guidance keeps its meaning). P_E and P_P are
computed with the text encoder as the method leaves it (ErasePro edits it), P_G and P_P° with the
original one; when the method leaves the text encoder alone P_P = P_P° and this is UCE's formula.
The update has rank ≤ #targets (+ #preserved when the text encoder changed): a LoRA-shaped edit.
Flux and SD3 read the pooled vector whole (CLIP-L's 768 values; SD3 CLIP-L ⊕ CLIP-G's 2048) through their
first pooled embedder layer: the same edit over all of its columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from .concepts import Concepts
from .editable import EditableModel, Progress
from .errors import EraserError, InvalidParameterError
from .linalg import right_update_edits, uce_factors
from .models.arch import POOLED, ArchSpec
from .models.layerwise import LayerwiseEncoder
from .params import Param, Values
from .patch import Edit

POOLED_PARAMS = (
    Param("pooled_edit", bool, False, "SDXL, Flux, SD3: also edit the pooled-text path (SDXL label_emb's pooled "
          "columns, Flux vector_in, SD3 y_embedder) so a target's pooled embedding acts like its guide's; the "
          "per-token edits alone leave this path untouched"),
    Param("pooled_lam", float, 0.5, "pooled edit: λ, weight of ‖W − W_o‖² (larger keeps label_emb closer to the "
          "original)",
          min=0.0, min_exclusive=True, max=1e6, step=0.05),
    Param("pooled_preserve_scale", float, 1.0, "pooled edit: weight of keeping the preserved prompts' and the empty "
          "prompt's pooled outputs", min=0.0, max=1e4, step=0.1),
)


def check_pooled(arch: ArchSpec, values: Values) -> None:
    """Refuse `pooled_edit` on a model without a pooled path, before any work."""
    if not values.pooled_edit:
        return
    if not arch.map_keys(POOLED):
        raise InvalidParameterError(
            "pooled_edit", f"{arch.title} has no pooled text path to edit (SDXL, Flux and SD3 feed a pooled "
            "embedding to the denoiser; SD1.x/2.x do not); turn it off")


def _apply_stages(stages, weight: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        weight = stage.apply(weight)
    return weight


def pooled_embeddings(model: EditableModel, prompts: tuple[str, ...],
                      text_edits: Mapping[str, tuple[Edit, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, current) pooled embeddings [n, width], float32. Without text-encoder edits both are the
    model's own encoder's; with them both come from one rebuilt encoder, before and after the edits."""
    spec = next(e for e in model.arch.encoders if e.pooled)
    edited = {k: v for k, v in text_edits.items() if k.startswith(spec.prefix)}
    if not edited:
        pooled = model.text_encoder.encode(prompts).pooled
        if pooled is None:
            raise EraserError("the model's text encoder does not give the pooled embedding "
                              "(EncodedPrompts.pooled), which pooled_edit needs")
        return pooled.float(), pooled.float()
    encoder = LayerwiseEncoder(spec, model.keys(), model.weight, model.device)
    original = encoder.encode(prompts)[1]
    for key, stages in edited.items():
        encoder.set_weight(key, _apply_stages(stages, model.weight(key)))
    return original.float(), encoder.encode(prompts)[1].float()


def pooled_edit(model: EditableModel, concepts: Concepts, values: Values,
                method_edits: Mapping[str, tuple[Edit, ...]], progress: Progress) -> tuple[dict[str, Edit], dict]:
    """The edit of every map that reads the pooled embedding (SDXL: label_emb) for `concepts`, on top of the
    method's `method_edits`; with report figures over those maps' pooled columns."""
    progress(0, 1, "editing the pooled path")
    preserve = tuple(dict.fromkeys(("",) + concepts.preserve))
    prompts = tuple(dict.fromkeys(concepts.targets + concepts.guides + preserve))
    original, current = pooled_embeddings(model, prompts, method_edits)
    index = {p: i for i, p in enumerate(prompts)}

    def cols(source, names):
        return source[[index[p] for p in names]].T.double()

    p_e, p_g = cols(current, concepts.targets), cols(original, concepts.guides)
    p_p, p_p0 = cols(current, preserve), cols(original, preserve)
    moved = not torch.equal(p_p, p_p0)
    A, B = uce_factors(p_e, p_g, p_p, values.pooled_lam, 1.0, values.pooled_preserve_scale, torch.float64,
                       preserve_target=p_p0 if moved else None)
    edits, old, new = {}, [], []
    for text_map in model.arch.maps:
        if text_map.reads != POOLED:
            continue
        weight = _apply_stages(method_edits.get(text_map.key, ()), model.weight(text_map.key))
        # ΔW touches only the pooled columns: pad the right factors with zero rows for the other columns.
        start, stop = text_map.columns or (0, weight.shape[1])
        A_map, B_map = (torch.cat([f.new_zeros(start, f.shape[1]), f, f.new_zeros(weight.shape[1] - stop, f.shape[1])])
                        for f in (A, B))
        edits[text_map.key] = right_update_edits({text_map.key: weight}, A_map, B_map)[text_map.key]
        old.append(weight.double()[:, start:stop])
        new.append(edits[text_map.key].apply(weight).double()[:, start:stop])
    progress(1, 1, "editing the pooled path")

    new, old = torch.cat(new), torch.cat(old)
    wanted = old @ p_g

    def gap(w):
        return float((w @ p_e - wanted).norm() / wanted.norm())

    return edits, {
        "target_gap_before": gap(old),  # ‖W_o P_E − W_o P_G‖ / ‖W_o P_G‖
        "target_gap_after": gap(new),
        "preserve_drift": float((new @ p_p - old @ p_p0).norm() / (old @ p_p0).norm()),
        "rank": A.shape[1],
    }


def with_pooled_edit(model: EditableModel, concepts: Concepts, values: Values, output, progress: Progress):
    """`output` (a MethodOutput) plus the pooled edit when `pooled_edit` is set; called by `api.erase`."""
    if not values.pooled_edit:
        return output
    extra, figures = pooled_edit(model, concepts, values, output.edits, progress)
    edits = dict(output.edits)
    for key, edit in extra.items():
        edits[key] = edits.get(key, ()) + (edit,)
    return replace(output, edits=edits, details={**output.details, "pooled": figures})
