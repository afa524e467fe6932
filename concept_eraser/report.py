"""An erasure's report for people: the headline lines, the full text and a per-tensor plot, rendered the same
way by every host (ComfyUI's Erase Concept and Erasure Report nodes, the WebUI tab).

Each takes the report of `api.erase` (`ErasureResult.report`), the headline figures its provenance step keeps
(`step["results"]`: whether an iterative solver converged, ...) and the strength the host applied it at.
The plot is a PIL image (PIL is imported only here: both hosts ship it)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .expansion import describe_expansion
from .models.arch import UNET_PREFIX, is_text_encoder_key, natural_key

Report = Mapping[str, Any]


def duration(seconds: float) -> str:
    """"0.04 s" reads as nothing: milliseconds below a second."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def headline(report: Report, results: Mapping[str, Any] | None = None, strength: float = 1.0) -> list[str]:
    """What a user checks first after an erase, as lines: what was erased how fast, whether the solver
    converged, the sparsity of a sparse edit, how recoverable each target is, then every warning."""
    r, results = report, results or {}
    layers = r.get("layers", {})
    changes = [v["relative_change"] for v in layers.values()]
    out = [f"{r.get('method')}: erased {', '.join(r.get('concepts', {}).get('erase', []))} in "
           f"{duration(r.get('seconds', 0.0))}; {len(layers)} tensors changed"
           + (f" (mean relative change {sum(changes) / len(changes):.3g})" if changes else "")
           + f", strength {strength:g}"]
    if "converged" in results:
        # SPACE's `iterations` is its cap on passes over the weights; the figure kept is the passes made
        passes = f" after {results['iterations']} passes" if "iterations" in results else ""
        out.append(f"converged: {'yes' if results['converged'] else 'NO'}{passes}")
    zeros = [v["zeros"] for v in layers.values() if "zeros" in v]
    if zeros:
        out.append(f"sparsity: {sum(zeros) / len(zeros):.1%} zeros in the edited weights")
    probe = (r.get("probe") or {}).get("targets") or {}
    if probe:
        out.append("recoverability (residual 0 = fully recoverable): "
                   + ", ".join(f"{t} {f['residual']:.3f}" for t, f in probe.items()))
    out += [f"WARNING: {w}" for w in r.get("warnings", [])]
    return out


def report_text(report: Report, results: Mapping[str, Any] | None = None, strength: float = 1.0) -> str:
    """The erasure's figures: what, how, how much changed where, and how recoverable the concept is."""
    r = report
    concepts = r.get("concepts", {})
    layers = r.get("layers", {})
    changes = [v["relative_change"] for v in layers.values()]
    out = headline(report, results, strength) + [
        "",
        f"method: {r.get('method')}   architecture: {r.get('architecture')}   strength: {strength:g}",
        f"erased: {', '.join(concepts.get('erase', []))}",
        f"guides: {', '.join(g or '(empty prompt)' for g in concepts.get('guide', []))}",
        f"preserved: {', '.join(concepts.get('preserve', [])) or '(none)'}",
        f"parameters: {json.dumps(r.get('params', {}), default=str)}",
        f"solve time: {duration(r.get('seconds', 0.0))} on {r.get('source', {}).get('name', '?')}",
        (f"edited tensors: {len(layers)} (denoiser {sum(not is_text_encoder_key(k) for k in layers)}, "
         f"text encoder {sum(is_text_encoder_key(k) for k in layers)})"),
    ]
    if changes:
        out.append(f"relative change ‖ΔW‖/‖W‖: mean {sum(changes) / len(changes):.4g}, max {max(changes):.4g}")
    sparsity = sparsity_by_key(report)
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


def sparsity_by_key(report: Report) -> dict[str, float]:
    """The fraction of zeros in the new weights of every tensor a sparse method (SPACE) edited, stored sparse or
    dense (the report's `layers` record it)."""
    return {key: v["zeros"] for key, v in report.get("layers", {}).items() if "zeros" in v}


def short_name(key: str) -> str:
    name = key.removeprefix(UNET_PREFIX)
    for old, new in (("input_blocks.", "in"), ("output_blocks.", "out"), ("middle_block.", "mid"),
                     (".transformer_blocks.", "t"), (".attn2.to_", " "), (".weight", ""),
                     ("encoder.layers.", "L"), ("transformer.resblocks.", "L")):
        name = name.replace(old, new)
    return name


def plot_title(report: Report) -> str:
    """ASCII only: the font PIL bundles has no dash or double-bar glyphs (they were drawn as boxes)."""
    erased = ", ".join(report.get("concepts", {}).get("erase", []))
    return f"{report.get('method')}: {erased} - relative change |dW|/|W| per tensor"


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def fit_text(draw, text: str, font, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def layer_plot(report: Report, width: int = 960, height: int = 420):
    """Bars of ‖ΔW‖/‖W‖ per edited tensor in model order (K blue, V orange, text encoder green), with the
    zero fraction of sparse edits as a line; labels on the first, middle and last bars. A PIL RGB image."""
    from PIL import Image, ImageDraw

    layers = report.get("layers", {})
    keys = sorted(layers, key=lambda k: (not is_text_encoder_key(k), natural_key(k)))
    sparsity = sparsity_by_key(report)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    small = font(13)
    left, right, top, bottom = 64, 16, 40, 56
    draw.text((left, 10), fit_text(draw, plot_title(report), small, width - left - right), fill=(0, 0, 0), font=small)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0))
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0))
    if not keys:
        draw.text((x0 + 10, (y0 + y1) // 2), "no edited tensors", fill=(0, 0, 0), font=small)
        return image
    top_value = max(layers[k]["relative_change"] for k in keys) or 1.0
    scale = 10 ** math.floor(math.log10(top_value))
    top_value = math.ceil(top_value / scale) * scale
    for i in range(5):
        value = top_value * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
        draw.text((4, y - 7), f"{value:.3g}", fill=(0, 0, 0), font=small)
        if i:
            draw.line((x0 + 1, y, x1, y), fill=(225, 225, 225))
    slot = (x1 - x0) / len(keys)
    for i, key in enumerate(keys):
        value = layers[key]["relative_change"]
        if is_text_encoder_key(key):
            color = (60, 160, 90)
        else:
            color = (70, 110, 200) if key.endswith("to_k.weight") else (235, 140, 50)
        xa = x0 + i * slot + max(0.5, slot * 0.1)
        xb = x0 + (i + 1) * slot - max(0.5, slot * 0.1)
        bar_top = min(y1 - 1, y1 - (y1 - y0) * value / top_value)  # an unchanged tensor: a 1-pixel bar
        draw.rectangle((xa, bar_top, max(xa, xb), y1 - 1), fill=color)
        if key in sparsity:
            y = y1 - (y1 - y0) * sparsity[key]
            draw.line((xa, y, max(xa, xb), y), fill=(200, 30, 30), width=2)
    for i in sorted({0, len(keys) // 2, len(keys) - 1}):
        label = fit_text(draw, short_name(keys[i]), small, 220)
        x = min(max(x0, x0 + i * slot), x1 - draw.textlength(label, font=small))
        draw.text((x, y1 + 6), label, fill=(60, 60, 60), font=small)
    legend = "blue: K   orange: V   green: text encoder" + ("   red line: zero fraction (0-1)" if sparsity else "")
    draw.text((x0, height - 24), legend, fill=(60, 60, 60), font=small)
    return image
