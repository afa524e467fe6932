#!/usr/bin/env python
"""Benchmark of the UCE solve: ``concept_eraser.linalg`` against a per-matrix reference.

Not a test: it prints figures. For SD1.5- and SDXL-shaped cross-attention K/V weights (the real
layer counts and shapes, random values, fp16, seeded) and CLIP-like random token features
(float32, ~27 per token, BOS shared by every prompt, EOS/padding strongly correlated), for 1, 10
and 100 concepts under two token policies:

* ``last_word``        1 column per concept (UCE's current script); the empty prompt's 1 column
                       is preserved, as the project does by default;
* ``last_word_to_end`` the last word through EOS and padding, ~74-76 columns per concept (UCE's
                       paper-era ``train_erase.py``), guide ' ' aligned from its BOS; the empty
                       prompt's 77 columns are preserved (preserve scale max(0.1, 1/1) = 1).

it times

* ours: ``uce_factors`` + ``right_update_edits`` (the whole solve once the features exist,
  one Cholesky shared by all matrices, low-rank or dense edits), with the project's default
  solve dtype (float64; ``--solve-dtype`` adds others);
* the reference, written as UCE's paper-era script computes it: for EVERY K/V matrix
  separately, per concept, mat1 += s_e (W_o c_guide) c_eraseᵀ, mat2 += s_e c_erase c_eraseᵀ, the
  same for the preserved prompt, then W = mat1 @ torch.inverse(mat2), in float32. (The script
  sums batched per-token outer products and recomputes every layer's values for every layer;
  here they are plain GEMMs and only the layer's own values, so the reference is already
  *faster* than the original script.) If its full run would exceed ``--ref-budget`` seconds it
  is timed on a few matrices of each shape and extrapolated (marked ``~`` and ``k/N``).

It checks correctness on a few matrices against a float64 evaluation of the same formula
(mat1 · mat2⁻¹), and measures the peak memory of our solve above the memory held before it
(weights and features already built), relative to the K/V weights' size: on CPU from the
kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) and a psutil RSS sampler;
on CUDA from torch.cuda.max_memory_allocated.

    python benchmarks/bench_uce.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concept_eraser.linalg import right_update_edits, uce_factors  # noqa: E402
from concept_eraser.models.arch import CLIP_WINDOW
from concept_eraser.patch import DenseEdit, LowRankEdit  # noqa: E402
from concept_eraser.tiny import SD_BLOCKS, SDXL_BLOCKS  # noqa: E402

# (blocks, K/V width by level, context width)
ARCHS = {
    "sd15": (SD_BLOCKS, {0: 320, 1: 640, 2: 1280}, 768),
    "sdxl": (SDXL_BLOCKS, {0: 640, 1: 1280}, 2048),
}
LAM, ERASE_SCALE = 0.5, 1.0           # UCE's published λ and erase scale
WINDOW = CLIP_WINDOW                   # CLIP's padded sequence length
TOKEN_NORM = 27.0                      # typical per-token norm of CLIP text features
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

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


def build_features(d: int, n_concepts: int, policy: str, seed: int):
    """Per-concept (c_erase, c_guide) column blocks (d × k) and the preserved blocks, as the
    paper-era script / the project's `concept_columns` select them."""
    clip = FakeClip(d, seed)
    empty = clip.encode(0)                  # '' and ' ' both tokenise to BOS, EOS
    gen = torch.Generator().manual_seed(seed + 1)
    concepts = []
    for _ in range(n_concepts):
        n_words = int(torch.randint(1, 5, (1,), generator=gen))   # 1-4 word tokens
        feats = clip.encode(n_words)
        last = n_words                       # attention_mask.sum() - 2
        if policy == "last_word":
            c_e, c_g = feats[last:last + 1], empty[0:1]
        elif policy == "last_word_to_end":
            count = WINDOW - max(last, 0)    # guide starts at its own last word = BOS (index 0)
            c_e, c_g = feats[last:last + count], empty[0:count]
        else:
            raise ValueError(policy)
        concepts.append((c_e.T.contiguous(), c_g.T.contiguous()))
    preserve = [empty[0:1].T.contiguous()] if policy == "last_word" else [empty.T.contiguous()]
    scale_p = max(0.1, 1.0 / len(preserve))
    return concepts, preserve, scale_p


# ----------------------------------------------------------------------------------------------
# The two solvers
# ----------------------------------------------------------------------------------------------

def solve_ours(weights, c_e, c_g, c_p, scale_p, dtype):
    A, B = uce_factors(c_e, c_g, c_p, LAM, ERASE_SCALE, scale_p, dtype)
    return right_update_edits(weights, A, B)


def reference_matrix(w16: torch.Tensor, concepts, preserve, scale_p: float) -> torch.Tensor:
    """One K/V matrix as UCE's paper-era train_erase.py edits it (float32, explicit inverse)."""
    W = w16.float()
    d = W.shape[1]
    mat1 = LAM * W
    mat2 = LAM * torch.eye(d, device=W.device)
    for c_e, c_g in concepts:
        values = W @ c_g
        mat1 += ERASE_SCALE * (values @ c_e.T)
        mat2 += ERASE_SCALE * (c_e @ c_e.T)
    for c in preserve:
        values = W @ c
        mat1 += scale_p * (values @ c.T)
        mat2 += scale_p * (c @ c.T)
    return mat1 @ torch.inverse(mat2)


def truth_matrices(weights, keys, concepts, preserve, scale_p, device):
    """float64 mat1 · mat2⁻¹ for `keys` (same formula, all columns at once, LU solve)."""
    c_e = torch.cat([e for e, _ in concepts], 1).to(device, torch.float64)
    c_g = torch.cat([g for _, g in concepts], 1).to(device, torch.float64)
    c_p = torch.cat(preserve, 1).to(device, torch.float64)
    d = c_e.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=device)
    mat2 = LAM * eye + ERASE_SCALE * c_e @ c_e.T + scale_p * c_p @ c_p.T
    right = LAM * eye + ERASE_SCALE * c_g @ c_e.T + scale_p * c_p @ c_p.T      # mat1 = W_o · right
    out = {}
    for key in keys:
        mat1 = weights[key].to(torch.float64) @ right
        out[key] = torch.linalg.solve(mat2, mat1.T).T                          # mat2 symmetric
    return out


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------

def setup_device(parser, args) -> tuple[torch.device, str]:
    """The benchmark's device from `--device` / `--threads`, and a line describing the hardware."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return device, hardware


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fix_mmap_threshold() -> bool:
    """Make glibc serve every allocation above 128 KiB with its own mmap (no dynamic threshold), so
    freed tensors leave RSS at once and the peak reflects live memory, not the heap's history.
    Under glibc's default dynamic threshold the per-matrix float32 temporaries end up in the heap,
    where small long-lived results split the freed holes: the same solve then peaks anywhere from
    0.15× to 1.8× the SDXL weights depending on what ran before (see --default-malloc)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1      # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _rss() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vmhwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _rss())


def edits_bytes(edits) -> int:
    seen, total = set(), 0
    for e in edits.values():
        for t in (e.new,) if isinstance(e, DenseEdit) else (e.up, e.down):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def measure_peak(fn, device: torch.device, sample_rss: bool = False):
    """Run fn() once, its result kept alive to the end. Returns (peak bytes above the memory held
    before it, by VmHWM or the CUDA allocator; peak by an RSS sampler thread or None; seconds;
    the result). On CPU, freed heap memory is first returned to the system (malloc_trim) so the
    baseline RSS is honest; the sampler runs only when asked or when VmHWM cannot be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        return torch.cuda.max_memory_allocated(device) - base, None, elapsed, result
    _malloc_trim()
    base = _rss()
    hwm_ok = _reset_hwm()
    sampler = RssSampler() if sample_rss or not hwm_ok else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    sampled = sampler.stop() - base if sampler else None
    hwm = _vmhwm() if hwm_ok else None
    return (hwm - base if hwm is not None else sampled), sampled, elapsed, result


def time_ours(fn, sync, device, sample_rss: bool, min_repeats: int = 3, max_seconds: float = 4.0):
    """Best of up to `min_repeats` runs (one when it already takes > max_seconds). The first run
    also gives the peak memory and the edits. Returns (best s, runs, peak, sampled, edits)."""
    peak, sampled, first, edits = measure_peak(fn, device, sample_rss)
    times = [first]
    while len(times) < min_repeats and sum(times) <= max_seconds:
        sync()
        t0 = time.perf_counter()
        again = fn()
        sync()
        times.append(time.perf_counter() - t0)
        del again
    return min(times), len(times), peak, sampled, edits


def time_reference(weights, concepts, preserve, scale_p, sync, budget: float, keep, samples: int):
    """Time the per-matrix reference over all matrices, or over a few of each shape when the full
    run is estimated above `budget` seconds. Returns (seconds, measured?, k, N, {key: W_ref})."""
    by_shape: dict[tuple, list[str]] = {}
    for key, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(key)
    times: dict[tuple, list[float]] = {s: [] for s in by_shape}
    kept: dict[str, torch.Tensor] = {}

    def one(shape, key):
        sync()
        t0 = time.perf_counter()
        W = reference_matrix(weights[key], concepts, preserve, scale_p)
        sync()
        times[shape].append(time.perf_counter() - t0)
        if key in keep:
            kept[key] = W.cpu()
        del W

    for shape, keys in by_shape.items():          # one of each shape first, for the estimate
        one(shape, keys[0])
    estimate = sum(len(keys) * statistics.mean(times[s]) for s, keys in by_shape.items())
    if estimate <= budget:
        for shape, keys in by_shape.items():
            for key in keys[1:]:
                one(shape, key)
        done = sum(len(t) for t in times.values())
        return sum(sum(t) for t in times.values()), True, done, len(weights), kept
    for shape, keys in by_shape.items():          # a few more samples per shape, then extrapolate
        for key in keys[1:samples]:
            one(shape, key)
    total = sum(len(keys) * statistics.median(times[s]) for s, keys in by_shape.items())
    done = sum(len(t) for t in times.values())
    return total, False, done, len(weights), kept


def ours_matrix(edit, w16: torch.Tensor) -> torch.Tensor:
    """Our new W in float32 (low-rank: before rounding to the model dtype; dense: as stored)."""
    if isinstance(edit, LowRankEdit):
        return torch.addmm(w16.float(), edit.up.to(w16.device), edit.down.to(w16.device))
    return edit.new.float()


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    return f"{s * 1e3:8.1f} ms" if s < 1 else f"{s:8.2f} s "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer cases and a small reference budget (smoke run)")
    p.add_argument("--archs", default="sd15,sdxl")
    p.add_argument("--counts", default=None, help="concept counts, default 1,10,100 (quick: 1,10)")
    p.add_argument("--policies", default="last_word,last_word_to_end")
    p.add_argument("--solve-dtype", default="float64",
                   help="comma list of dtypes for our solve (float64 = the project's default, float32)")
    p.add_argument("--ref-budget", type=float, default=None,
                   help="seconds: above this estimated full reference run, time a subset and extrapolate "
                        "(default 60, 3 with --quick)")
    p.add_argument("--ref-samples", type=int, default=2, help="matrices per shape timed when extrapolating")
    p.add_argument("--check", type=int, default=3, help="matrices compared with the reference / float64")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--default-malloc", action="store_true",
                   help="CPU: keep glibc's dynamic mmap threshold (peak RSS then depends on the heap's history)")
    p.add_argument("--rss-sampler", action="store_true",
                   help="also sample RSS with psutil in a thread (CPU; VmHWM is used either way when available)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs.split(",")
    counts = [int(c) for c in (args.counts or ("1,10" if args.quick else "1,10,100")).split(",")]
    policies = args.policies.split(",")
    solve_dtypes = args.solve_dtype.split(",")
    budget = args.ref_budget if args.ref_budget is not None else (
        3.0 if args.quick else 60.0)
    sync = make_sync(device)
    fixed_mmap = device.type == "cpu" and not args.default_malloc and fix_mmap_threshold()

    print("UCE solve benchmark: concept_eraser.linalg vs per-matrix reference (UCE paper-era train_erase.py)")
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, device {device} ({dev_name}), CPU threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"λ={LAM}, erase scale {ERASE_SCALE}, preserve scale max(0.1, 1/#preserved)=1 (the empty prompt); "
          f"reference budget {budget:g} s per case")
    if device.type == "cpu":
        print("NOTE: CPU timings on a shared machine are noisy; ratios are more telling than absolute times.")
    print()

    rows, checks, mems = [], [], []
    for arch in archs:
        weights = build_weights(arch, device)
        n_params = sum(w.numel() for w in weights.values())
        w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
        d = ARCHS[arch][2]
        firsts: dict[tuple, str] = {}
        for key, w in weights.items():
            firsts.setdefault(tuple(w.shape), key)
        check_keys = list(firsts.values())[:args.check]      # the first matrix of each shape
        print(f"[{arch}] {len(weights)} K/V matrices, {n_params / 1e6:.1f} M params, "
              f"{w_bytes / 2**20:.0f} MiB in fp16, context {d}", flush=True)

        # warm-up once (BLAS/cuBLAS/cuSOLVER initialisation), untimed
        concepts, preserve, s_p = build_features(d, 1, "last_word", seed=99)
        c_e = torch.cat([e for e, _ in concepts], 1).to(device)
        c_g = torch.cat([g for _, g in concepts], 1).to(device)
        c_p = torch.cat(preserve, 1).to(device)
        for name in solve_dtypes:
            warm = solve_ours(weights, c_e, c_g, c_p, s_p, DTYPES[name])
            del warm
        key0 = next(iter(weights))
        reference_matrix(weights[key0], [(e.to(device), g.to(device)) for e, g in concepts],
                         [c.to(device) for c in preserve], s_p)
        sync()

        for policy in policies:
            for n in counts:
                seed = 1000 * counts.index(n) + 7 * policies.index(policy) + (0 if arch == "sd15" else 500)
                concepts, preserve, s_p = build_features(d, n, policy, seed)
                concepts = [(e.to(device), g.to(device)) for e, g in concepts]
                preserve = [c.to(device) for c in preserve]
                c_e = torch.cat([e for e, _ in concepts], 1)
                c_g = torch.cat([g for _, g in concepts], 1)
                c_p = torch.cat(preserve, 1)
                n_e, n_p = c_e.shape[1], c_p.shape[1]

                ours, kept_edits = {}, {}
                for name in solve_dtypes:
                    dt = DTYPES[name]
                    best, runs, peak_, sampled_, edits = time_ours(
                        lambda: solve_ours(weights, c_e, c_g, c_p, s_p, dt), sync, device, args.rss_sampler)
                    ours[name] = (best, runs)
                    kept_edits[name] = {key: edits[key] for key in check_keys}
                    if name == solve_dtypes[0]:
                        peak, sampled = peak_, sampled_
                        kinds = {type(e).__name__.replace("Edit", "").lower() for e in edits.values()}
                        res_bytes = edits_bytes(edits)
                    del edits
                    gc.collect()

                t_ref, measured, k, n_mat, kept = time_reference(
                    weights, concepts, preserve, s_p, sync, budget, check_keys, args.ref_samples)

                # correctness on the kept matrices
                truth = truth_matrices(weights, list(kept), concepts, preserve, s_p, device)
                for name in solve_dtypes:
                    for key, W_ref in kept.items():
                        w16, edit = weights[key], kept_edits[name][key]
                        W_ours = ours_matrix(edit, w16).cpu()
                        W_o = w16.double().cpu()
                        T = truth[key].cpu()
                        checks.append((arch, policy, n, tuple(w16.shape), name, type(edit).__name__,
                                       float((T - W_o).norm() / W_o.norm()),
                                       rel_max(W_ours, W_ref), rel_max(W_ours, T), rel_max(W_ref, T),
                                       rel_max(T.half(), T),
                                       rel_fro(W_ours.double() - W_o, T - W_o), rel_fro(W_ref.double() - W_o, T - W_o)))
                del kept_edits, truth, kept
                gc.collect()
                if device.type == "cpu":
                    _malloc_trim()

                t_ours = ours[solve_dtypes[0]][0]
                rows.append((arch, policy, n, n_e, n_p, {k_: v[0] for k_, v in ours.items()}, t_ref, measured,
                             k, n_mat, t_ref / t_ours, "+".join(sorted(kinds))))
                mems.append((arch, policy, n, peak, sampled, res_bytes, w_bytes))
                ours_txt = "  ".join(f"ours[{k_}] {fmt_time(v[0])} (best of {v[1]})" for k_, v in ours.items())
                print(f"  {policy:16s} n={n:3d} cols E/P {n_e:5d}/{n_p:2d}: {ours_txt} | "
                      f"ref {'' if measured else '~'}{fmt_time(t_ref)} ({k}/{n_mat} matrices) | "
                      f"×{t_ref / t_ours:,.0f} | peak {peak / w_bytes:.2f}× weights", flush=True)
        del weights
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _malloc_trim()

    # ------------------------------------------------------------------ tables
    print()
    print("== Time: our solve (uce_factors + right_update_edits) vs the per-matrix reference ==")
    dt_cols = "".join(f" {'ours ' + k_:>15s}" for k_ in solve_dtypes)
    print(f"{'model':5s} {'policy':16s} {'n':>4s} {'E cols':>6s} {'P':>3s} {'edits':>13s}{dt_cols} "
          f"{'reference':>13s} {'ref matrices':>12s} {'ratio':>8s}")
    for arch, policy, n, n_e, n_p, t_ours, t_ref, measured, k, n_mat, ratio, kinds in rows:
        ours_txt = "".join(f" {fmt_time(t_ours[k_]):>15s}" for k_ in solve_dtypes)
        ref_txt = ("" if measured else "~") + fmt_time(t_ref).strip()
        print(f"{arch:5s} {policy:16s} {n:4d} {n_e:6d} {n_p:3d} {kinds:>13s}{ours_txt} {ref_txt:>13s} "
              f"{f'{k}/{n_mat}':>12s} {f'×{ratio:,.0f}':>8s}")
    print(f"  ratio = reference / ours[{solve_dtypes[0]}]")
    if any(not r[7] for r in rows):
        print("  ~ = extrapolated: the reference was timed on k of N matrices (a few of each shape) because the "
              f"full run was estimated above {budget:g} s; total = Σ_shape N_shape × median time.")

    print()
    print("== Correctness (a few matrices; truth = float64 mat1·mat2⁻¹ of the same formula) ==")
    print(f"{'model':5s} {'policy':16s} {'n':>4s} {'shape':>9s} {'solve':>7s} {'our edit':>11s} {'|ΔW|/|W|':>9s} "
          f"{'relW ours/ref':>13s} {'ours/truth':>10s} {'ref/truth':>9s} {'fp16 floor':>10s} "
          f"{'ΔW err ours':>11s} {'ΔW err ref':>10s}")
    for arch, policy, n, shape, name, kind, size, rw, rw_o, rw_r, floor, e_ours, e_ref in checks:
        print(f"{arch:5s} {policy:16s} {n:4d} {str(shape[0]) + '×' + str(shape[1]):>9s} {name:>7s} "
              f"{kind.replace('Edit', ''):>11s} {size:9.1e} {rw:13.2e} {rw_o:10.2e} {rw_r:9.2e} {floor:10.2e} "
              f"{e_ours:11.2e} {e_ref:10.2e}")
    print("  relW a/b = max|W_a − W_b| / max|W_b|. Low-rank edits are compared before rounding to fp16; dense "
          "edits are stored in fp16, so they cannot beat the fp16 rounding of W ('fp16 floor'). The reference "
          "inverts mat2 in float32, so 'ref/truth' is its own error.")
    print("  ΔW err = ‖ΔW − ΔW_truth‖_F / ‖ΔW_truth‖_F, ΔW = W_new − W_o.")

    print()
    print("== Peak memory of our solve (above what was held before it) relative to the K/V weights ==")
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "VmHWM (reset via /proc/self/clear_refs) of the first timed run" + \
        ("; RSS sampled every 2 ms in brackets" if args.rss_sampler else "") + \
        ("; glibc mmap threshold fixed at 128 KiB" if fixed_mmap else "; glibc default malloc settings")
    print(f"  measured by {how}; the result (edits) is kept, so it is part of the peak")
    print(f"{'model':5s} {'policy':16s} {'n':>4s} {'peak':>10s} {'ratio':>7s} {'sampled':>9s} {'result':>10s}")
    for arch, policy, n, peak, sampled, res, wb in mems:
        s = f"({sampled / wb:.2f}×)" if sampled is not None else ""
        print(f"{arch:5s} {policy:16s} {n:4d} {peak / 2**20:7.0f} MiB {peak / wb:6.2f}× {s:>9s} "
              f"{res / 2**20:6.0f} MiB")
    sdxl = [m for m in mems if m[0] == "sdxl"]
    if sdxl:
        worst = max(m[3] / m[6] for m in sdxl)
        print(f"  SDXL worst peak: {worst:.2f}× the K/V weights (target ≤ 1.5×) -> "
              f"{'OK' if worst <= 1.5 else 'OVER'}")
    if device.type == "cuda":
        sdxl_t = [r for r in rows if r[0] == "sdxl"]
        if sdxl_t:
            worst_t = max(r[5][solve_dtypes[0]] for r in sdxl_t)
            print(f"  SDXL slowest solve: {worst_t * 1e3:.1f} ms (target ≤ 50 ms) -> "
                  f"{'OK' if worst_t <= 0.05 else 'OVER'}")
    print(f"\nload avg at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
