"""Erase Concept: one node for every registered method, its inputs generated from the methods' Params."""

from __future__ import annotations

import logging
import warnings

from ..concept_eraser.api import erase
from ..concept_eraser.concepts import Concepts
from ..concept_eraser.errors import EraserError
from ..concept_eraser.methods import METHODS
from ..concept_eraser.params import resolve
from ..concept_eraser.patch import ErasurePatch
from ..concept_eraser.report import headline
from .common import CATEGORY, ERASURE, Erasure, lines, method_values, node_error, param_inputs, unknown_inputs

log = logging.getLogger("concept_eraser")

TEXT_TOOLTIP = "plain text, one per line (no weighting syntax: brackets are taken literally)"


class EraseConcept:
    DESCRIPTION = (
        "Erases concepts from a Stable Diffusion 1.x / 2.x / XL, Flux.1 or SD3 model by editing its weights: "
        "closed-form edits of the maps that read the text (U-Net: cross-attention K/V; Flux, SD3: the transformer's "
        "text entry projections, and with pooled_edit the pooled one; ErasePro also the text encoder) in seconds, "
        "or KPOP's training of the U-Net with a learnable prompt (minutes on a GPU; progress bar per step, cancel "
        "keeps the input model). The inputs are cloned and patched, never "
        "changed: other branches keep the original model. The strength scales the edit like a LoRA's. "
        "Erase nodes chain: a second one edits the output of the first. Methods: "
        + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    )
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", "CLIP", ERASURE)
    RETURN_NAMES = ("model", "clip", "erasure")
    OUTPUT_TOOLTIPS = (
        "The model with the erasure applied as a patch at the chosen strength.",
        "The CLIP, patched too when the method edits the text encoder (ErasePro); otherwise the input CLIP.",
        "The erasure itself (the edit, its report and the strength) for Save Erasure and Erasure Report.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to erase from (SD1.x, SD2.x, SDXL; Flux.1, "
                                    "SD3 from Load Diffusion Model or an all-in-one checkpoint)."}),
                "clip": ("CLIP", {"tooltip": "The model's CLIP: concept features are computed with it, clip skip "
                                             "(CLIP Set Last Layer) included. Flux: DualCLIPLoader (flux) with "
                                             "clip_l and t5xxl; SD3: TripleCLIPLoader."}),
                "method": (list(METHODS), {"default": "uce", "tooltip": "The erasure method; only its parameters are "
                                           "shown. " + " ".join(f"{m.name}: {m.summary}." for m in METHODS.values())}),
                "targets": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": f"Concepts to erase, {TEXT_TOOLTIP}, e.g. 'Van Gogh'."}),
                "guides": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": f"What the erased concepts become, {TEXT_TOOLTIP}: one for all "
                                                 "targets or one per target; empty = the empty prompt."}),
                "preserve": ("STRING", {"multiline": True, "default": "", "tooltip":
                                        f"Concepts to keep unchanged, {TEXT_TOOLTIP}, e.g. 'Claude Monet'."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "How much of the edit is applied (the host's patch strength): "
                                                  "0 = none, 1 = the full erasure."}),
            },
            "optional": param_inputs(),
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, targets):
        if targets is not None and not lines(targets):
            return "targets: give at least one concept to erase (one per line)"
        return True

    def erase(self, model, clip, method, targets, guides, preserve, strength, prompt=None, unique_id=None, **params):
        from .host import ComfyModel, HostProgress, apply_erasure, reserve_device_memory

        declared = set(self.INPUT_TYPES()["required"]) | set(self.INPUT_TYPES()["optional"])
        given = (prompt or {}).get(str(unique_id), {}).get("inputs", {}) if unique_id is not None else {}
        unknown = unknown_inputs(given, declared)
        if unknown:
            known = ", ".join(n for n in self.INPUT_TYPES()["optional"] if n.startswith(method + "_"))
            raise ValueError(f"{unknown[0]}: unknown parameter; {method}'s parameters are: {known}")
        if method not in METHODS:
            raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength: {strength} is out of range: must be between 0 and 1")
        try:
            concepts = Concepts.build(lines(targets), lines(guides), lines(preserve))
            chosen = METHODS[method]
            values = resolve(chosen.params, method_values(method, params), chosen.name)
            adapter = ComfyModel(model, clip)
        except EraserError as exc:
            raise node_error(exc, method) from None
        reserve_device_memory(adapter, text_encoder=method == "erasepro")
        progress = HostProgress()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = erase(adapter, method, concepts, values, progress)
            report = dict(result.report, warnings=[str(w.message) for w in caught])
            for text in report["warnings"]:
                log.warning("[Concept Eraser] %s", text)
            # Every figure is known before anything is patched; a cancel up to here leaves nothing behind.
            step = dict(result.patch.steps[-1], strength=float(strength), host="ComfyUI")
            # dense and sparse edits as changes to the weights they were solved on: that is how they are
            # patched in, and how a saved patch stays a change on a model it is forced onto
            patch = ErasurePatch(result.patch.architecture, result.patch.relative(adapter.effective_float).edits,
                                 (step,))
            new_model, new_clip = apply_erasure(model, clip, adapter, patch, float(strength), (step,))
        except EraserError as exc:
            raise node_error(exc, method) from None
        erasure = Erasure(patch, report, float(strength), adapter.arch, adapter.prior_steps() + (step,),
                          result.artifacts)
        log.info("[Concept Eraser] %s erased %s in %.2f s (%d tensors patched at strength %.2f)", method,
                 ", ".join(concepts.targets), result.report.get("seconds", 0.0), len(result.patch.edits), strength)
        text = "\n".join(headline(erasure.report, erasure.results, erasure.strength))
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, erasure)}


NODE_CLASS_MAPPINGS = {"ConceptEraserErase": EraseConcept}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEraserErase": "Erase Concept"}
