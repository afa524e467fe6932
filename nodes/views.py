"""Preview Erasure (original vs erased, host sampler) and Erasure Report (figures as text and a plot).

Images are drawn with PIL, which ComfyUI already depends on."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..concept_eraser.expansion import describe_expansion
from ..concept_eraser.models.arch import UNET_PREFIX, natural_key
from .common import CATEGORY, ERASURE, headline, lines

PAD = 6
COLUMNS = ("original", "erased")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def to_image_tensor(image) -> torch.Tensor:
    """A PIL RGB image as a ComfyUI IMAGE: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def labelled_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Rows (prompt, original image [H, W, 3], erased image) → one IMAGE: a header with the column titles,
    each row's prompt above its pair of images."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[:2]
    size = max(10, min(16, w // 10))
    font = _font(size)
    band = size + 2 * PAD
    width = 2 * w + 3 * PAD
    height = band + len(rows) * (band + h) + PAD
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((PAD + c * (w + PAD) + 2, PAD), _fit(draw, title, font, w - 4), fill=(230, 230, 230), font=font)
    y = band
    for prompt, original, erased in rows:
        draw.text((PAD + 2, y + PAD), _fit(draw, prompt, font, width - 2 * PAD - 4), fill=(250, 210, 120), font=font)
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


def report_text(erasure) -> str:
    """The erasure's figures: what, how, how much changed where, and how recoverable the concept is."""
    r = erasure.report
    concepts = r.get("concepts", {})
    layers = r.get("layers", {})
    changes = [v["relative_change"] for v in layers.values()]
    out = headline(erasure) + [
        "",
        f"method: {r.get('method')}   architecture: {r.get('architecture')}   strength: {erasure.strength:g}",
        f"erased: {', '.join(concepts.get('erase', []))}",
        f"guides: {', '.join(g or '(empty prompt)' for g in concepts.get('guide', []))}",
        f"preserved: {', '.join(concepts.get('preserve', [])) or '(none)'}",
        f"parameters: {json.dumps(r.get('params', {}), default=str)}",
        f"solve time: {r.get('seconds', 0):.2f} s on {r.get('source', {}).get('name', '?')}",
        f"edited tensors: {len(layers)} (U-Net {sum(k.startswith(UNET_PREFIX) for k in layers)}, "
        f"text encoder {sum(not k.startswith(UNET_PREFIX) for k in layers)})",
    ]
    if changes:
        out.append(f"relative change ‖ΔW‖/‖W‖: mean {sum(changes) / len(changes):.4g}, max {max(changes):.4g}")
    sparsity = sparsity_by_key(erasure)
    if sparsity:
        out.append(f"zeros in the edited weights (sparse edit): mean {sum(sparsity.values()) / len(sparsity):.1%}")
    probe = r.get("probe") or {}
    if probe.get("targets"):
        out.append(f"recoverability probe (λ_r = {probe.get('lam_r')}; residual 0 / cosine 1 = fully recoverable):")
        for target, f in probe["targets"].items():
            out.append(f"  {target}: residual {f['residual']:.3f}, cosine {f['cosine']:.3f}, "
                       f"direct change {f['direct']:.3f}, norm ratio {f['norm_ratio']:.3f}")
    if r.get("expansion"):
        out.append(describe_expansion(r["expansion"]))
    extra = {k: v for k, v in r.items() if k not in ("method", "params", "concepts", "architecture", "source",
                                                     "seconds", "layers", "probe", "warnings",
                                                     "expansion")}
    for key, value in extra.items():
        text = json.dumps(value, default=str)
        out.append(f"{key}: {text if len(text) <= 600 else text[:600] + '…'}")
    return "\n".join(out)


def sparsity_by_key(erasure) -> dict[str, float]:
    """The fraction of zeros in the new weights of every sparse edit (the report's `layers` record it)."""
    return {key: v["zeros"] for key, v in erasure.report.get("layers", {}).items() if "zeros" in v}


def short_name(key: str) -> str:
    name = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
    for old, new in (("input_blocks.", "in"), ("output_blocks.", "out"), ("middle_block.", "mid"),
                     (".transformer_blocks.", "t"), (".attn2.to_", " "), (".weight", ""),
                     ("encoder.layers.", "L"), ("transformer.resblocks.", "L")):
        name = name.replace(old, new)
    return name


def plot_title(erasure) -> str:
    """ASCII only: the font PIL bundles has no dash or double-bar glyphs (they were drawn as boxes)."""
    r = erasure.report
    erased = ", ".join(r.get("concepts", {}).get("erase", []))
    return f"{r.get('method')}: {erased} - relative change |dW|/|W| per tensor"


def layer_plot(erasure, width: int = 960, height: int = 420) -> torch.Tensor:
    """Bars of ‖ΔW‖/‖W‖ per edited tensor in model order (K blue, V orange, text encoder green), with the
    zero fraction of sparse edits as a line; labels on the first, middle and last bars."""
    from PIL import Image, ImageDraw

    layers = erasure.report.get("layers", {})
    keys = sorted(layers, key=lambda k: (k.startswith(UNET_PREFIX), natural_key(k)))
    sparsity = sparsity_by_key(erasure)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(13)
    left, right, top, bottom = 64, 16, 40, 56
    title = plot_title(erasure)
    draw.text((left, 10), _fit(draw, title, font, width - left - right), fill=(0, 0, 0), font=font)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0))
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0))
    if not keys:
        draw.text((x0 + 10, (y0 + y1) // 2), "no edited tensors", fill=(0, 0, 0), font=font)
        return to_image_tensor(image)
    top_value = max(layers[k]["relative_change"] for k in keys) or 1.0
    scale = 10 ** math.floor(math.log10(top_value))
    top_value = math.ceil(top_value / scale) * scale
    for i in range(5):
        value = top_value * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
        draw.text((4, y - 7), f"{value:.3g}", fill=(0, 0, 0), font=font)
        if i:
            draw.line((x0 + 1, y, x1, y), fill=(225, 225, 225))
    slot = (x1 - x0) / len(keys)
    for i, key in enumerate(keys):
        value = layers[key]["relative_change"]
        if not key.startswith(UNET_PREFIX):
            color = (60, 160, 90)
        else:
            color = (70, 110, 200) if key.endswith("to_k.weight") else (235, 140, 50)
        xa = x0 + i * slot + max(0.5, slot * 0.1)
        xb = x0 + (i + 1) * slot - max(0.5, slot * 0.1)
        top = min(y1 - 1, y1 - (y1 - y0) * value / top_value)  # an unchanged tensor: a 1-pixel bar
        draw.rectangle((xa, top, max(xa, xb), y1 - 1), fill=color)
        if key in sparsity:
            y = y1 - (y1 - y0) * sparsity[key]
            draw.line((xa, y, max(xa, xb), y), fill=(200, 30, 30), width=2)
    for i in sorted({0, len(keys) // 2, len(keys) - 1}):
        label = _fit(draw, short_name(keys[i]), font, 220)
        x = min(max(x0, x0 + i * slot), x1 - draw.textlength(label, font=font))
        draw.text((x, y1 + 6), label, fill=(60, 60, 60), font=font)
    legend = "blue: K   orange: V   green: text encoder" + ("   red line: zero fraction (0-1)" if sparsity else "")
    draw.text((x0, height - 24), legend, fill=(60, 60, 60), font=font)
    return to_image_tensor(image)


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

        text = report_text(erasure)
        plot = layer_plot(erasure)
        ui = nodes.PreviewImage().save_images(plot, filename_prefix="ConceptEraser_report")["ui"]
        return {"ui": {**ui, "text": [text]}, "result": (text, plot)}


NODE_CLASS_MAPPINGS = {"ConceptEraserPreview": PreviewErasure, "ConceptEraserReport": ErasureReport}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEraserPreview": "Preview Erasure", "ConceptEraserReport": "Erasure Report"}
