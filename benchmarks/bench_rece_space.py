#!/usr/bin/env python
"""Benchmark of RECE and SPACE on SD1.5- and SDXL-shaped random K/V weights.

Not a test: it prints figures. Weights: the real cross-attention layer counts and shapes (widths
320/640/1280 and context 768 for SD1.5; 640/1280 and 2048 for SDXL), random fp16, seeded; token
features: the CLIP-like random features of ``bench_uce.py`` (``FakeClip``) behind a stand-in text
encoder, for a handful of concepts (``--concepts`` targets with one guide, as many preserved).

* RECE (``--epochs``, default 5): the method's whole run (UCE step, derive-and-erase epochs, the
  per-epoch probe), its time and peak memory; and the recoverability probe that `api.erase` adds to
  every report, timed on its own.
* SPACE: seconds per FISTA iteration of ``fista_l1`` (all matrices of a width stacked, the cheaper of
  the dense and low-rank gradient forms, with its default adaptive restart, which costs an extra pass)
  against a plain dense FISTA reference (each matrix on its own, ``Y M − B`` with the dense d × d M,
  allocating as straightforward code does), their ratio and both extrapolated to 1000 iterations;
  the solver's peak memory; then the whole method with its defaults (UCE start, FISTA to the
  tolerance, CSR, objectives, deflate): time, iterations, sparsity, storage. With ``--quick`` the
  whole method runs 10 iterations and its time at 1000 is extrapolated (marked ``~``).

``--quick``: fewer iterations; on SDXL only a subset of the matrices (``--subset`` per width) is
built and every SDXL figure is scaled to all 140 matrices (work is linear in the matrix count), and
RECE runs one epoch (its per-epoch cost is printed, so 5 epochs can be read off).

    python benchmarks/bench_rece_space.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_uce import ARCHS, FakeClip, build_weights, make_sync, measure_peak  # noqa: E402
from concept_eraser.concepts import Concepts  # noqa: E402
from concept_eraser.editable import no_progress  # noqa: E402
from concept_eraser.errors import ConvergenceWarning  # noqa: E402
from concept_eraser.encoding import EncodedPrompts  # noqa: E402
from concept_eraser.methods import get_method  # noqa: E402
from concept_eraser.methods.space import auto_mu, fista_l1, space_operands, top_eigenvalue  # noqa: E402
from concept_eraser.methods.uce import SOLVE_DTYPES, gather_columns  # noqa: E402
from concept_eraser.params import resolve  # noqa: E402
from concept_eraser.patch import ErasurePatch  # noqa: E402
from concept_eraser.probe import recoverability  # noqa: E402


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
        self.arch = SimpleNamespace(kv_keys=tuple(weights), family="synthetic")
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


def dense_fista_reference(W16, U, V, lam, mu, iterations, sync):
    """Plain FISTA on one matrix with the dense M (the formulas as written, fresh tensors each step);
    returns seconds per iteration."""
    W_o = W16.float()
    d = W_o.shape[1]
    eye = torch.eye(d, device=W_o.device)
    M = lam * eye + U @ U.T
    B = W_o @ (lam * eye + V @ U.T)
    L = 2 * torch.linalg.eigvalsh(M.double())[-1].item()
    W_prev, Y, t = W_o.clone(), W_o.clone(), 1.0
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        grad = 2 * (Y @ M - B)
        W = torch.nn.functional.softshrink(Y - grad / L, mu / L)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Y = W + ((t - 1) / t_next) * (W - W_prev)
        W_prev, t = W, t_next
    sync()
    return (time.perf_counter() - start) / iterations


def fmt(seconds: float, approx: bool = False) -> str:
    text = f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return ("~" if approx else "") + text


def bench_arch(arch: str, args, device: torch.device, sync) -> dict:
    blocks, widths, d = ARCHS[arch]
    weights = build_weights(arch, device)
    n_all = len(weights)
    scale = 1.0
    if args.quick and arch == "sdxl":
        weights = subset(weights, args.subset)
        scale = n_all / len(weights)
    model = SyntheticModel(weights, d, device)
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    concepts = Concepts.build([f"target concept {i}" for i in range(args.concepts)], ["art"],
                              [f"kept concept number {i}" for i in range(args.concepts)])
    note = f" (subset {len(weights)}/{n_all} matrices; times and memory scaled ×{scale:.1f})" if scale != 1 else ""
    print(f"[{arch}] {n_all} K/V matrices, context {d}, {args.concepts} targets + {args.concepts} preserved{note}",
          flush=True)
    out = {"arch": arch}

    # ---------------- RECE
    rece = get_method("rece")
    epochs = 1 if (args.quick and arch == "sdxl") else args.epochs
    values = resolve(rece.params, {"epochs": epochs}, "rece")
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
    out.update(rece_epochs=epochs, rece_s=t_rece, rece_peak=peak * scale, probe_s=t_probe)

    # ---------------- SPACE: per-iteration cost, ours vs the dense reference
    space = get_method("space")
    values = resolve(space.params, {}, "space")
    columns = gather_columns(model, concepts, values)
    U, V = space_operands(columns, values["erase_scale"], values["preserve_scale"], SOLVE_DTYPES[values["solve_dtype"]])
    lam = values["lam"]
    mu = auto_mu(weights.values(), lam)  # the default (empty) μ, as the method resolves it
    by_width: dict[int, list[str]] = {}
    for key, w in weights.items():
        by_width.setdefault(w.shape[0], []).append(key)
    t_ours, forms, zeros, entries, peak_space = 0.0, set(), 0, 0, 0
    for width, keys in sorted(by_width.items()):
        W_o = torch.cat([weights[k].float() for k in keys])
        fista_l1(W_o, U, V, lam, mu, 2, 1e-30, W_o.clone())  # warm-up
        start = W_o.clone()
        peak_w, _, seconds, result = measure_peak(
            lambda: fista_l1(W_o, U, V, lam, mu, args.iterations, 1e-30, start), device)
        t_ours += seconds / args.iterations
        peak_space = max(peak_space, peak_w)
        forms.add(result.form)
        zeros += int((result.weights == 0).sum())
        entries += result.weights.numel()
        del W_o, start, result
        gc.collect()
    t_ours *= scale
    t_ref = 0.0
    for width, keys in sorted(by_width.items()):
        dense_fista_reference(weights[keys[0]], U, V, lam, mu, 1, sync)  # warm-up
        per = sum(dense_fista_reference(weights[k], U, V, lam, mu, args.ref_iterations, sync)
                  for k in keys[:args.ref_matrices]) / min(len(keys), args.ref_matrices)
        t_ref += per * len(keys)
    t_ref *= scale
    ratio = t_ref / t_ours
    sigma = lam + top_eigenvalue(U)
    print(f"  SPACE per iteration: ours {fmt(t_ours)} ({'/'.join(sorted(forms))} gradient, r = {U.shape[1]}), "
          f"dense reference {fmt(t_ref)} (timed on ≤{args.ref_matrices} matrices per width) → ×{ratio:.1f}; "
          f"1000 iterations: ours ~{fmt(1000 * t_ours)}, reference ~{fmt(1000 * t_ref)}", flush=True)
    print(f"    sparsity after {args.iterations} iterations from W_o at the default μ={mu:.4f}: {zeros / entries:.1%}; "
          f"σ_max(M)/λ = {sigma / lam:.0f}; solver peak {peak_space * scale / 2**20:.0f} MiB "
          f"({peak_space / w_bytes:.2f}× the fp16 K/V weights)", flush=True)

    # ---------------- SPACE: the whole method (UCE start, FISTA, CSR, objectives, deflate)
    few = 10 if args.quick else None
    values = resolve(space.params, {"iterations": few, "tol": 1e-12} if few else {}, "space")
    sync()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # expected at 10 iterations
        output = space.run(model, concepts, values, no_progress)
    sync()
    t_run = (time.perf_counter() - start) * scale
    report = output.details["space"]
    storage, total = report["storage"], report["total"]
    sizes = (f"dense {storage['dense_bytes'] * scale / 1e6:.0f} MB, CSR {storage['sparse_bytes'] * scale / 1e6:.0f} "
             f"MB, deflated {storage['compressed_bytes'] * scale / 1e6:.0f} MB")
    if few:
        overhead = t_run - few * t_ours
        t_default = overhead + 1000 * t_ours
        print(f"  SPACE method, {few} iterations: {fmt(t_run)} → overhead beyond the iterations {fmt(overhead)}; "
              f"1000 iterations {fmt(t_default, True)}; storage after {few} iterations {sizes}", flush=True)
    else:
        t_default = t_run
        print(f"  SPACE method, defaults: {fmt(t_run)}, {total['iterations']} iterations "
              f"({'converged' if total['converged'] else 'NOT converged'}; {fmt(t_run / total['iterations'])} per "
              f"iteration all included), μ={report['mu']:.4f}, sparsity {total['sparsity']:.1%}; storage {sizes}",
              flush=True)
    out.update(space_iter=t_ours, ref_iter=t_ref, ratio=ratio, space_run=t_default, space_exact=not few)
    del output, model, weights
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer iterations; SDXL on a subset, scaled (see above)")
    p.add_argument("--archs", default="sd15,sdxl")
    p.add_argument("--concepts", type=int, default=3, help="targets (and as many preserved prompts)")
    p.add_argument("--epochs", type=int, default=5, help="RECE epochs")
    p.add_argument("--iterations", type=int, default=None, help="timed SPACE iterations (default 100, quick 20)")
    p.add_argument("--ref-iterations", type=int, default=None, help="timed reference iterations (default 5, quick 2)")
    p.add_argument("--ref-matrices", type=int, default=None, help="reference matrices timed per width (3, quick 2)")
    p.add_argument("--subset", type=int, default=10, help="--quick: SDXL matrices built per width")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.iterations = args.iterations or (20 if args.quick else 100)
    args.ref_iterations = args.ref_iterations or (2 if args.quick else 5)
    args.ref_matrices = args.ref_matrices or (2 if args.quick else 3)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = make_sync(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"RECE / SPACE benchmark: torch {torch.__version__}, {device} ({name}), CPU threads "
          f"{torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}{', QUICK' if args.quick else ''}")
    print("Times for 1000 SPACE iterations are extrapolated from the timed iterations (~).")
    rows = [bench_arch(arch, args, device, sync) for arch in args.archs.split(",")]
    print()
    print(f"{'model':6s} {'RECE':>18s} {'probe':>9s} {'SPACE/iter':>11s} {'dense ref/iter':>15s} {'ratio':>7s} "
          f"{'SPACE run':>14s}")
    for r in rows:
        rece = f"{fmt(r['rece_s'])} ({r['rece_epochs']} ep)"
        print(f"{r['arch']:6s} {rece:>18s} {fmt(r['probe_s']):>9s} {fmt(r['space_iter']):>11s} "
              f"{fmt(r['ref_iter']):>15s} {'×%.1f' % r['ratio']:>7s} {fmt(r['space_run'], not r['space_exact']):>14s}")
    sd15 = [r for r in rows if r["arch"] == "sd15"]
    if sd15 and device.type == "cpu":
        print(f"target on CPU: SPACE per iteration ≥ 2× faster than the dense reference on SD1.5 -> "
              f"{'OK' if sd15[0]['ratio'] >= 2 else 'MISSED'} (×{sd15[0]['ratio']:.1f})")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
