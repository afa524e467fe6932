#!/usr/bin/env python
"""Benchmark of KPOP: time per training step and peak memory, on ToyWorld and on an SD1.5-shaped U-Net.

Not a test: it prints figures.

- ToyWorld: the shipped checkpoint through `concept_eraser.erase` (its U-Net rebuilt from the file), the
  whole method, with the settings the ToyWorld benchmark uses.
- SD1.5-shaped: `models.unet.LDMUNet` with SD1.5's layout (320 channels, 16 cross-attention layers,
  860 M parameters), seeded random weights, random 77 × 768 text features: the same work as the real
  model. A step is split into its two parts, timed separately: making z_t (the frozen model's partial DDIM
  sampling with guidance: on average ddim_steps / 2 guided passes, i.e. ddim_steps forward passes of
  batch 1) and the update (two frozen passes for the targets, the prompt step and the weight step: three
  passes with backward). `--ddim-steps` sets the sampling length (the method's default is 50).

Peak memory is measured above what the process held before (CPU: the kernel's high-water mark; CUDA:
torch.cuda.max_memory_allocated), by `harness.measure_peak`.

    python benchmarks/bench_kpop.py [--device cpu|cuda] [--steps N] [--resolution 512] [--trains xattn]
        [--latents-per-trajectory 1 5] [--toyworld-steps 0] [--quick]

--quick: ToyWorld only, 5 steps (a smoke test of this script). With --device cuda, SD1.5 runs 1000 steps
(the paper's setting) unless --steps says otherwise. The GPU timing run (well under a minute on an H200):

    python benchmarks/bench_kpop.py --device cuda --toyworld-steps 0 --trains xattn --steps 10 \
        --latents-per-trajectory 1 5
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import add_common_args, make_sync, measure_peak, setup_device, write_json

from concept_eraser import CheckpointModel, Concepts, erase  # noqa: E402
from concept_eraser.denoiser import ModuleDenoiser, ldm_inputs, sd_alphas_cumprod  # noqa: E402
from concept_eraser.encoding import EncodedPrompts  # noqa: E402
from concept_eraser.methods import get_method  # noqa: E402
from concept_eraser.methods.kpop import Trainer, resolve_auto, trainable_keys  # noqa: E402
from concept_eraser.models.arch import CLIP_WINDOW, UNET_PREFIX, ArchSpec, cross_attention_maps  # noqa: E402
from concept_eraser.models.unet import LDMConfig, LDMUNet  # noqa: E402
from concept_eraser.params import resolve  # noqa: E402
from concept_eraser.toyworld.pipeline import CHECKPOINT  # noqa: E402

SD15 = LDMConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                 num_res_blocks=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
                 transformer_depth_middle=1, transformer_depth_output=(0, 0, 0) + (1,) * 9, context_dim=768,
                 num_heads=8)


class RandomText:
    """Seeded random 77 × 768 features per prompt (the U-Net's work does not depend on their values)."""

    def encode(self, prompts):
        rows = [torch.randn(CLIP_WINDOW, SD15.context_dim, generator=torch.Generator().manual_seed(hash(p) % 2 ** 31))
                for p in prompts]
        return EncodedPrompts(tuple(prompts), torch.stack(rows), tuple(5 for _ in prompts))


class ShapedModel:
    """The least an `EditableModel` must offer KPOP: the K/V keys, a text encoder and the denoiser."""

    def __init__(self, denoiser: ModuleDenoiser):
        self.device = denoiser.device
        shapes = {k: tuple(w.shape) for k, w in denoiser.parameters().items()}
        self.arch = ArchSpec("sd1", "synthetic", SD15.context_dim, cross_attention_maps(shapes), ())
        self.text_encoder = RandomText()


def sd15_denoiser(device: torch.device, resolution: int) -> ModuleDenoiser:
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: on a GPU, seconds instead of a minute of CPU
        net = LDMUNet(SD15).to(dtype).requires_grad_(False).eval()
    return ModuleDenoiser(net, UNET_PREFIX, ldm_inputs("sd1", resolution), device=device, dtype=dtype,
                          latent_shape=(4, resolution // 8, resolution // 8), alphas_cumprod=sd_alphas_cumprod())


def bench_toyworld(steps: int) -> dict:
    model = CheckpointModel(CHECKPOINT)
    settings = {"steps": steps}  # the rest at KPOP's defaults (auto: ToyWorld's settings)
    peak, _, seconds, result = measure_peak(
        lambda: erase(model, "kpop", Concepts.build(["circle"], ["square"]), settings), torch.device("cpu"))
    summary = result.patch.steps[0]["results"]
    print(f"ToyWorld (CPU, {settings}):\n  {steps} steps in {seconds:.1f} s (erase() total, incl. the probe): "
          f"{summary['seconds_per_step'] * 1e3:.0f} ms per step; {summary['trained_parameters']:,} trained "
          f"parameters; peak +{peak / 2 ** 20:.0f} MiB")
    return {"steps": steps, "seconds": seconds, "seconds_per_step": summary["seconds_per_step"],
            "trained_parameters": summary["trained_parameters"], "peak_bytes": peak}


def bench_sd15(denoiser: ModuleDenoiser, steps: int, ddim_steps: int, train: str, per_trajectory: int,
               preserve_empty: bool) -> dict:
    """KPOP's training loop on the SD1.5-shaped U-Net; a first step (warm-up: CUDA kernels, allocator) is not
    counted. Returns mean seconds per step for making z_t (sampling + the frozen targets) and for the update."""
    model = ShapedModel(denoiser)
    device = denoiser.device
    values = resolve_auto(resolve(get_method("kpop").params, {"steps": steps, "ddim_steps": ddim_steps, "train": train,
                                                               "latents_per_trajectory": per_trajectory,
                                                               "preserve_empty": preserve_empty}, "kpop"),
                          "sd1")
    keys = trainable_keys(list(denoiser.parameters()), train)
    sync = make_sync(device)
    times = {"sampling": [], "update": []}

    def run():
        with torch.inference_mode(False), torch.enable_grad():
            trainer = Trainer(denoiser, model, Concepts.build(["a concept"]), values, keys)
            for step in range(steps + 1):
                sync()
                t0 = time.perf_counter()
                batch = trainer.sample_batch()
                sync()
                t1 = time.perf_counter()
                trainer.update(batch, step)
                sync()
                if step:
                    times["sampling"].append(t1 - t0)
                    times["update"].append(time.perf_counter() - t1)
        return trainer

    peak, _, _, _ = measure_peak(run, device)
    sampling, update = (sum(times[k]) / steps for k in ("sampling", "update"))
    return {"train": train, "k": per_trajectory, "preserve_empty": preserve_empty,
            "trained": sum(denoiser.parameters()[k].numel() for k in keys),
            "sampling": sampling, "update": update, "step": sampling + update, "peak": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--steps", type=int, default=None, help="SD1.5 steps timed (default: 2 on CPU, 1000 on CUDA)")
    p.add_argument("--toyworld-steps", type=int, default=50, help="0: skip the ToyWorld run")
    p.add_argument("--resolution", type=int, default=512, help="SD1.5 training image size (the paper: 512)")
    p.add_argument("--ddim-steps", type=int, default=None, help="z_t sampling length (default: 4 on CPU, 50 on CUDA)")
    p.add_argument("--trains", nargs="+", default=["kv", "xattn", "noxattn"], choices=("kv", "xattn", "noxattn"))
    p.add_argument("--latents-per-trajectory", nargs="+", type=int, default=[1],
                   help="KPOP's latents_per_trajectory values to compare (1: the paper)")
    p.add_argument("--preserve-empty", nargs="+", default=["on"], choices=("on", "off"),
                   help="KPOP's preserve_empty values to compare (on: the default; off: the paper's loss)")
    p.add_argument("--quick", action="store_true", help="ToyWorld only, 5 steps")
    args = p.parse_args(argv)
    device, hardware = setup_device(p, args)
    print(f"KPOP benchmark — torch {torch.__version__}, {device} ({hardware})\n")
    toyworld = [bench_toyworld(5 if args.quick else args.toyworld_steps)] if args.quick or args.toyworld_steps else []
    rows = []
    if args.quick:
        write_json(args.json, "kpop", device, hardware, toyworld=toyworld, sd15=rows)
        return 0
    cuda = device.type == "cuda"
    steps = args.steps or (1000 if cuda else 2)
    ddim = args.ddim_steps or (50 if cuda else 4)
    start = time.perf_counter()
    denoiser = sd15_denoiser(device, args.resolution)
    print(f"\nSD1.5-shaped U-Net ({'fp16' if cuda else 'fp32'}, random weights, built in "
          f"{time.perf_counter() - start:.1f} s), {args.resolution}², batch 1, prompt k = 10 (770 tokens) in the "
          f"middle block, {steps} steps timed after one warm-up step, z_t from {ddim}-step DDIM; seconds per step:")
    print(f"  {'train':8s} {'k':>3s} {'empty':>5s} {'trained':>12s} {'z_t':>8s} {'update':>8s} {'step':>8s} "
          f"{'1000 steps':>11s} {'peak GiB':>9s}")
    for train in args.trains:
        for k, empty in itertools.product(args.latents_per_trajectory, args.preserve_empty):
            r = bench_sd15(denoiser, steps, ddim, train, k, empty == "on")
            rows.append(r)
            print(f"  {r['train']:8s} {r['k']:3d} {empty:>5s} {r['trained']:12,d} {r['sampling']:8.3f} "
                  f"{r['update']:8.3f} {r['step']:8.3f} {r['step'] * 1000 / 60:9.1f} m {r['peak'] / 2 ** 30:9.2f}",
                  flush=True)
    print("  k: latents_per_trajectory (z_t per sampling run); z_t: the frozen model's sampling (~ddim_steps/2 "
          "guided passes per run; with k, ~ddim_steps·k/(k+1) per k steps) and its targets; empty: preserve_empty (the "
          "empty prompt held: one more frozen output and one more trained pass per step); update: the transfer "
          "and removal steps; peak: above the process's memory before the run (incl. the U-Net's frozen copy of "
          "inference-mode weights where a host has them, not here).")
    write_json(args.json, "kpop", device, hardware, toyworld=toyworld, sd15=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
