"""Load Checkpoint, Apply Erasure Patch and Save Erasure: files in and out, through the host's own loading
and saving wherever the host has it."""

from __future__ import annotations

import json
import logging
import os

from ..concept_eraser.checkpoint import FORMATS, META_PREFIX, load_patch, provenance_metadata, read_steps, save_erasure
from ..concept_eraser.errors import EraserError, InvalidParameterError, UnsupportedModelError
from ..concept_eraser.models.arch import detect, is_text_encoder_key
from ..concept_eraser.patch import ErasurePatch, check_fits
from ..concept_eraser.safetensors_io import SafetensorsReader, atomic_output
from .common import CATEGORY, ERASURE, node_error

log = logging.getLogger("concept_eraser")

ERASURES_FOLDER = "erasures"  # models/erasures: patch files and erasure LoRAs
FOLDERS = ("output", "models")


def register_folders() -> None:
    """models/erasures as a model folder of its own (extra_model_paths.yaml may add more paths)."""
    try:
        import folder_paths
    except ImportError:  # not inside ComfyUI
        return
    folder_paths.add_model_folder_path(ERASURES_FOLDER, os.path.join(folder_paths.models_dir, ERASURES_FOLDER))
    folder_paths.folder_names_and_paths[ERASURES_FOLDER][1].add(".safetensors")


def _file_signature(folder: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if not path:
        return ""
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _choice(name: str, value, choices) -> str | None:
    """The message for a value that is not one of `choices` (None: not known yet, or fine)."""
    if value is None or value in choices:
        return None
    return f"{name}: {value!r} is not one of {', '.join(choices)}"


def _shape_of(adapter):
    """The model's shape of a checkpoint key, None when it has no such tensor (for `check_fits`)."""
    def shape(key: str):
        try:
            return adapter.weight_shape(key)
        except KeyError:
            return None
    return shape


class LoadCheckpoint:
    DESCRIPTION = ("Loads a checkpoint like Load Checkpoint, after checking from the file's header that it is a "
                   "Stable Diffusion 1.x / 2.x / XL model or an all-in-one Flux.1 / SD3 one Concept Eraser can edit "
                   "(others are refused before loading). Also reports the architecture and the maps that read the "
                   "text (cross-attention K/V, or the transformer's entry projections).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("model", "clip", "vae", "layout")
    OUTPUT_TOOLTIPS = (
        "The diffusion model.",
        "The CLIP model used for encoding text prompts.",
        "The VAE for encoding and decoding images.",
        "The detected architecture, the text encoders and every cross-attention K/V matrix, as text.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                          {"tooltip": "The checkpoint (from the checkpoints folder) to load."}),
        }}

    def load(self, ckpt_name):
        import comfy.sd
        import folder_paths

        from .host import SOURCE_ATTACHMENT, STEPS_ATTACHMENT, ComfyModel, describe_layout

        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        steps: list = []
        if path.lower().endswith(".safetensors"):
            try:  # the header alone: refuse what cannot be edited before reading gigabytes
                reader = SafetensorsReader(path)
                shapes = {k: i.shape for k, i in reader.infos.items()}
                lone = not any(k.startswith("text_encoders.") for k in shapes)
                if lone and detect(shapes, reader.metadata, text=False).denoiser != "unet":
                    raise UnsupportedModelError(
                        f"{os.path.basename(path)} holds a Flux / SD3 transformer without its text encoders: load it "
                        "with Load Diffusion Model (models/diffusion_models) or the core Load Checkpoint, and its text "
                        "encoders with DualCLIPLoader (flux) or TripleCLIPLoader (SD3)")
                detect(shapes, reader.metadata)
                steps = list(read_steps(reader.metadata, "ckpt_name"))
            except EraserError as exc:
                raise node_error(exc, model_field="ckpt_name", file_field="ckpt_name") from None
        embeddings = folder_paths.get_folder_paths("embeddings")
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=True, output_clip=True, embedding_directory=embeddings)[:3]
        try:
            adapter = ComfyModel(model, clip)
        except EraserError as exc:
            raise node_error(exc, model_field="ckpt_name") from None
        model.set_attachments(SOURCE_ATTACHMENT, {"name": os.path.basename(ckpt_name), "host": "ComfyUI"})
        model.set_attachments(STEPS_ATTACHMENT, tuple(steps))
        layout = describe_layout(adapter.arch, adapter.unet_shapes)
        if steps:
            layout += f"\n\nalready erased: {len(steps)} erasure(s) recorded in the file"
        return {"ui": {"text": [layout]}, "result": (model, clip, vae, layout)}


class ApplyErasurePatch:
    DESCRIPTION = ("Applies a saved erasure (a Concept Eraser patch file or erasure LoRA from models/erasures) to a "
                   "MODEL and CLIP at a strength, as patches on clones: the inputs stay unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "info")
    OUTPUT_TOOLTIPS = ("The model with the erasure applied.", "The CLIP, patched where the erasure edits the "
                       "text encoder.", "What the file holds: its erasures (method, concepts, parameters).")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to apply the erasure to (the architecture it was made for)."}),
            "clip": ("CLIP", {"tooltip": "The model's CLIP."}),
            "erasure_name": (folder_paths.get_filename_list(ERASURES_FOLDER),
                             {"tooltip": "A patch file or erasure LoRA from the models/erasures folder."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "How much of the erasure is applied: 0 = none, 1 = all of it."}),
        }, "optional": {
            "force": ("BOOLEAN", {"default": False, "tooltip": "Apply the erasure even to a model it was not made "
                                  "for (another checkpoint of the same architecture), as a change to that model's "
                                  "weights. Off: such a model is refused, naming the checkpoint the erasure is for."}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, clip, erasure_name, strength, force=False):
        return _file_signature(ERASURES_FOLDER, erasure_name)

    def apply(self, model, clip, erasure_name, strength, force=False):
        import folder_paths

        from .host import ComfyModel

        path = folder_paths.get_full_path_or_raise(ERASURES_FOLDER, erasure_name)
        try:
            meta = SafetensorsReader(path).metadata
            kind = meta.get(META_PREFIX + "format")
            steps = list(read_steps(meta, "erasure_name"))
            if kind not in ("patch", "lora"):
                raise InvalidParameterError("erasure_name", f"{erasure_name} is not a Concept Eraser patch or erasure "
                                            "LoRA (use the core LoRA loader for other LoRAs)")
            adapter = ComfyModel(model, clip)
            # a LoRA's tensors are checked by the host's key mapping; its source like a patch's
            patch = load_patch(path, "erasure_name").in_layout(adapter.arch) if kind == "patch" else ErasurePatch(
                meta.get(META_PREFIX + "architecture", ""), {}, tuple(steps))
            check_fits(patch, adapter.arch, adapter.weight, _shape_of(adapter),
                       bool(force), "erasure_name", "set force to true")
            if kind == "patch":
                new_model, new_clip = self._apply_patch(model, clip, adapter, patch, strength)
            else:
                new_model, new_clip = self._apply_lora(model, clip, path, strength, steps)
        except EraserError as exc:
            raise node_error(exc, file_field="erasure_name") from None
        info = "\n".join(f"{i}. {s.get('method')}: erase {', '.join(s.get('concepts', {}).get('erase', []))} "
                         f"(made on {s.get('source', {}).get('name')}, {s.get('created')})"
                         for i, s in enumerate(steps, 1))
        info = f"{erasure_name} ({kind}, strength {strength}):\n{info}"
        return {"ui": {"text": [info]}, "result": (new_model, new_clip, info)}

    @staticmethod
    def _apply_patch(model, clip, adapter, patch: ErasurePatch, strength: float):
        from .host import apply_erasure

        steps = tuple(dict(s, strength=float(strength)) for s in patch.steps)
        return apply_erasure(model, clip, adapter, patch, float(strength), steps)

    @staticmethod
    def _apply_lora(model, clip, path: str, strength: float, steps):
        import comfy.lora
        import comfy.lora_convert
        import comfy.utils

        from .host import STEPS_ATTACHMENT

        lora = comfy.utils.load_torch_file(path, safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        lora = comfy.lora_convert.convert_lora(lora)
        modules = {k[:-len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
        unknown = sorted(modules - set(key_map))
        if unknown:
            raise InvalidParameterError("erasure_name", f"the LoRA module {unknown[0]} has no counterpart in this "
                                        f"model ({len(unknown)} of {len(modules)}); it was made for another "
                                        "architecture")
        loaded = comfy.lora.load_lora(lora, key_map)
        new_model, new_clip = model.clone(), clip.clone()
        accepted = set(new_model.add_patches(loaded, strength)) | set(new_clip.add_patches(loaded, strength))
        if set(loaded) - accepted:
            raise InvalidParameterError("erasure_name", f"ComfyUI did not accept {sorted(set(loaded) - accepted)[0]}")
        prior = model.get_attachment(STEPS_ATTACHMENT) or ()
        steps = tuple(dict(s, strength=float(strength)) for s in steps)
        new_model.set_attachments(STEPS_ATTACHMENT, tuple(prior) + steps)
        return new_model, new_clip


class SaveErasure:
    DESCRIPTION = (
        "Saves an erasure: 'checkpoint' writes the whole patched model through ComfyUI's own checkpoint saving "
        "(the layout Save Checkpoint writes), with the erasures' provenance and the workflow in its metadata; "
        "'patch' writes only the changed tensors; 'lora' writes the erasure as a LoRA (low-rank erasures only); "
        "'learned_prompt' writes KPOP's learned prompt, which re-enables the concept (keep it private). "
        "Files get a new numbered name: nothing is overwritten."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "erasure": (ERASURE, {"tooltip": "The erasure from an Erase Concept node."}),
                "format": (list(FORMATS), {"default": "checkpoint", "tooltip": "checkpoint: the whole model (needs "
                           "model, clip and vae); patch: only the changed tensors (apply it with Apply Erasure "
                           "Patch); lora: a LoRA file (low-rank erasures: UCE, RECE); learned_prompt: KPOP's prompt."}),
                "folder": (list(FOLDERS), {"default": "output", "tooltip": "output: ComfyUI's output folder; models: "
                           "models/checkpoints for a checkpoint (it then appears in the loaders), models/erasures "
                           "for a patch or LoRA (it then appears in Apply Erasure Patch)."}),
                "filename_prefix": ("STRING", {"default": "concept_eraser/erased", "tooltip": "File name prefix, "
                                    "may include a sub-folder; a counter and .safetensors are appended."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The erased model (for format 'checkpoint'): Erase Concept's model "
                                    "output, or a later node's; a model without the erasure is refused."}),
                "clip": ("CLIP", {"tooltip": "The erased CLIP (for format 'checkpoint'): Erase Concept's clip output, "
                                  "or a later node's; where the erasure edits the text encoder (ErasePro), a CLIP "
                                  "without that edit is refused."}),
                "vae": ("VAE", {"tooltip": "The VAE to store in the checkpoint (for format 'checkpoint')."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, format=None, folder=None):
        """Checked when the prompt is queued, before any node runs (an input fed by a link is checked in save)."""
        return _choice("format", format, FORMATS) or _choice("folder", folder, FOLDERS) or True

    def save(self, erasure, format, folder, filename_prefix, model=None, clip=None, vae=None, prompt=None,
             extra_pnginfo=None):
        import folder_paths

        invalid = _choice("format", format, FORMATS) or _choice("folder", folder, FOLDERS)
        if invalid:
            raise ValueError(invalid)
        if format == "checkpoint":
            for name, value in (("model", model), ("clip", clip), ("vae", vae)):
                if value is None:
                    raise ValueError(f"{name}: format 'checkpoint' needs the erased model, its CLIP and a VAE")
        if folder == "output":
            root = folder_paths.get_output_directory()
        else:
            root = folder_paths.get_folder_paths("checkpoints" if format == "checkpoint" else ERASURES_FOLDER)[0]
        root = os.path.abspath(root)
        try:
            out_dir, name, counter, _sub, _prefix = folder_paths.get_save_image_path(filename_prefix, root)
        except Exception as exc:  # noqa: BLE001 - the host raises a bare Exception for paths outside the folder
            raise ValueError(f"filename_prefix: {exc}") from None
        path = os.path.join(out_dir, f"{name}_{counter:05}_.safetensors")
        if os.path.exists(path):
            raise ValueError(f"filename_prefix: {path} already exists; nothing was overwritten")
        try:
            # the erasure's patch is already relative to the weights it was solved on (see the Erase node)
            save_erasure(format, path, erasure.patch, erasure.arch, artifacts=erasure.artifacts, report=erasure.report,
                         checkpoint=lambda out: self._checkpoint(out, erasure, model, clip, vae, prompt, extra_pnginfo),
                         field="filename_prefix")
        except EraserError as exc:
            raise node_error(exc) from None
        log.info("[Concept Eraser] saved %s (%s)", path, format)
        return {"ui": {"text": [f"{format} saved to {path}"]}, "result": (path,)}

    @staticmethod
    def _checkpoint(path, erasure, model, clip, vae, prompt, extra_pnginfo):
        import comfy.model_base
        import comfy.model_sampling
        import comfy.sd
        from comfy.cli_args import args

        from .host import ComfyModel, recorded_steps

        try:
            ComfyModel(model, clip)  # refuse a model the erasure's nodes could not have made
        except UnsupportedModelError as exc:
            raise ValueError(f"model: {exc}") from None
        # the file claims the erasure: the weights written must carry it (not the loader's model or CLIP)
        last = erasure.lineage[-1]
        steps = recorded_steps(model)
        if last not in steps:
            raise ValueError("model: this MODEL does not carry the erasure; connect Erase Concept's model and clip "
                             "outputs (or the outputs of a later node) to Save Erasure")
        if any(is_text_encoder_key(key) for key in erasure.patch.edits) and last not in recorded_steps(clip.patcher):
            raise ValueError("clip: this CLIP does not carry the erasure's text-encoder edit; connect Erase "
                             "Concept's clip output (or the output of a later node) to Save Erasure")
        metadata = provenance_metadata(ErasurePatch(erasure.arch.family, {}, steps), "checkpoint")
        erased = metadata[META_PREFIX + "erased"]
        metadata["modelspec.title"] = f"{os.path.basename(path)[:-len('.safetensors')]} (erased: {erased})"
        if erasure.arch.modelspec_architecture:
            metadata["modelspec.architecture"] = erasure.arch.modelspec_architecture
            metadata["modelspec.sai_model_spec"] = "1.0.0"
            metadata["modelspec.implementation"] = "sgm"
        extra_keys = {}
        if model.model.model_type == comfy.model_base.ModelType.EPS:
            metadata["modelspec.predict_key"] = "epsilon"
        elif model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
            # the markers ComfyUI's loader reads back (as its own checkpoint saving writes them)
            import torch

            metadata["modelspec.predict_key"] = "v"
            extra_keys["v_pred"] = torch.tensor([])
            if getattr(model.get_model_object("model_sampling"), "zsnr", False):
                extra_keys["ztsnr"] = torch.tensor([])
        if not args.disable_metadata:
            metadata["prompt"] = json.dumps(prompt) if prompt is not None else ""
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        # ComfyUI's writer, into a partial file that becomes `path` only when complete and never over another file
        with atomic_output(path, field="filename_prefix") as (_, partial):
            comfy.sd.save_checkpoint(str(partial), model, clip, vae, metadata=metadata, extra_keys=extra_keys)
        return path


NODE_CLASS_MAPPINGS = {
    "ConceptEraserLoadCheckpoint": LoadCheckpoint,
    "ConceptEraserApplyPatch": ApplyErasurePatch,
    "ConceptEraserSave": SaveErasure,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEraserLoadCheckpoint": "Load Checkpoint (Concept Eraser)",
    "ConceptEraserApplyPatch": "Apply Erasure Patch",
    "ConceptEraserSave": "Save Erasure",
}
