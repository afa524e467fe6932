#!/usr/bin/env python
"""Benchmark of ErasePro: total time and peak memory on SD1.5-, SDXL- and Flux-shaped models.

Not a test: it prints figures. Each model is a seeded random fp16 checkpoint written to a
temporary folder: real-size text encoders (SD1.5: CLIP ViT-L, 12 × 768; SDXL: CLIP ViT-L + OpenCLIP
bigG, 32 × 1280, fused in_proj) and the real cross-attention K/V shapes (SD1.5: 32 matrices
320/640/1280 × 768; SDXL: 140, 640/1280 × 2048), with the rest of the U-Net left out (ErasePro
never reads it). Flux: real-size CLIP-L and T5-XXL blocks, 4 of T5's 24 (`synthetic.FLUX_T5_BLOCKS`: the peak
holds one block in float32; what grows with the blocks, the anchors' inputs and the low-rank edits, is
computed in ErasePro's docstring), a tiny transformer with 4096-wide text maps; prompts tokenized by a
word-level stand-in for T5's tokenizer, padded to Flux's 256 tokens. Random weights give random features, but
the same amount of work as real ones.

What is timed: `ErasePro.run` on a `CheckpointModel` of that file, i.e. the whole method once the
file is open — building the layer-wise text encoders from the fp16 weights (read from disk, cast
to the feature dtype), the anchor pass, the progressive pass with one SVD and one q/k/v edit per
block, the U-Net K/V edits, and the per-stage residual check — but not `api.erase`'s
recoverability probe, nor writing the output. The phase split comes from the method's report.

Peak memory is measured above what the process held before the run: on CPU the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs), on CUDA
torch.cuda.max_memory_allocated. Most of it is the text encoders' float32 copy (SDXL's bigG alone
is 2.8 GB).

    python benchmarks/bench_erasepro.py [--device cpu|cuda] [--quick] [--json PATH]

--quick uses the tiny text encoders and U-Net (seconds; a smoke test of this script; a start layer past
their last block is moved to it).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import add_common_args, measure_peak, setup_device, write_json
from synthetic import write_model

from concept_eraser import CheckpointModel, Concepts
from concept_eraser.editable import no_progress
from concept_eraser.methods import get_method
from concept_eraser.models.layerwise import blocks_reaching_unet
from concept_eraser.params import resolve
from concept_eraser.tokenizer import use_t5_tokenizer

TARGETS = ["Van Gogh", "Claude Monet", "Salvador Dali", "Greg Rutkowski"]

# (label, number of concepts, guide, parameters)
CASES = [
    ("explicit, all_tokens", 1, "artist", {"token_policy": "all_tokens"}),
    ("explicit, all_tokens", 4, "artist", {"token_policy": "all_tokens"}),
    ("explicit, prompt_tokens", 1, "artist", {"token_policy": "prompt_tokens"}),
    ("implicit -w (k 5 from block 5)", 1, "", {"token_policy": "first_k", "k": 5, "start_layer": 5,
                                                 "progressive": False}),
]


def word_tokenizer(folder: Path, prompts: list[str]) -> Path:
    """A tokenizer.json standing in for T5's (none is downloaded): these prompts' words, T5's <pad> 0 and </s> 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for p in prompts for w in p.split()})
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in
                                                                                 enumerate(words)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def run_case(model: CheckpointModel, concepts: Concepts, params: dict, device: torch.device):
    """(seconds, peak bytes above the baseline, report details) of one ErasePro run."""
    method = get_method("erasepro")
    values = resolve(method.params, params, method.name)
    peak, _sampled, seconds, output = measure_peak(lambda: method.run(model, concepts, values, no_progress), device)
    return seconds, peak, output.details


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--quick", action="store_true", help="tiny text encoders and U-Net: a smoke test")
    p.add_argument("--families", default="sd15,sdxl,flux", help="comma list of sd15, sdxl, flux")
    args = p.parse_args(argv)
    device, hardware = setup_device(p, args)
    print(f"ErasePro benchmark — torch {torch.__version__}, {device} ({hardware}); "
          f"{'tiny (--quick)' if args.quick else 'real-size'} text encoders, fp16 checkpoint, "
          "feature dtype float32, solve dtype float64")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        use_t5_tokenizer(word_tokenizer(Path(folder), TARGETS + ["artist", "warm up"]))
        for family in args.families.split(","):
            t0 = time.perf_counter()
            path = write_model(Path(folder), family, args.quick)
            model = CheckpointModel(path, device)
            print(f"\n{family}: {model.arch.describe()} (file {path.stat().st_size / 1e9:.2f} GB, "
                  f"written in {time.perf_counter() - t0:.0f} s)")
            deepest = max(blocks_reaching_unet(spec) for spec in model.arch.encoders)  # warm up on one block
            run_case(model, Concepts.build(["warm up"]), {"token_policy": "first_k", "k": 2, "start_layer": deepest},
                     device)
            for label, n, guide, params in CASES:
                concepts = Concepts.build(TARGETS[:n], [guide])
                if "start_layer" in params:  # the tiny encoders of --quick have fewer blocks
                    params = {**params, "start_layer": min(params["start_layer"], deepest)}
                seconds, peak, details = run_case(model, concepts, params, device)
                phases = details["seconds_by_phase"]
                row = (family, label, n, details["columns"], seconds, phases["build_text_encoders"],
                       phases["text_encoders"], phases.get("unet", 0.0), peak, details["max_residual"])
                rows.append(row)
                print(f"  {label:32s} {n} concept(s), {details['columns']:3d} columns: {seconds:7.2f} s, "
                      f"peak +{peak / 2 ** 30:.2f} GiB, max residual {details['max_residual']:.1e}", flush=True)
            del model
            gc.collect()

    print("\n== ErasePro (one run each; times in seconds; peak = memory above the process before the run) ==")
    print(f"{'model':5s} {'case':32s} {'n':>2s} {'cols':>5s} {'total':>8s} {'build TE':>9s} {'TE passes':>10s} "
          f"{'U-Net':>7s} {'peak GiB':>9s} {'residual':>9s}")
    for family, label, n, cols, total, build, te, unet, peak, residual in rows:
        print(f"{family:5s} {label:32s} {n:2d} {cols:5d} {total:8.2f} {build:9.2f} {te:10.2f} {unet:7.2f} "
              f"{peak / 2 ** 30:9.2f} {residual:9.1e}")
    print("  build TE: rebuilding the text encoders from the checkpoint (fp16 → float32); TE passes: anchor and "
          "progressive passes with the per-block SVDs and q/k/v edits; U-Net: the K/V edits. residual: max over "
          "stages of ‖W X − W_o Y‖/‖W_o Y‖ for the edit as stored (float32 low-rank factors, before fp16 rounding).")
    write_json(args.json, "erasepro", device, hardware,
               runs=[{"model": family, "case": label, "concepts": n, "columns": cols, "seconds": total,
                      "build_text_encoders_seconds": build, "text_encoder_passes_seconds": te, "unet_seconds": unet,
                      "peak_bytes": peak, "max_residual": residual}
                     for family, label, n, cols, total, build, te, unet, peak, residual in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
