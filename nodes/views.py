"""Preview Erasure (original vs erased, host sampler) and Erasure Report (figures as text and a plot).

Images are drawn with PIL, which ComfyUI already depends on."""

from __future__ import annotations

import numpy as np
import torch

from ..concept_eraser.report import fit_text, layer_plot, report_text
from ..concept_eraser.report import font as report_font
from .common import CATEGORY, ERASURE, lines

PAD = 6
COLUMNS = ("original", "erased")


def to_image_tensor(image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def labelled_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Rows (prompt, original image [H, W, 3], erased image) → one IMAGE: a header with the column titles,
    each row's prompt above its pair of images."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[:2]
    size = max(10, min(16, w // 10))
    font = report_font(size)
    band = size + 2 * PAD
    width = 2 * w + 3 * PAD
    height = band + len(rows) * (band + h) + PAD
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((PAD + c * (w + PAD) + 2, PAD), fit_text(draw, title, font, w - 4), fill=(230, 230, 230), font=font)
    y = band
    for prompt, original, erased in rows:
        label = fit_text(draw, prompt, font, width - 2 * PAD - 4)
        draw.text((PAD + 2, y + PAD), label, fill=(250, 210, 120), font=font)
        y += band
        for c, image in enumerate((original, erased)):
            pixels = (image.detach().clamp(0, 1).cpu().float().numpy() * 255.0).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels), (PAD + c * (w + PAD), y))
        y += h
    return to_image_tensor(canvas)


class PreviewErasure:
    DESCRIPTION = ("Renders the same prompts with the same seed on the original and the erased model with "
                   "ComfyUI's own sampler, and shows one labelled grid: a row per prompt, columns original | erased.")
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("The labelled comparison grid.",)

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The original model."}),
                "clip": ("CLIP", {"tooltip": "The original CLIP."}),
                "erased_model": ("MODEL", {"tooltip": "The erased model (from Erase Concept)."}),
                "erased_clip": ("CLIP", {"tooltip": "The erased CLIP (from Erase Concept)."}),
                "vae": ("VAE", {"tooltip": "The VAE to decode the images with."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "Prompts to render, one per line "
                            "(ComfyUI prompt syntax). Empty: the erasure's targets and preserved concepts."}),
                "negative": ("STRING", {"multiline": False, "default": "", "tooltip": "The negative prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                                 "tooltip": "The noise seed, the same for every image."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
            },
            "optional": {
                "erasure": (ERASURE, {"tooltip": "The erasure, for the default prompts (its concepts)."}),
            },
        }

    def preview(self, model, clip, erased_model, erased_clip, vae, prompts, negative, seed, steps, cfg, sampler_name,
                scheduler, width, height, erasure=None):
        import nodes  # ComfyUI's own nodes module (this pack is not on sys.path, so the name is the host's)

        texts = lines(prompts)
        if not texts and erasure is not None:
            concepts = erasure.report.get("concepts", {})
            texts = list(concepts.get("erase", [])) + list(concepts.get("preserve", []))
        if not texts:
            raise ValueError("prompts: give at least one prompt (one per line), or connect an erasure")
        latent = nodes.EmptyLatentImage().generate(width, height, 1)[0]

        conditioning = {}  # the same CLIP encodes a text once (UCE's erased CLIP is the input CLIP)

        def encode(c, text):
            if (id(c), text) not in conditioning:
                conditioning[id(c), text] = c.encode_from_tokens_scheduled(c.tokenize(text))
            return conditioning[id(c), text]

        def render(m, c, text):
            samples = nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler, encode(c, text),
                                            encode(c, negative), latent)[0]
            return nodes.VAEDecode().decode(vae, samples)[0][0]

        rows = [(text, render(model, clip, text), render(erased_model, erased_clip, text)) for text in texts]
        grid = labelled_grid(rows)
        ui = nodes.PreviewImage().save_images(grid, filename_prefix="ConceptEraser_preview")["ui"]
        return {"ui": ui, "result": (grid,)}


class ErasureReport:
    DESCRIPTION = ("Shows an erasure's figures: per-tensor change, sparsity, method residuals and the "
                   "recoverability probe, as text and as a per-layer plot.")
    CATEGORY = CATEGORY
    FUNCTION = "report"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("text", "plot")
    OUTPUT_TOOLTIPS = ("The report as text.", "Relative change of every edited tensor, in model order.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure": (ERASURE, {"tooltip": "The erasure from an Erase Concept node."})}}

    def report(self, erasure):
        import nodes

        text = report_text(erasure.report, erasure.results, erasure.strength)
        plot = to_image_tensor(layer_plot(erasure.report))
        ui = nodes.PreviewImage().save_images(plot, filename_prefix="ConceptEraser_report")["ui"]
        return {"ui": {**ui, "text": [text]}, "result": (text, plot)}


NODE_CLASS_MAPPINGS = {"ConceptEraserPreview": PreviewErasure, "ConceptEraserReport": ErasureReport}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEraserPreview": "Preview Erasure", "ConceptEraserReport": "Erasure Report"}
