"""The U-Net as a gradient method needs it: a noise prediction ε(z_t, t, context) that can be run with
some weights replaced by trainable tensors, and the model's weights by their checkpoint keys.

Every host provides one (`EditableModel.denoiser`) around its own U-Net module: ToyWorld's and the
command line's `models.unet.LDMUNet` built from the file, ComfyUI's `diffusion_model`, the WebUI's.
`ModuleDenoiser` does the common work: the trainable tensors replace the module's parameters for one
call only (`torch.func.functional_call`), so the host's module — which hosts cache and share — is never
written; the frozen model is that same module with its own weights. A learnable prompt joins the chosen
cross-attention layers through forward hooks on their `to_k` / `to_v` (extra K/V tokens, or added to
the text's), removed when the call returns.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch.func import functional_call
from torch.nn import functional as F

from .errors import InvalidParameterError, UnsupportedModelError
from .models.unet import sdxl_vector

INJECTION_MODES = ("concat", "additive")
T_TRAIN = 1000  # DDPM steps of every supported model


def sd_alphas_cumprod(steps: int = T_TRAIN, zero_terminal_snr: bool = False) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion 1.x / 2.x / XL: "scaled linear" β from 0.00085 to 0.012; `zero_terminal_snr`:
    rescaled so the last step is (almost) pure noise (Lin et al. 2023), as ComfyUI does for checkpoints with a
    `ztsnr` key: √ᾱ shifted to end at 0 and scaled to keep its start, the last ᾱ then set to 4.9e-8."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        root = alphas.sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        alphas = root ** 2
        alphas[-1] = 4.8973451890853435e-08
    return alphas.float()


def alphas_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t from a k-diffusion style σ_t schedule (ComfyUI's, Forge's): ᾱ = 1 / (σ² + 1)."""
    return 1 / (sigmas.detach().float().cpu() ** 2 + 1)


def training_size(resolution: int | None, family: str, prediction: str, multiple: int = 64) -> int:
    """Pixel size of training samples: `resolution`, or the family's native size (SDXL 1024, SD 2.x 768-v 768,
    else 512; ToyWorld 16), checked against the U-Net's downsampling (`multiple` pixels)."""
    native = {"sdxl": 1024, "sd2": 768 if prediction == "v" else 512, "toyworld": 16}.get(family, 512)
    size = resolution or native
    if size % multiple:
        raise InvalidParameterError("resolution", f"{size} is not a multiple of {multiple} (this U-Net's "
                                    f"downsampling); native size: {native}")
    if size > 2 * native:
        warnings.warn(f"resolution={size} is {(size / native) ** 2:.0f}× the pixels of this model's native {native}²: "
                      "every training step costs about that many times more time and memory", stacklevel=2)
    return size


@dataclass
class PromptInjection:
    """A learnable prompt fed to the cross-attention layers whose K/V weights are `keys`.

    `k` and `v` [tokens, context_dim] are separate tensors for K and V, as the authors' code has them.
    concat: K = W_k [C; P_k] (extra key/value tokens after the text's); additive: K = W_k (C + P_k),
    which needs P to have the text window's length."""

    keys: tuple[str, ...]  # checkpoint keys of the chosen layers' attn2.to_k.weight and attn2.to_v.weight
    k: torch.Tensor
    v: torch.Tensor
    mode: str = "concat"


class Denoiser(Protocol):
    device: torch.device
    dtype: torch.dtype  # the dtype the host runs its U-Net in
    alphas_cumprod: torch.Tensor  # ᾱ_t, [1000], float32, CPU
    # The model's own sampler clips its x0 prediction to ±x0_clip (ToyWorld's pixel-space DDIM: 1) and
    # re-derives ε from it; None: no clipping (latent models: ComfyUI and the WebUIs sample SD unclipped).
    x0_clip: float | None
    latent_shape: tuple[int, int, int]  # (channels, height, width) of a training sample

    def parameters(self) -> dict[str, torch.Tensor]:
        """Checkpoint key → the U-Net's current weight (read-only: the host's own tensor)."""
        ...

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            weights: Mapping[str, torch.Tensor] | None = None, prompt: PromptInjection | None = None,
            pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction (float32, or float64 for a float64 model) for latents `z_t` at integer timesteps
        `t` [b] given text features `context` [b, tokens, d] (and SDXL's pooled embedding); `weights`
        (checkpoint key → tensor) replace the model's for this call, gradients flowing to them and to `prompt`."""
        ...


# The host's call of its module: (x, t, context, pooled) → (args, kwargs) for module.forward.
Inputs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[tuple, dict]]


def ldm_inputs(family: str, size: int, **host_kwargs) -> Inputs:
    """How every LDM-style U-Net is called (ours, ComfyUI's, the WebUIs'): forward(x, timesteps=, context=), plus
    SDXL's `y` (pooled embedding and the `size`-pixel size conditioning) and whatever the host adds."""
    def inputs(x, t, context, pooled):
        kwargs = {"timesteps": t, "context": context, **host_kwargs}
        if family == "sdxl":
            kwargs["y"] = sdxl_vector(pooled, size, size).to(x)
        return (x,), kwargs
    return inputs


class ModuleDenoiser:
    """`Denoiser` over an nn.Module whose parameter names, after `prefix`, are checkpoint keys."""

    def __init__(self, module: torch.nn.Module, prefix: str, inputs: Inputs, *, device: torch.device,
                 dtype: torch.dtype, latent_shape: tuple[int, int, int], alphas_cumprod: torch.Tensor,
                 prediction: str = "eps", x0_clip: float | None = None):
        self.module, self.prefix, self.inputs = module, prefix, inputs
        self.device, self.dtype, self.latent_shape = device, dtype, latent_shape
        self.alphas_cumprod, self.prediction, self.x0_clip = alphas_cumprod, prediction, x0_clip
        with torch.inference_mode(False), torch.no_grad():
            # Hosts load weights under inference mode; such tensors cannot be saved for backward, so
            # those get a normal copy (once). Without history: ComfyUI's are inference tensors that
            # require grad, and a copy made with grad on would chain every training step to one graph.
            # The rest are used detached: no gradient reaches the host.
            self.frozen = {name: p.clone() if p.is_inference() else p.detach()
                           for name, p in module.named_parameters()}

    def parameters(self) -> dict[str, torch.Tensor]:
        return {self.prefix + name: p for name, p in self.module.named_parameters()}

    def _module_of(self, key: str) -> torch.nn.Module:
        name = key[len(self.prefix):] if key.startswith(self.prefix) else key
        return self.module.get_submodule(name.rsplit(".", 1)[0])

    @contextlib.contextmanager
    def _injected(self, prompt: PromptInjection | None):
        handles = []
        try:
            if prompt is not None:
                for key in prompt.keys:
                    tokens = prompt.k if ".to_k." in key else prompt.v
                    handles.append(self._module_of(key).register_forward_hook(_prompt_hook(tokens, prompt.mode)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def eps(self, z_t, t, context, weights=None, prompt=None, pooled=None) -> torch.Tensor:
        overrides = dict(self.frozen)
        for key, value in (weights or {}).items():
            overrides[key[len(self.prefix):]] = value.to(self.device, self.dtype)
        cast = lambda x: None if x is None else x.to(self.device, self.dtype)  # noqa: E731
        with torch.inference_mode(False), self._injected(prompt):
            args, kwargs = self.inputs(cast(z_t), t.to(self.device), cast(context), cast(pooled))
            out = functional_call(self.module, overrides, args, kwargs, tie_weights=False, strict=False)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if self.prediction == "v":  # v = √ᾱ ε − √(1−ᾱ) x0  ⇒  ε = √ᾱ v + √(1−ᾱ) z_t
            a = self.alphas_cumprod.to(self.device)[t.to(self.device)].view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * z_t.to(self.device, out.dtype)
        return out


def _prompt_hook(tokens: torch.Tensor, mode: str):
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        weight = module.weight.to(output.device, output.dtype)
        extra = F.linear(tokens.to(output.device, output.dtype), weight)  # [m, inner]
        if mode == "additive":  # W (C + P) = W C + W P
            if extra.shape[0] != output.shape[1]:
                raise UnsupportedModelError(
                    f"additive prompt has {extra.shape[0]} tokens, the text has {output.shape[1]}")
            return output + extra
        return torch.cat([output, extra.expand(output.shape[0], -1, -1)], dim=1)
    return hook


def injection_keys(kv_keys: Sequence[str], blocks: str) -> tuple[str, ...]:
    """The cross-attention K/V keys of the U-Net part(s) `blocks` names: mid, mid_up or all (the
    paper's Table 6: middle block; middle and up; down, middle and up)."""
    parts = {"mid": ("middle_block",), "mid_up": ("middle_block", "output_blocks"),
             "all": ("input_blocks", "middle_block", "output_blocks")}[blocks]
    return tuple(k for k in kv_keys if any(f".{p}." in f".{k}" for p in parts))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor,
              x0_clip: float | None = None) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from ᾱ = `a` to `a_next` given the (guided) noise prediction; with
    `x0_clip`, the x0 prediction is clipped to ±x0_clip and ε re-derived from it, which keeps the step
    consistent where 1/√ᾱ is huge (ToyWorld's cosine schedule: ᾱ₉₉₉ ≈ 2.4e-9)."""
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


@torch.no_grad()
def partial_ddim(denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                 stops: Sequence[int], total: int, guidance: float, pooled: torch.Tensor | None = None,
                 uncond_pooled: torch.Tensor | None = None,
                 before_pass: Callable[[], object] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The frozen model's deterministic DDIM sampling (η = 0, `total` steps) from `noise` with classifier-free
    guidance, as ESD makes its training latents, stepping as the model's own sampler does
    (`denoiser.x0_clip`); returns (z_t, t [b]) after each number of steps in `stops` (one run serves them all).
    `before_pass` is called before each guided pass (a host's cancel point)."""
    times = torch.linspace(T_TRAIN - 1, 0, total).round().long()
    alphas = denoiser.alphas_cumprod.to(denoiser.device)
    x = noise.to(denoiser.device).float()
    n = x.shape[0]
    both = torch.cat([cond, uncond.expand(n, -1, -1)])
    both_pooled = None if pooled is None else torch.cat([pooled, uncond_pooled.expand(n, -1)])
    latents = {}
    for i in range(max(stops) + 1):
        latents[i] = x
        if i == max(stops):
            break
        if before_pass:
            before_pass()
        t = times[i]
        e_c, e_u = denoiser.eps(torch.cat([x, x]), t.repeat(2 * n), both, pooled=both_pooled).chunk(2)
        x = ddim_step(x, e_u + guidance * (e_c - e_u), alphas[t], alphas[times[i + 1]], denoiser.x0_clip)
    return [(latents[s], times[s].repeat(n).to(denoiser.device)) for s in stops]
