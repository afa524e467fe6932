#!/usr/bin/env python
"""Benchmark of RECE and SPACE on SD1.5- and SDXL-shaped K/V weights.

Not a test: it prints figures. Two feature sources (``--features``):

* ``synthetic``: the real cross-attention layer counts and shapes (widths 320/640/1280 and context 768 for
  SD1.5; 640/1280 and 2048 for SDXL), random fp16 weights, seeded; token features from the CLIP-like random
  features of ``synthetic.py`` (``FakeClip``) behind a stand-in text encoder;
* ``real``: a seeded random checkpoint with real-size text encoders (SD1.5: CLIP ViT-L; SDXL: CLIP ViT-L +
  OpenCLIP bigG), written to a temporary folder (``synthetic.write_model``), read back by `CheckpointModel`:
  the features (and their conditioning) come from real-size encoders, the case where FISTA failed.

Concepts: ``--concepts`` targets with the guide "art", as many preserved prompts.

* RECE (synthetic features only; ``--epochs``, default 5): the method's whole run (UCE step, derive-and-erase
  epochs, the per-epoch probe), its time and peak memory; and the recoverability probe alone.
* SPACE at its defaults (Newton on the dual, automatic μ for the target sparsity, certified stop; ``--iterations``
  sets the cap): the method's time once the prompts are encoded (the encoding is timed apart: every method pays
  it), passes over the weights ("iterations": one pass = the cost of one FISTA iteration), Newton steps, whether
  it converged, the certified distance bound and duality gap, the μ search's share of the time, sparsity per
  width, peak memory above the loaded model against the fp16 K/V weights (a memory-mapped checkpoint's K/V
  pages are read in first: they are the model's); then FISTA (``solver=fista``, the paper's solver with adaptive
  restart; ``--no-fista`` skips it) in the same run, at the same μ and tolerance, with as many iterations as
  Newton made passes (equal work) and with ``--fista-iterations``: its certified distance, time and peak.

``--quick``: on SDXL only a subset of the matrices (``--subset`` per width) is built and every SDXL time and
memory figure is scaled to all 140 matrices (work is linear in the matrix count); tiny text encoders for
``real``; RECE runs one epoch on SDXL.

    python benchmarks/bench_rece_space.py [--device cpu|cuda] [--quick] [--features synthetic,real]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import add_common_args, make_sync, measure_peak, setup_device, write_json
from synthetic import ARCHS, FakeClip, build_weights, write_model

from concept_eraser import CheckpointModel
from concept_eraser.concepts import Concepts
from concept_eraser.editable import no_progress
from concept_eraser.encoding import EncodedPrompts
from concept_eraser.errors import ConvergenceWarning
from concept_eraser.methods import get_method
from concept_eraser.methods.uce import gather_columns
from concept_eraser.models.arch import CONTEXT, ArchSpec, TextMap
from concept_eraser.params import resolve
from concept_eraser.patch import ErasurePatch
from concept_eraser.probe import recoverability


class FakeEncoder:
    """The text side for the benchmark: FakeClip features, one fixed draw per prompt."""

    def __init__(self, d: int, seed: int = 0):
        self.clip, self.cache = FakeClip(d, seed), {}

    def encode(self, prompts):
        prompts = tuple(prompts)
        for p in prompts:
            if p not in self.cache:
                self.cache[p] = self.clip.encode(len(p.split()))
        lengths = tuple(len(p.split()) + 2 for p in prompts)
        return EncodedPrompts(prompts, torch.stack([self.cache[p] for p in prompts]), lengths)


class SyntheticModel:
    """An `EditableModel` over random weights (what RECE, SPACE and the probe read)."""

    def __init__(self, weights: dict[str, torch.Tensor], d: int, device: torch.device):
        self.weights, self.device = weights, device
        maps = tuple(TextMap(k, CONTEXT, tuple(w.shape)) for k, w in weights.items())
        self.arch = ArchSpec("synthetic", "synthetic", d, maps, ())
        self.text_encoder = FakeEncoder(d)

    def weight(self, key):
        return self.weights[key]

    def source(self):
        return {"name": "synthetic"}

    def prior_steps(self):
        return ()


def subset(weights: dict[str, torch.Tensor], per_width: int) -> dict[str, torch.Tensor]:
    count: dict[int, int] = {}
    out = {}
    for key, w in weights.items():
        if count.get(w.shape[0], 0) < per_width:
            count[w.shape[0]] = count.get(w.shape[0], 0) + 1
            out[key] = w
    return out


def fmt(seconds: float, approx: bool = False) -> str:
    text = f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return ("~" if approx else "") + text


def bench_rece(model, weights, concepts, args, device, sync, scale) -> dict:
    rece = get_method("rece")
    epochs = 1 if (args.quick and scale != 1) else args.epochs
    values = resolve(rece.params, {"epochs": epochs}, "rece")
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    if device.type == "cuda":  # warm-up: CUDA/cuBLAS/cuSOLVER initialisation is not RECE's time
        rece.run(model, concepts, values, no_progress)
    peak, _, t_rece, output = measure_peak(lambda: rece.run(model, concepts, values, no_progress), device)
    t_rece *= scale
    residuals = [round(f["targets"][concepts.targets[0]]["residual"], 3) for f in output.details["epochs"]]
    patch = ErasurePatch("synthetic", output.edits)
    start = time.perf_counter()
    recoverability(model, patch, concepts.targets)
    sync()
    t_probe = (time.perf_counter() - start) * scale
    kinds = sorted({s.kind for st in output.edits.values() for s in st})
    del output, patch
    gc.collect()
    print(f"  RECE {epochs} epochs: {fmt(t_rece)}, peak {peak * scale / 2**20:.0f} MiB "
          f"({peak / w_bytes:.2f}× the K/V weights), stages {'+'.join(kinds)}; probe residual by epoch {residuals}; "
          f"recoverability probe alone {fmt(t_probe)}", flush=True)
    return {"rece_epochs": epochs, "rece_s": t_rece, "probe_s": t_probe}


def run_space(model, concepts, params, device, sync):
    """(seconds, peak bytes above the baseline, report) of one SPACE run (method only, no probe)."""
    space = get_method("space")
    values = resolve(space.params, params, "space")
    for key in model.arch.map_keys():  # a memory-mapped checkpoint's K/V pages read in: the model, not the solve
        model.weight(key).sum()
    sync()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the table instead
        peak, _, seconds, output = measure_peak(lambda: space.run(model, concepts, values, no_progress), device)
    report = output.details["space"]
    del output
    gc.collect()
    return seconds, peak, report


def bench_space(model, weights, concepts, args, device, sync, scale, label) -> dict:
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    # The prompts' features first (a model encodes each prompt once): the runs below time the solve, not the
    # text encoders, whose cost and memory every method shares.
    space = get_method("space")
    peak_enc, _, t_enc, _ = measure_peak(
        lambda: gather_columns(model, concepts, resolve(space.params, {}, "space")), device)
    print(f"  features encoded in {fmt(t_enc)} (peak {peak_enc / 2**20:.0f} MiB), not counted "
          f"below; load avg {os.getloadavg()[0]:.2f}", flush=True)
    t_new, peak, new = run_space(model, concepts, {"iterations": args.iterations, "sparsity": args.sparsity},
                                  device, sync)
    total = new["total"]
    mu = new["mu"]
    widths = ", ".join(f"{w}: {s:.1%}" for w, s in total["sparsity_by_width"].items())
    print(f"  SPACE newton [{label}]: {fmt(t_new * scale)} ({'converged' if total['converged'] else 'NOT converged'}, "
          f"{total['iterations']} passes, {total['newton_steps']} Newton steps per chunk at most, certified distance "
          f"≤ {total['distance_bound']:.1e}, gap {total['duality_gap']:.2e}); μ={mu:.4g} for "
          f"{new['mu_sample_sparsity']:.1%} zeros on the sample (search {fmt(new['mu_search_seconds'] * scale)} of "
          f"it); sparsity {total['sparsity']:.1%} ({widths}); peak {peak * scale / 2**20:.0f} MiB = "
          f"{peak / w_bytes:.2f}× the fp16 K/V weights (the result as stored: "
          f"{new['storage']['stored_bytes'] / w_bytes:.2f}×, its CSR {new['storage']['sparse_vs_dense']:.2f}×); "
          f"columns {new['columns']}, σ_max(M)/λ = "
          f"{new['condition']:.3g}; load avg {os.getloadavg()[0]:.2f}", flush=True)
    out = {"label": label, "new_s": t_new * scale, "new_it": total["iterations"], "new_conv": total["converged"],
           "new_dist": total["distance_bound"], "sparsity": total["sparsity"], "by_width": widths,
           "peak_ratio": peak / w_bytes, "condition": new["condition"], "fista": []}
    for iterations in () if args.no_fista else dict.fromkeys((total["iterations"], args.fista_iterations)):
        t_f, peak_f, fista = run_space(model, concepts, {"solver": "fista", "mu": mu, "iterations": iterations},
                                       device, sync)
        ft = fista["total"]
        print(f"  SPACE fista  [{label}], {iterations} iterations: {fmt(t_f * scale)}, "
              f"{'converged' if ft['converged'] else 'NOT converged'}, "
              f"certified distance ≤ {ft['distance_bound']:.1e}, "
              f"sparsity {ft['sparsity']:.1%}, peak {peak_f / w_bytes:.2f}× the K/V weights; load avg "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        out["fista"].append((iterations, t_f * scale, ft["converged"], ft["distance_bound"]))
    return out


def bench_arch(arch: str, args, device: torch.device, sync, folder: Path) -> list[dict]:
    concepts = Concepts.build([f"target concept {i}" for i in range(args.concepts)], ["art"],
                              [f"kept concept number {i}" for i in range(args.concepts)])
    rows = []
    for features in args.features.split(","):
        if features == "synthetic":
            d = ARCHS[arch][2]
            weights = build_weights(arch, device)
            n_all = len(weights)
            scale = 1.0
            if args.quick and arch == "sdxl":
                weights = subset(weights, args.subset)
                scale = n_all / len(weights)
            model = SyntheticModel(weights, d, device)
        else:
            t0 = time.perf_counter()
            path = write_model(folder, arch, args.quick)
            model = CheckpointModel(path, device)
            weights = {k: model.weight(k) for k in model.arch.map_keys()}
            n_all, scale = len(weights), 1.0
            print(f"[{arch}] real-size text encoders: checkpoint written in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        note = f" (subset {len(weights)}/{n_all} matrices; times and memory scaled ×{scale:.1f})" if scale != 1 else ""
        print(f"[{arch}, {features} features] {n_all} K/V matrices, {args.concepts} targets + {args.concepts} "
              f"preserved{note}", flush=True)
        row = {"arch": arch, "features": features}
        if features == "synthetic" and not args.no_rece:
            row.update(bench_rece(model, weights, concepts, args, device, sync, scale))
        row.update(bench_space(model, weights, concepts, args, device, sync, scale, f"{arch}, {features}"))
        rows.append(row)
        del model, weights
        gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--quick", action="store_true", help="fewer iterations; SDXL on a subset, scaled (see above)")
    p.add_argument("--archs", default="sd15,sdxl")
    p.add_argument("--features", default="synthetic,real", help="synthetic and/or real (see above)")
    p.add_argument("--concepts", type=int, default=1, help="targets (and as many preserved prompts)")
    p.add_argument("--epochs", type=int, default=5, help="RECE epochs")
    p.add_argument("--no-rece", action="store_true", help="SPACE only")
    p.add_argument("--fista-iterations", type=int, default=None,
                   help="FISTA's second run (default 1000 on CUDA, 100 on CPU, 20 with --quick)")
    p.add_argument("--no-fista", action="store_true", help="SPACE: Newton only (FISTA at equal work is slow on CPU)")
    p.add_argument("--iterations", type=int, default=500, help="SPACE's iteration cap (passes; the default is 500)")
    p.add_argument("--sparsity", type=float, default=0.4,
                   help="SPACE's target sparsity (the default is 0.4; the paper's regime 0.8)")
    p.add_argument("--subset", type=int, default=10, help="--quick: SDXL matrices built per width")
    args = p.parse_args(argv)
    args.fista_iterations = args.fista_iterations or (20 if args.quick else 1000 if args.device == "cuda" else 100)

    device, hardware = setup_device(p, args)
    sync = make_sync(device)
    print(f"RECE / SPACE benchmark: torch {torch.__version__}, {device} ({hardware}), CPU threads "
          f"{torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}{', QUICK' if args.quick else ''}")
    with tempfile.TemporaryDirectory() as folder:
        rows = [r for arch in args.archs.split(",") for r in bench_arch(arch, args, device, sync, Path(folder))]
    print()
    print(f"{'model, features':18s} {'RECE':>18s} {'newton':>10s} {'passes':>7s} {'distance':>9s} {'sparsity':>9s} "
          f"{'peak/KV':>8s}  FISTA (iterations: time, distance)")
    for r in rows:
        rece = f"{fmt(r['rece_s'])} ({r['rece_epochs']} ep)" if "rece_s" in r else "-"
        fista = "; ".join(f"{it}: {fmt(t)}, {dist:.1e}{'' if conv else ' (not conv.)'}"
                          for it, t, conv, dist in r["fista"])
        conv = "" if r["new_conv"] else " (not conv.)"
        print(f"{r['label']:18s} {rece:>18s} {fmt(r['new_s']):>10s} {r['new_it']:7d} {r['new_dist']:9.1e}{conv} "
              f"{r['sparsity']:9.1%} {r['peak_ratio']:7.2f}×  {fista}")
    print("passes: over all rows, each the cost of one FISTA iteration; distance: certified bound on ‖W − W*‖/‖W‖ "
          "from the duality gap (tol 1e-4); peak/KV: peak memory above the weights / fp16 K/V weights")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")
    write_json(args.json, "rece_space", device, hardware, runs=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
