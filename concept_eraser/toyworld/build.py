"""Build ToyWorld from scratch: `python -m concept_eraser.toyworld.build --out DIR`.

Stages, each skipped when its output exists, so an interrupted build resumes where it stopped
(the U-Net from its last saved step; every batch is drawn from a generator seeded by the step
number, so a resumed run is identical to an uninterrupted one):

1. text encoder pre-training (`text_encoder.pt`),
2. U-Net training with the text encoder frozen (`unet.pt`, saved every `--save-every` steps),
3. the judge (`judge.pt`),
4. export: `toyworld.safetensors` (checkpoint) and `judge.safetensors` into DIR; `--install` also
   copies them into the package's `weights/` folder.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import torch

from ..tokenizer import WordTokenizer
from . import diffusion, text, world
from .unet import ToyUNet, UNetConfig

UNET = UNetConfig(channels=(16, 32, 64), attention=(False, True, True), context_dim=text.WIDTH, groups=8)
BATCH = 32
LR = 1e-3
WARMUP = 100
EMA = 0.999
CAPTION_DROPOUT = 0.1  # empty prompt, for classifier-free guidance


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save never leaves a broken checkpoint


def _log(out: Path):
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(out / "build.log", "a") as f:
            f.write(line + "\n")
    return log


def tokenizer() -> WordTokenizer:
    return WordTokenizer(world.vocabulary(), text.WINDOW)


def stage_text(out: Path, seed: int, log) -> torch.nn.Module:
    tok = tokenizer()
    model = text.new_text_model(tok, seed)
    path = out / "text_encoder.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        start = time.time()
        text.pretrain(model, tok, seed, log=log)
        _save(model.state_dict(), path)
        log(f"text encoder pre-trained in {time.time() - start:.0f} s")
    return model.eval().requires_grad_(False)


def captioned_batch(step: int, seed: int):
    """The training batch of `step`: images in [-1, 1], captions ("" for dropped ones), and the generator that
    draws the rest of the step (noise, timesteps)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    scenes = world.random_scenes(gen, BATCH)
    drop = torch.rand(BATCH, generator=gen) < CAPTION_DROPOUT
    captions = ["" if d else world.caption(s, gen) for s, d in zip(scenes, drop.tolist())]
    return world.render(scenes) * 2 - 1, captions, gen


def train_denoiser(model: torch.nn.Module, path: Path, steps: int, save_every: int, step_loss, log) -> torch.nn.Module:
    """AdamW with warm-up, gradient clipping and an EMA copy (returned); saved to `path` every `save_every` steps
    and resumed from it. `step_loss(model, step)` is the loss of step `step`'s batch."""
    name = path.stem
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    step = 0
    if path.exists():
        state = torch.load(path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resuming {name} at step {step}")
    log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} steps of {BATCH}")
    start, first = time.time(), step
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        loss = step_loss(model, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(EMA, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        if step % 50 == 0:
            rate = (time.time() - start) / (step - first)
            log(f"{name} step {step}: loss {loss.item():.4f}, {rate:.2f} s/step")
        if step % save_every == 0 or step == steps:
            _save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    return ema.eval()


def stage_unet(out: Path, seed: int, steps: int, save_every: int, encoder, log) -> ToyUNet:
    tok = tokenizer()
    torch.manual_seed(seed)

    def step_loss(unet, step):
        x0, captions, gen = captioned_batch(step, seed)
        with torch.no_grad():
            context = text.encode(encoder, tok, captions)
        return diffusion.loss(unet, x0, context, gen)

    return train_denoiser(ToyUNet(UNET), out / "unet.pt", steps, save_every, step_loss, log)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser.toyworld.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder: stage outputs, log and the exported files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000, help="U-Net training steps")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads; 1 is faster when other jobs share the cores")
    parser.add_argument("--install", action="store_true", help="copy the exported weights into the package")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _log(out)
    start = time.time()
    encoder = stage_text(out, args.seed, log)
    unet = stage_unet(out, args.seed, args.steps, args.save_every, encoder, log)
    from . import export, judge  # noqa: PLC0415

    judge_model = judge.stage_judge(out, args.seed, log)
    files = [export.write_checkpoint(out / "toyworld.safetensors", encoder, unet, tokenizer(), UNET),
             export.write_judge(out / "judge.safetensors", judge_model)]
    log(f"exported {', '.join(str(f) for f in files)}; this run took {time.time() - start:.0f} s")
    if args.install:
        for f in files:
            shutil.copy(f, Path(__file__).parent / "weights" / f.name)
        log("installed into the package")


if __name__ == "__main__":
    main()
