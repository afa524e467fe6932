"""KPOP — erasure with a learnable prompt (Bui et al., arXiv 2403.12326, §4).

A prompt p (extra K/V tokens, `denoiser.PromptInjection`) joins the chosen cross-attention layers (the
middle block by default) and the U-Net is fine-tuned by alternating, one Adam step each:

- knowledge transfer: p ← p − η_p ∇_p ‖ε_θ'(z_t, c_e, p) − ε_θ(z_t, c_e)‖²  (the prompt learns the target);
- knowledge removal: θ' ← θ' − η ∇_θ' [‖ε_θ'(z_t, c_e) − ε*‖² + λ ‖ε_θ'(z_t, c_e, p) − ε_θ(z_t, c_e)‖²],

with ε* = ε_θ(c_n) − η_n (ε_θ(c_e) − ε_θ(c_n)): the paper's Eq. 7 has η_n = 0; the authors' runs are
named "ng 1" (ESD's negative-guidance target), our default. c_e is a concept to erase, c_n its guide
(the neutral prompt, "" by default), z_t the frozen model's partial DDIM sampling with c_e at guidance 3
(as ESD), t its timestep. With `preserve_empty` (default; not in the paper) the removal step also holds the
empty prompt, + ‖ε_θ'(z_t, "") − ε_θ(z_t, "")‖²: classifier-free guidance subtracts that output, so a change it
shares with the target's cancels at sampling. The released model is only θ' (a dense patch of the trained
tensors); the prompt is dropped, but kept in the result since it re-enables the concept
(`checkpoint.save_artifacts`).

Choices where the paper is vague: the prompt has k × (text window) tokens (the paper's m_p = k·m_c;
additive: one window), separate tensors for K and V (the authors' code), initialised as Gaussian noise
with the standard deviation of the target's text features ("initially no alignment with any textual
input", §5.5); trainable weights are kept in float32 whatever the model's dtype. `use_prompt=false` is
the paper's ablation: the same training without the prompt (plain fine-tuning towards ε*). Several concepts (the
paper erases one): each step takes one sample of each, so each gets the training one concept gets (README: on
ToyWorld's three shapes a random concept per step erased 8–90 % by seed, this 67–88 %). Steps, learning
rates, sampler steps and wordings left on auto are the paper's SD1.4 values on Stable Diffusion and values
measured on ToyWorld, whose 1 M-parameter U-Net the paper's settings barely move (`AUTO_SETTINGS`).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch.nn import functional as F

from ..concepts import Concepts
from ..denoiser import INJECTION_MODES, Denoiser, PromptInjection, injection_keys, partial_ddim
from ..editable import EditableModel, Progress
from ..errors import InvalidParameterError, NonFiniteResultError, UnsupportedModelError
from ..params import Param, Values
from ..patch import DenseEdit, check_finite
from .base import ErasureMethod, MethodOutput

TRAIN_SETS = ("xattn", "kv", "noxattn")
BLOCKS = ("mid", "mid_up", "all")

# Settings left on auto, by model family. Stable Diffusion (every family but ToyWorld): the paper's SD1.4 settings.
# ToyWorld (circle → square, 200 steps, 16 samples; README, ToyWorld): its 1 M-parameter U-Net barely moves at rates
# sized for SD's 860 M: at lr 3e-4 25 % erased, at 1e-3 100 % at 100 % preserved, at 3e-3 preserved falls to 44 %;
# the bare word "circle", which its encoder never saw (its captions start with an article), gave 0 % erased where
# wordings in its own words gave 100 %; z_t from its own sampler's 20 DDIM steps. A word erased only in short wordings
# ("a red") stays in full captions ("a red circle on a dotted background"): red → "" (24 samples, empty prompt held)
# 33 % erased with the five short wordings, 75 % with the four captions added (ceiling ≈ 80 %), 8 % with "a {} shape /
# object / thing" added instead. The benchmark at these settings: README, ToyWorld.
AUTO_SETTINGS = {
    "stable diffusion": {"steps": 1000, "lr": 1e-5, "prompt_lr": 1e-5, "ddim_steps": 50, "wordings": "as_given"},
    "toyworld": {"steps": 200, "lr": 1e-3, "prompt_lr": 1e-2, "ddim_steps": 20,
                 "wordings": "{}; a {}; a picture of a {}; one {}; the {}; a {} on a plain background; "
                             "a {} on a dotted background; a {} on a striped background; a {} on a checked background"},
}


def _auto_help(name: str) -> str:
    sd, toy = (AUTO_SETTINGS[family][name] for family in ("stable diffusion", "toyworld"))
    return f"; auto = {sd} on Stable Diffusion (the paper's), {toy} on ToyWorld (measured on its benchmark)"


def resolve_auto(values: Values, family: str) -> Values:
    """`values` with every setting left on auto (None) replaced by its value for the model `family`."""
    auto = AUTO_SETTINGS["toyworld" if family == "toyworld" else "stable diffusion"]
    return values.replace(**{k: v for k, v in auto.items() if values[k] is None})


KPOP_PARAMS = (
    Param("steps", int, None, "training steps (each: one prompt step, one model step)"
          + _auto_help("steps"), min=1, max=100000, step=50, nullable=True),
    Param("lr", float, None, "Adam learning rate of the fine-tuned weights" + _auto_help("lr"), min=0.0,
          min_exclusive=True, max=1.0, step=1e-5, nullable=True),
    Param("prompt_lr", float, None, "Adam learning rate of the learnable prompt" + _auto_help("prompt_lr"),
          min=0.0, min_exclusive=True, max=10.0, step=1e-5, nullable=True),
    Param("lam", float, 0.1, "λ: weight of the with-prompt term in the removal step; larger keeps more of the "
          "other concepts and erases less", min=0.0, min_exclusive=True, max=1e4, step=0.05),
    Param("use_prompt", bool, True, "off: the paper's ablation, the same fine-tuning without the learnable prompt"),
    Param("prompt_size", int, 10, "k: the prompt has k × (text window) tokens (concat injection)", min=1, max=200),
    Param("injection", str, "concat", "how the prompt joins the text: concat (extra K/V tokens, the paper's "
          "default) or additive (added to the text features)", choices=INJECTION_MODES),
    Param("inject_blocks", str, "mid", "cross-attention layers that read the prompt: mid (paper default), "
          "mid_up, all", choices=BLOCKS),
    Param("train", str, "xattn", "weights fine-tuned: xattn (all cross-attention; objects and styles), kv "
          "(cross-attention K/V only), noxattn (everything but cross-attention; the paper's choice for nudity)",
          choices=TRAIN_SETS),
    Param("negative_guidance", float, 1.0, "η in the removal target ε(c_n) − η (ε(c_e) − ε(c_n)); 0 = the "
          "paper's Eq. 7, 1 = the authors' runs", min=0.0, max=10.0, step=0.5),
    Param("start_guidance", float, 3.0, "guidance scale of the frozen model's partial sampling that makes z_t",
          min=0.0, max=30.0, step=0.5),
    Param("ddim_steps", int, None, "DDIM steps of that sampling (z_t stops after a random number of them)"
          + _auto_help("ddim_steps"), min=2, max=1000, nullable=True),
    Param("latents_per_trajectory", int, 1, "training steps served by one sampling run (z_t taken after as many "
          "random numbers of steps): fewer sampling passes per step; 1 = the paper (a new run every step)",
          min=1, max=64),
    Param("wordings", str, None, "training wordings of each concept and its guide: as_given (the words "
          "typed, the paper), object / art (UCE's prompt expansion: the words plus 'image of {}', 'photo of {}', "
          "'portrait of {}', 'picture of {}', 'painting of {}' / 'painting by {}', 'art by {}', 'artwork by {}', "
          "'picture by {}', 'style of {}'), or your own templates separated by ';', each with {} for the words; "
          "an empty guide stays empty" + _auto_help("wordings"), nullable=True),
    Param("preserve_weight", float, 0.0, "weight of ESD's preservation term ‖ε'(z_t, c_p) − ε(z_t, c_p)‖² on the "
          "preserved concepts (a random one per step); 0 = the paper's KPOP, which uses no preserve list",
          min=0.0, max=1e4, step=0.1),
    Param("preserve_empty", bool, True, "hold the empty prompt's output in the removal step (‖ε'(z_t, \"\") − "
          "ε(z_t, \"\")‖², weight 1): classifier-free guidance subtracts it, so a change it shares with the "
          "target's output cancels at sampling; off = the paper"),
    Param("batch", int, None, "samples per step, taking the concepts to erase in turn (each with a random one of "
          "its wordings); auto = one per concept, so each of N concepts gets the training one concept gets (the "
          "paper: one concept, batch 1)", min=1, max=64, nullable=True),
    Param("seed", int, 0, "seed of the prompt initialisation, noise, timesteps and wording picks", min=0,
          max=2 ** 31 - 1),
    Param("resolution", int, 0, "image size in pixels of the training latents; 0 = the model's native size",
          min=0, max=4096, step=64),
)


def trainable_keys(keys, train: str) -> list[str]:
    """U-Net parameters fine-tuned by `train`, as ESD names them: xattn = every attn2 tensor; kv = attn2
    to_k/to_v; noxattn = every tensor outside attn2, time_embed and the output layer `out.`."""
    if train == "xattn":
        return [k for k in keys if ".attn2." in k]
    if train == "kv":
        return [k for k in keys if ".attn2.to_k." in k or ".attn2.to_v." in k]
    if train == "noxattn":
        return [k for k in keys if ".attn2." not in k and ".time_embed." not in k
                and not k.split("diffusion_model.", 1)[-1].startswith("out.")]
    raise InvalidParameterError("train", f"{train!r} is not one of {', '.join(TRAIN_SETS)}")


# UCE's scripts' prompt expansion (`expand_prompts`): the words as given plus five templates per concept.
WORDING_SETS = {
    "as_given": ("{}",),
    "object": ("{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
    "art": ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
}


def training_wordings(targets, guides, spec: str) -> list[tuple[str, str]]:
    """(target wording, guide wording) pairs: every template of `spec` (a set's name or templates separated by
    ';') applied to each target and its guide alike; an empty guide stays empty (the unconditional prompt)."""
    templates = WORDING_SETS.get(spec) or tuple(t.strip() for t in spec.split(";") if t.strip())
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise InvalidParameterError("wordings", f"{spec!r} is not one of {', '.join(WORDING_SETS)} nor templates "
                                    "separated by ';' with one {} each (e.g. 'a {}; a photo of a {}')")
    pairs = [(t.format(target), t.format(guide) if guide else "") for target, guide in zip(targets, guides)
             for t in templates]
    return list(dict.fromkeys(pairs))


def grad_scaler(device: torch.device, enabled: bool):
    """A dynamic loss scale for fp16 training: `torch.amp.GradScaler` from torch 2.3; before, the CUDA-only
    `torch.cuda.amp.GradScaler` (A1111 1.10 ships torch 2.1.2)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


@dataclass
class TrainBatch:
    """One step's inputs: z_t at t, the targets' features, and the frozen model's outputs."""

    z_t: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor  # c_e
    pooled: torch.Tensor | None
    eps_target: torch.Tensor  # ε_θ(z_t, c_e)
    eps_removal: torch.Tensor  # ε* = ε_θ(c_n) − η (ε_θ(c_e) − ε_θ(c_n))
    preserve: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None  # (c_p, its pooled, ε_θ(z_t, c_p))
    empty: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None  # ("", its pooled, ε_θ(z_t, ""))


def transfer_loss(denoiser: Denoiser, batch: TrainBatch, weights: Mapping[str, torch.Tensor],
                  prompt: PromptInjection) -> torch.Tensor:
    """L_e: the model with the prompt should still produce the target."""
    out = denoiser.eps(batch.z_t, batch.t, batch.context, weights, prompt, batch.pooled)
    return F.mse_loss(out, batch.eps_target)


def removal_loss(denoiser: Denoiser, batch: TrainBatch, weights: Mapping[str, torch.Tensor],
                 prompt: PromptInjection | None, lam: float,
                 preserve_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L_r = L1 + λ L2 (L2 only with a prompt) + w_p L_p (ESD's preservation term, when the batch has one)
    + L_∅ (the empty prompt held, when the batch has it); returns the loss and its parts."""
    l1 = F.mse_loss(denoiser.eps(batch.z_t, batch.t, batch.context, weights, None, batch.pooled), batch.eps_removal)
    loss, parts = l1, {"L1": l1.item()}
    if prompt is not None:
        l2 = transfer_loss(denoiser, batch, weights, prompt)
        loss, parts["L2"] = loss + lam * l2, l2.item()
    if batch.preserve is not None and preserve_weight > 0:
        context, pooled, eps = batch.preserve
        lp = F.mse_loss(denoiser.eps(batch.z_t, batch.t, context, weights, None, pooled), eps)
        loss, parts["Lp"] = loss + preserve_weight * lp, lp.item()
    if batch.empty is not None:
        context, pooled, eps = batch.empty
        l0 = F.mse_loss(denoiser.eps(batch.z_t, batch.t, context, weights, None, pooled), eps)
        loss, parts["L_empty"] = loss + l0, l0.item()
    return loss, parts


class KPOP(ErasureMethod):
    name = "kpop"
    title = "KPOP"
    summary = "learnable prompt + adversarial fine-tuning of the U-Net (gradient method; minutes, needs a GPU)"
    params = KPOP_PARAMS

    def unsupported(self, arch):
        if arch.denoiser != "unet":
            return ("KPOP injects its prompt into a U-Net's cross-attention and fine-tunes the denoiser by "
                    "gradient; an MMDiT has no cross-attention, and fine-tuning Flux's 12 billion parameters does "
                    "not fit a 24 GB GPU (its bf16 weights alone take 24 GB); use uce, rece or space")
        return None

    def run(self, model: EditableModel, concepts: Concepts, values: Values,
            progress: Progress) -> MethodOutput:
        make = getattr(model, "denoiser", None)
        if make is None:
            raise UnsupportedModelError("KPOP trains the U-Net, which this host adapter does not provide")
        values = resolve_auto(values, model.arch.family)
        if concepts.preserve and not values.preserve_weight:
            warnings.warn(f"KPOP keeps other concepts through its prompt: the {len(concepts.preserve)} preserved "
                          "concept(s) were not used (preserve_weight > 0 adds ESD's preservation term for them)")
        training_wordings(concepts.targets, concepts.guides, values.wordings)  # bad templates: fail before work
        progress(0, values.steps, "KPOP: preparing")
        denoiser: Denoiser = make(resolution=values.resolution or None)
        current = denoiser.parameters()
        keys = trainable_keys(list(current), values.train)
        if not keys:
            raise UnsupportedModelError(f"no U-Net tensors match train={values.train!r} in this model")
        if denoiser.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(denoiser.device)
        # Hosts run nodes under inference mode; training needs autograd and ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            trainer = Trainer(denoiser, model, concepts, values, keys)
            start = time.perf_counter()
            history = trainer.train(progress)
            seconds = time.perf_counter() - start
        edits = {}
        for key in keys:
            new = trainer.weights[key].detach().to(current[key].dtype)
            check_finite(key, new)
            edits[key] = (DenseEdit(new.to(model.device)),)
        prompt = trainer.prompt
        peak = torch.cuda.max_memory_allocated(denoiser.device) if denoiser.device.type == "cuda" else None
        summary = {
            **{name: getattr(values, name) for name in AUTO_SETTINGS["toyworld"]},
            "batch": trainer.batch,
            "training_wordings": len(trainer.pairs),
            "trained_tensors": len(keys),
            "trained_parameters": sum(current[k].numel() for k in keys),
            "final_losses": history[-1]["losses"] if history else {},
            "seconds_per_step": round(seconds / values.steps, 4),
        }
        if peak is not None:
            summary["peak_gpu_memory_gib"] = round(peak / 2 ** 30, 2)
        details = {"losses": history, "prompt_layers": list(prompt.keys) if prompt else [],
                   "wordings": [{"erase": target, "guide": guide} for target, guide in trainer.pairs]}
        artifacts = {} if prompt is None else {"prompt_k": prompt.k.detach().float().cpu(),
                                                "prompt_v": prompt.v.detach().float().cpu()}
        return MethodOutput(edits, details, summary, artifacts)


class Trainer:
    """The alternating transfer / removal loop on one denoiser; deterministic for a seed on CPU."""

    def __init__(self, denoiser: Denoiser, model: EditableModel, concepts: Concepts, values: Values,
                 keys: list[str]):
        self.denoiser, self.values = denoiser, values
        self.gen = torch.Generator().manual_seed(values.seed)
        # (target, guide) wordings of each concept; a step's samples take the concepts in turn
        self.concept_pairs = [training_wordings([target], [guide], values.wordings)
                              for target, guide in zip(concepts.targets, concepts.guides)]
        self.pairs = list(dict.fromkeys(pair for pairs in self.concept_pairs for pair in pairs))
        self.drawn = 0  # samples drawn so far: the next one's concept is drawn % len(concept_pairs)
        self.batch = values.batch or len(self.concept_pairs)  # auto: one sample per concept
        preserved = concepts.preserve if values.preserve_weight else ()
        prompts = list(dict.fromkeys([p for pair in self.pairs for p in pair] + [""] + list(preserved)))
        encoded = model.text_encoder.encode(prompts)
        row = {p: i for i, p in enumerate(prompts)}
        device = denoiser.device
        # clone: a host's encoder may have made inference tensors, which autograd cannot save
        self.features = encoded.features.to(device).clone()
        self.pooled = None if encoded.pooled is None else encoded.pooled.to(device).clone()
        self.target_rows = [row[target] for target, _ in self.pairs]
        self.concept_rows = [[(row[target], row[guide]) for target, guide in pairs] for pairs in self.concept_pairs]
        self.preserve_rows = [row[p] for p in preserved]
        self.uncond_row = row[""]
        self.pending: list[TrainBatch] = []  # batches drawn from the last sampling run, not yet trained on
        current = denoiser.parameters()
        self.weights = {k: current[k].detach().to(device, torch.float32).clone().requires_grad_(True) for k in keys}
        self.optimizer = torch.optim.Adam(self.weights.values(), lr=values.lr)
        self.prompt: PromptInjection | None = None
        if values.use_prompt:
            window, dim = self.features.shape[1:]
            tokens = window if values.injection == "additive" else values.prompt_size * window
            scale = self.features[self.target_rows].std().item()
            def init():
                return (torch.randn(tokens, dim, generator=self.gen) * scale).to(device).requires_grad_(True)

            layers = injection_keys(model.arch.map_keys(), values.inject_blocks)
            self.prompt = PromptInjection(layers, init(), init(), values.injection)
            self.prompt_optimizer = torch.optim.Adam([self.prompt.k, self.prompt.v], lr=values.prompt_lr)
        # fp16 hosts: scale the loss so small gradients survive the half-precision backward pass
        self.scaler = grad_scaler(device, enabled=denoiser.dtype == torch.float16)

    def _rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.features[rows], None if self.pooled is None else self.pooled[rows]

    def sample_batch(self, before_pass: Callable[[], object] | None = None) -> TrainBatch:
        """The next step's batch; a sampling run makes `latents_per_trajectory` of them at once."""
        if not self.pending:
            self.pending = self._sample_trajectory(before_pass)
        return self.pending.pop(0)

    def _sample_trajectory(self, before_pass: Callable[[], object] | None) -> list[TrainBatch]:
        v, den = self.values, self.denoiser
        n = self.batch
        concepts = [self.concept_rows[(self.drawn + i) % len(self.concept_rows)] for i in range(n)]
        self.drawn += n
        pick = [rows[int(torch.randint(len(rows), (1,), generator=self.gen))] for rows in concepts]
        stops = torch.randint(v["ddim_steps"], (v["latents_per_trajectory"],), generator=self.gen).tolist()
        noise = torch.randn(n, *den.latent_shape, generator=self.gen)
        c_e, pooled = self._rows([target for target, _ in pick])
        c_n, pooled_n = self._rows([guide for _, guide in pick])
        uncond, pooled_u = self._rows([self.uncond_row])
        latents = partial_ddim(den, c_e, uncond, noise, stops, v["ddim_steps"], v["start_guidance"], pooled,
                               pooled_u, before_pass)
        batches = []
        for z_t, t in latents:
            # the frozen model's outputs for c_e, c_n (and the held prompts: "", a preserved c_p) in one pass
            contexts, pooleds = [c_e, c_n], [pooled, pooled_n]
            if v["preserve_empty"]:
                contexts.append(uncond.expand(n, -1, -1))
                pooleds.append(None if pooled_u is None else pooled_u.expand(n, -1))
            if self.preserve_rows:
                c_p, pooled_p = self._rows([self.preserve_rows[i] for i in
                                            torch.randint(len(self.preserve_rows), (n,), generator=self.gen)])
                contexts.append(c_p)
                pooleds.append(pooled_p)
            with torch.no_grad():
                outs = den.eps(z_t.repeat(len(contexts), 1, 1, 1), t.repeat(len(contexts)), torch.cat(contexts),
                               pooled=None if pooled is None else torch.cat(pooleds)).chunk(len(contexts))
            held = list(zip(contexts[2:], pooleds[2:], outs[2:]))
            empty = held.pop(0) if v["preserve_empty"] else None
            preserve = held.pop(0) if self.preserve_rows else None
            e_e, e_n = outs[0], outs[1]
            batches.append(TrainBatch(z_t, t, c_e, pooled, e_e, e_n - v["negative_guidance"] * (e_e - e_n), preserve,
                                      empty))
        return batches

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
        if not math.isfinite(loss.item()):
            raise NonFiniteResultError(f"the training loss became {loss.item()} at step {step}; "
                                       "lower the learning rates")
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """One transfer step (the prompt) then one removal step (the weights); returns the losses."""
        losses = {}
        held = None
        if self.prompt is not None:
            frozen = {k: w.detach() for k, w in self.weights.items()}
            loss_e = transfer_loss(self.denoiser, batch, frozen, self.prompt)
            self._step(loss_e, self.prompt_optimizer, step)
            losses["transfer"] = loss_e.item()
            held = PromptInjection(self.prompt.keys, self.prompt.k.detach(), self.prompt.v.detach(), self.prompt.mode)
        loss_r, parts = removal_loss(self.denoiser, batch, self.weights, held, self.values.lam,
                                     self.values.preserve_weight)
        self._step(loss_r, self.optimizer, step)
        return losses | parts

    def train(self, progress: Progress) -> list[dict]:
        steps = self.values.steps
        every = max(1, steps // 50)
        history = []
        for step in range(steps):
            # the sampling runs up to ddim_steps guided passes (half a minute on a CPU for SD1.5): cancel between them
            batch = self.sample_batch(functools.partial(progress, step, steps, f"KPOP step {step + 1}/{steps}"))
            losses = self.update(batch, step)
            if step % every == 0 or step == steps - 1:
                history.append({"step": step + 1, "t": int(batch.t[0]), "losses": losses})
            progress(step + 1, steps, f"KPOP step {step + 1}/{steps}")
        return history
