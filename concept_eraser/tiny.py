"""Tiny random checkpoints with the real key layouts of SD1.x, SD2.x, SDXL, Flux.1 and SD3.

Block names, depths and the text encoders' key layouts are the real ones (Flux and SD3: a few blocks of each
kind; their files as ComfyUI all-in-one checkpoints or as a diffusion-model-only file with bare BFL/SAI names
beside text-encoder files, `tiny_mmdit_files`); widths are small
(``text="full"`` writes real-size text encoders, for comparisons with the hosts). Seeded, so the
same call always writes the same file. Used by the tests, the benchmark and the demo.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.arch import CLIP_WINDOW, ENCODER_PREFIXES, UNET_PREFIX
from .safetensors_io import write_safetensors

VOCAB = 49408

# (block, transformer depth, level) of every spatial transformer in the real U-Nets.
SD_BLOCKS = [(f"input_blocks.{i}.1", 1, lvl) for i, lvl in ((1, 0), (2, 0), (4, 1), (5, 1), (7, 2), (8, 2))] + \
    [("middle_block.1", 1, 2)] + [(f"output_blocks.{i}.1", 1, 2 - (i - 3) // 3) for i in range(3, 12)]
SDXL_BLOCKS = [(f"input_blocks.{i}.1", d, lvl) for i, d, lvl in ((4, 2, 0), (5, 2, 0), (7, 10, 1), (8, 10, 1))] + \
    [("middle_block.1", 10, 1)] + [(f"output_blocks.{i}.1", 10 if i < 3 else 2, 1 if i < 3 else 0) for i in range(6)]

FULL_TEXT = {"clip_l": (768, 12, 3072), "clip_h": (1024, 24, 4096), "clip_g": (1280, 32, 5120)}
TINY_TEXT = {"clip_l": (64, 2, 128), "clip_h": (64, 3, 128), "clip_g": (96, 3, 192)}
T5_VOCAB = 32128  # T5 v1.1's SentencePiece vocabulary, padded as its embedding is
TINY_T5 = {"width": 192, "layers": 2, "heads": 3, "head_width": 64, "mlp": 256}
T5_XXL = {"width": 4096, "layers": 24, "heads": 64, "head_width": 64, "mlp": 10240}
MMDIT_FAMILIES = ("flux_dev", "flux_schnell", "sd3")


class _Init:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape, std=0.02):
        return (torch.randn(*shape, generator=self.gen) * std).to(self.dtype)

    def ones(self, *shape):
        return torch.ones(*shape, dtype=self.dtype)

    def zeros(self, *shape):
        return torch.zeros(*shape, dtype=self.dtype)


def _hf_clip(init: _Init, prefix: str, width: int, layers: int, mlp: int, position_ids: bool) -> dict:
    sd = {
        prefix + "embeddings.token_embedding.weight": init.normal(VOCAB, width),
        prefix + "embeddings.position_embedding.weight": init.normal(CLIP_WINDOW, width, std=0.01),
        prefix + "final_layer_norm.weight": init.ones(width),
        prefix + "final_layer_norm.bias": init.zeros(width),
    }
    if position_ids:
        sd[prefix + "embeddings.position_ids"] = torch.arange(CLIP_WINDOW).unsqueeze(0)
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = init.normal(width, width)
            sd[p + f"self_attn.{proj}.bias"] = init.normal(width)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + f"{norm}.weight"] = init.ones(width)
            sd[p + f"{norm}.bias"] = init.zeros(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = init.normal(mlp, width), init.normal(mlp)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = init.normal(width, mlp), init.normal(width)
    return sd


def _open_clip(init: _Init, prefix: str, width: int, layers: int, mlp: int) -> dict:
    sd = {
        prefix + "token_embedding.weight": init.normal(VOCAB, width),
        prefix + "positional_embedding": init.normal(CLIP_WINDOW, width, std=0.01),
        prefix + "ln_final.weight": init.ones(width),
        prefix + "ln_final.bias": init.zeros(width),
        prefix + "text_projection": init.normal(width, width),
        prefix + "logit_scale": torch.tensor(4.6052, dtype=init.dtype),
    }
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = init.normal(3 * width, width)
        sd[p + "attn.in_proj_bias"] = init.normal(3 * width)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = init.normal(width, width), init.normal(width)
        for norm in ("ln_1", "ln_2"):
            sd[p + f"{norm}.weight"], sd[p + f"{norm}.bias"] = init.ones(width), init.zeros(width)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = init.normal(mlp, width), init.normal(mlp)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = init.normal(width, mlp), init.normal(width)
    return sd


def _unet(init: _Init, blocks, widths, context: int, linear_proj: bool, adm: int | None) -> dict:
    u = "model.diffusion_model."
    sd = {u + "input_blocks.0.0.weight": init.normal(widths[0], 4, 3, 3),
          u + "input_blocks.0.0.bias": init.zeros(widths[0])}
    if adm:
        sd[u + "label_emb.0.0.weight"] = init.normal(4 * widths[0], adm)
        sd[u + "label_emb.0.0.bias"] = init.zeros(4 * widths[0])
    for block, depth, level in blocks:
        c = widths[level]
        b = f"{u}{block}."
        sd[b + "proj_in.weight"] = init.normal(c, c) if linear_proj else init.normal(c, c, 1, 1)
        for t in range(depth):
            p = f"{b}transformer_blocks.{t}."
            for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q"):
                sd[p + name + ".weight"] = init.normal(c, c)
            # K/V read the text: scale ~1/sqrt(context) like a trained layer's.
            sd[p + "attn2.to_k.weight"] = init.normal(c, context, std=context ** -0.5)
            sd[p + "attn2.to_v.weight"] = init.normal(c, context, std=context ** -0.5)
            sd[p + "attn2.to_out.0.weight"], sd[p + "attn2.to_out.0.bias"] = init.normal(c, c), init.zeros(c)
            for n in ("norm1", "norm2", "norm3"):
                sd[p + f"{n}.weight"], sd[p + f"{n}.bias"] = init.ones(c), init.zeros(c)
    sd[u + "out.2.weight"] = init.normal(4, widths[0], 3, 3)
    return sd


def _t5(init: _Init, prefix: str, width: int, layers: int, heads: int, head_width: int, mlp: int) -> dict:
    """T5 v1.1's encoder under transformers' names (gated GELU MLP, relative attention bias in block 0 only)."""
    inner = heads * head_width
    sd = {prefix + "shared.weight": init.normal(T5_VOCAB, width, std=1.0),
          prefix + "encoder.final_layer_norm.weight": init.ones(width)}
    for i in range(layers):
        p = f"{prefix}encoder.block.{i}.layer."
        for name in "qkv":
            sd[p + f"0.SelfAttention.{name}.weight"] = init.normal(inner, width, std=width ** -0.5)
        sd[p + "0.SelfAttention.o.weight"] = init.normal(width, inner, std=inner ** -0.5)
        if i == 0:
            sd[p + "0.SelfAttention.relative_attention_bias.weight"] = init.normal(32, heads, std=0.5)
        sd[p + "0.layer_norm.weight"] = init.ones(width)
        sd[p + "1.DenseReluDense.wi_0.weight"] = init.normal(mlp, width, std=width ** -0.5)
        sd[p + "1.DenseReluDense.wi_1.weight"] = init.normal(mlp, width, std=width ** -0.5)
        sd[p + "1.DenseReluDense.wo.weight"] = init.normal(width, mlp, std=mlp ** -0.5)
        sd[p + "1.layer_norm.weight"] = init.ones(width)
    return sd


def _linear(init: _Init, sd: dict, name: str, out: int, inp: int) -> None:
    sd[name + ".weight"], sd[name + ".bias"] = init.normal(out, inp, std=inp ** -0.5), init.normal(out)


def _flux(init: _Init, hidden: int, context: int, pooled: int, guidance: bool, double: int = 2,
          single: int = 2, heads: int = 2) -> dict:
    """Flux.1's transformer under BFL names (comfy/ldm/flux/model.py), `double` / `single` blocks of each kind."""
    sd: dict = {}
    _linear(init, sd, "img_in", hidden, 64)
    _linear(init, sd, "txt_in", hidden, context)
    for embedder, width in (("time_in", 256), ("vector_in", pooled), *((("guidance_in", 256),) if guidance else ())):
        _linear(init, sd, f"{embedder}.in_layer", hidden, width)
        _linear(init, sd, f"{embedder}.out_layer", hidden, hidden)
    head = hidden // heads
    for i in range(double):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            _linear(init, sd, p + "mod.lin", 6 * hidden, hidden)
            _linear(init, sd, p + "attn.qkv", 3 * hidden, hidden)
            sd[p + "attn.norm.query_norm.scale"], sd[p + "attn.norm.key_norm.scale"] = init.ones(head), init.ones(head)
            _linear(init, sd, p + "attn.proj", hidden, hidden)
            _linear(init, sd, p + "mlp.0", 4 * hidden, hidden)
            _linear(init, sd, p + "mlp.2", hidden, 4 * hidden)
    for i in range(single):
        p = f"single_blocks.{i}."
        _linear(init, sd, p + "linear1", 3 * hidden + 4 * hidden, hidden)
        _linear(init, sd, p + "linear2", hidden, hidden + 4 * hidden)
        sd[p + "norm.query_norm.scale"], sd[p + "norm.key_norm.scale"] = init.ones(head), init.ones(head)
        _linear(init, sd, p + "modulation.lin", 3 * hidden, hidden)
    _linear(init, sd, "final_layer.linear", 64, hidden)
    _linear(init, sd, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return sd


def _sd3(init: _Init, hidden: int, context: int, pooled: int, depth: int = 2) -> dict:
    """SD3's MMDiT under SAI names (comfy/ldm/modules/diffusionmodules/mmdit.py), `depth` joint blocks."""
    sd = {"pos_embed": init.normal(1, 64, hidden), "x_embedder.proj.weight": init.normal(hidden, 16, 2, 2),
          "x_embedder.proj.bias": init.zeros(hidden)}
    _linear(init, sd, "t_embedder.mlp.0", hidden, 256)
    _linear(init, sd, "t_embedder.mlp.2", hidden, hidden)
    _linear(init, sd, "y_embedder.mlp.0", hidden, pooled)
    _linear(init, sd, "y_embedder.mlp.2", hidden, hidden)
    _linear(init, sd, "context_embedder", hidden, context)
    for i in range(depth):
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}."
            last = stream == "context_block" and i == depth - 1  # the last context block only feeds attention
            _linear(init, sd, p + "adaLN_modulation.1", (2 if last else 6) * hidden, hidden)
            _linear(init, sd, p + "attn.qkv", 3 * hidden, hidden)
            if not last:
                _linear(init, sd, p + "attn.proj", hidden, hidden)
                _linear(init, sd, p + "mlp.fc1", 4 * hidden, hidden)
                _linear(init, sd, p + "mlp.fc2", hidden, 4 * hidden)
    _linear(init, sd, "final_layer.linear", 64, hidden)
    _linear(init, sd, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return sd


def tiny_mmdit_parts(family: str, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 64,
                     text: str = "tiny", t5_layers: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a tiny `family` model ("flux_dev", "flux_schnell" or "sd3"), each under the names of a file of
    its own: "model" (bare BFL/SAI names), "clip_l", "clip_g" (transformers' CLIP names, `text_model.`, and for
    CLIP-G its `text_projection.weight`), "t5xxl" (transformers' T5 names). `text` "full": the real encoders'
    sizes (T5-XXL with `t5_layers` of its 24 blocks; benchmarks), the transformer still tiny but for its maps."""
    if family not in MMDIT_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(MMDIT_FAMILIES)}")
    init = _Init(seed, dtype)
    sizes, t5 = (FULL_TEXT, T5_XXL) if text == "full" else (TINY_TEXT, TINY_T5)
    parts = {"t5xxl": _t5(init, "", **{**t5, "layers": t5_layers or t5["layers"]})}
    wl, ll, ml = sizes["clip_l"]
    ll += text != "full"  # SD3 reads the penultimate layer, which ComfyUI takes only from encoders of 3+ layers
    parts["clip_l"] = _hf_clip(init, "text_model.", wl, ll, ml, position_ids=False)
    if family == "sd3":
        wg, lg, mg = sizes["clip_g"]
        parts["clip_g"] = _hf_clip(init, "text_model.", wg, lg, mg, position_ids=False)
        parts["clip_g"]["text_projection.weight"] = init.normal(wg, wg, std=wg ** -0.5)
        parts["model"] = _sd3(init, hidden, t5["width"], wl + wg)
    else:
        parts["model"] = _flux(init, hidden, t5["width"], wl, guidance=family == "flux_dev")
    return parts


def tiny_mmdit_files(folder, family: str, layout: str = "all_in_one", seed: int = 0,
                     dtype: torch.dtype = torch.float16, overwrite: bool = False) -> dict[str, Path]:
    """Write a tiny `family` model into `folder` as users have it: layout "all_in_one" (one ComfyUI checkpoint:
    `model.diffusion_model.` + `text_encoders.<slot>.transformer.`) → {"model": path}; "separate" (a
    diffusion-model-only file with bare names and one file per text encoder) → {"model", "clip_l", ["clip_g"],
    "t5xxl": path}."""
    parts = tiny_mmdit_parts(family, seed, dtype)
    folder = Path(folder)
    meta = {"modelspec.title": f"tiny random {family}", "tiny_seed": str(seed)}
    if layout == "all_in_one":
        sd = {UNET_PREFIX + k: v for k, v in parts.pop("model").items()}
        for slot, tensors in parts.items():
            sd |= {ENCODER_PREFIXES[slot] + k: v for k, v in tensors.items()}
        return {"model": write_safetensors(folder / f"{family}.safetensors", sd, meta, overwrite=overwrite)}
    if layout != "separate":
        raise ValueError(f"unknown layout {layout!r}; expected all_in_one or separate")
    return {slot: write_safetensors(folder / f"{family}_{slot}.safetensors", tensors,
                                    meta if slot == "model" else {}, overwrite=overwrite)
            for slot, tensors in parts.items()}


def tiny_state_dict(family: str, seed: int = 0, dtype: torch.dtype = torch.float16, text: str = "tiny",
                    unet_width: int = 32) -> dict[str, torch.Tensor]:
    """A seeded random state dict with `family`'s real key layout ("sd1", "sd2" or "sdxl")."""
    init = _Init(seed, dtype)
    sizes = FULL_TEXT if text == "full" else TINY_TEXT
    w = unet_width
    if family == "sd1":
        width, layers, mlp = sizes["clip_l"]
        sd = _hf_clip(init, "cond_stage_model.transformer.text_model.", width, layers, mlp, position_ids=True)
        sd |= _unet(init, SD_BLOCKS, (w, 2 * w, 4 * w), width, linear_proj=False, adm=None)
    elif family == "sd2":
        width, layers, mlp = sizes["clip_h"]
        sd = _open_clip(init, "cond_stage_model.model.", width, layers, mlp)
        sd |= _unet(init, SD_BLOCKS, (w, 2 * w, 4 * w), width, linear_proj=True, adm=None)
    elif family == "sdxl":
        wl, ll, ml = sizes["clip_l"]
        wg, lg, mg = sizes["clip_g"]
        sd = _hf_clip(init, "conditioner.embedders.0.transformer.text_model.", wl, ll, ml, position_ids=False)
        sd |= _open_clip(init, "conditioner.embedders.1.model.", wg, lg, mg)
        sd |= _unet(init, SDXL_BLOCKS, (2 * w, 4 * w), wl + wg, linear_proj=True, adm=wg + 6 * 256)
    else:
        raise ValueError(f"unknown family {family!r}; expected sd1, sd2 or sdxl")
    sd["first_stage_model.decoder.conv_out.weight"] = init.normal(3, 32, 3, 3)
    return sd


def make_tiny_checkpoint(path, family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float16,
                         text: str = "tiny", overwrite: bool = False) -> Path:
    sd = tiny_state_dict(family, seed, dtype, text)
    meta = {"modelspec.title": f"tiny random {family}", "tiny_seed": str(seed)}
    return write_safetensors(path, sd, meta, overwrite=overwrite)
