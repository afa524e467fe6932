"""Seeded stand-ins for real models, shared by the benchmarks: real-size shapes, random values.

* `build_weights`: SD1.5- or SDXL-shaped cross-attention K/V weights (the real layer counts and shapes, fp16);
* `FakeClip`: CLIP-like token features for them;
* `write_model`: an fp16 checkpoint file with real-size text encoders and the real K/V (the rest of the U-Net
  left out), read back through `CheckpointModel`; "flux": a ComfyUI all-in-one Flux.1 dev file with real-size
  CLIP-L and T5-XXL blocks (`FLUX_T5_BLOCKS` of its 24) and real-width text maps, the transformer tiny.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from concept_eraser.models.arch import CLIP_WINDOW, ENCODER_PREFIXES, UNET_PREFIX
from concept_eraser.safetensors_io import write_safetensors
from concept_eraser.tiny import SD_BLOCKS, SDXL_BLOCKS, tiny_mmdit_parts, tiny_state_dict

# (blocks, K/V width by level, context width)
ARCHS = {
    "sd15": (SD_BLOCKS, {0: 320, 1: 640, 2: 1280}, 768),
    "sdxl": (SDXL_BLOCKS, {0: 640, 1: 1280}, 2048),
}
WINDOW = CLIP_WINDOW                   # CLIP's padded sequence length
TOKEN_NORM = 27.0                      # typical per-token norm of CLIP text features

FAMILIES = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux_dev"}
FLUX_T5_BLOCKS = 4  # of T5-XXL's 24: memory is per block, time scales with the count
KEEP_UNET = re.compile(r"^model\.diffusion_model\.(input_blocks\.0\.0\.weight|label_emb\..*|.*attn2\.to_[kv]\.weight)$")


def build_weights(arch: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    blocks, widths, ctx = ARCHS[arch]
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for block, depth, level in blocks:
        out = widths[level]
        for j in range(depth):
            for proj in ("to_k", "to_v"):
                key = f"model.diffusion_model.{block}.transformer_blocks.{j}.attn2.{proj}.weight"
                w = (torch.randn(out, ctx, generator=gen) * ctx ** -0.5).to(torch.float16)
                weights[key] = w.to(device)
    return weights


class FakeClip:
    """CLIP-like token features (positions × d, float32): the BOS output is the same for every
    prompt (causal attention), words are fairly independent, EOS and padding share a strong
    common direction plus a positional and a prompt-dependent part, as in real CLIP outputs."""

    def __init__(self, d: int, seed: int):
        self.d = d
        self.gen = torch.Generator().manual_seed(seed)
        self.bos = self._unit(1)[0]
        self.pad_base = self._unit(1)[0]
        self.pos = self._unit(WINDOW)

    def _unit(self, n: int) -> torch.Tensor:
        x = torch.randn(n, self.d, generator=self.gen)
        return x / x.norm(dim=1, keepdim=True)

    def encode(self, n_words: int) -> torch.Tensor:
        """(77, d) features of a prompt of `n_words` tokens: BOS, words, EOS, padding."""
        n = n_words
        f = torch.empty(WINDOW, self.d)
        f[0] = self.bos
        if n:
            f[1:n + 1] = 0.4 * self.pad_base + self._unit(n)
        z = self._unit(1)[0]
        f[n + 1:] = 0.7 * self.pad_base + 0.35 * self.pos[n + 1:] + 0.45 * z + 0.15 * self._unit(WINDOW - n - 1)
        f = f / f.norm(dim=1, keepdim=True)
        scale = TOKEN_NORM * (1 + 0.1 * torch.randn(WINDOW, 1, generator=self.gen)).clamp(0.7, 1.3)
        return f * scale


def write_model(folder: Path, family: str, quick: bool) -> Path:
    """Real-size text encoders and K/V (tiny ones with --quick); the rest of the U-Net dropped."""
    if family == "flux":
        parts = tiny_mmdit_parts(FAMILIES[family], text="tiny" if quick else "full",
                                 t5_layers=None if quick else FLUX_T5_BLOCKS)
        state = {UNET_PREFIX + k: v for k, v in parts.pop("model").items()}
        for slot, tensors in parts.items():
            state |= {ENCODER_PREFIXES[slot] + k: v for k, v in tensors.items()}
        del parts
        return write_safetensors(folder / "flux.safetensors", state, {}, overwrite=True)
    state = tiny_state_dict(FAMILIES[family], seed=0, dtype=torch.float16, text="tiny" if quick else "full",
                            unet_width=32 if quick else 320)
    state = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.") or KEEP_UNET.match(k)}
    path = write_safetensors(folder / f"{family}.safetensors", state,
                             {"modelspec.title": f"ErasePro benchmark {family}"}, overwrite=True)
    del state
    gc.collect()
    return path
