"""One txt2img image through the WebUI's own pipeline (`processing.process_images`), as the txt2img tab
makes it: the same API in AUTOMATIC1111 1.10 and Forge. Nothing is saved to the outputs folder."""

from __future__ import annotations

from typing import Any, Mapping

# txt2img components the tab reads its settings from (elem_id → setting); see ui.capture_txt2img
TXT2IMG_SETTINGS = {
    "txt2img_neg_prompt": "negative_prompt",
    "txt2img_steps": "steps",
    "txt2img_sampling": "sampler_name",
    "txt2img_scheduler": "scheduler",
    "txt2img_cfg_scale": "cfg_scale",
    "txt2img_width": "width",
    "txt2img_height": "height",
    "txt2img_seed": "seed",
}
DEFAULTS = {"negative_prompt": "", "steps": 20, "sampler_name": "Euler a", "scheduler": None, "cfg_scale": 7.0,
            "width": 512, "height": 512, "seed": -1}


def settings_from(values: Mapping[str, Any]) -> dict:
    """Defaults overlaid with what the txt2img tab holds (None or empty means: keep the default)."""
    out = dict(DEFAULTS)
    for key, value in values.items():
        if key in out and value not in (None, ""):
            out[key] = value
    out["scheduler"] = out["scheduler"] or None
    return out


def render(prompt: str, seed: int, settings: Mapping[str, Any]):
    """A PIL image for `prompt` with `seed` and the txt2img `settings` on the model as it is now."""
    from modules import processing, shared
    from modules.shared import opts

    s = settings_from(settings)
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        outpath_samples=opts.outdir_samples or opts.outdir_txt2img_samples,
        outpath_grids=opts.outdir_grids or opts.outdir_txt2img_grids,
        prompt=prompt,
        negative_prompt=str(s["negative_prompt"]),
        seed=int(seed),
        sampler_name=s["sampler_name"],
        scheduler=s["scheduler"],
        steps=int(s["steps"]),
        cfg_scale=float(s["cfg_scale"]),
        width=int(s["width"]),
        height=int(s["height"]),
        batch_size=1,
        n_iter=1,
        do_not_save_samples=True,
        do_not_save_grid=True,
    )
    try:
        processed = processing.process_images(p)
    finally:
        p.close()
    return processed.images[0] if processed.images else None
