#!/usr/bin/env python
"""End-to-end benchmark: the command line, one process per method, on real-size SD1.5 and SDXL checkpoints.

Not a test: it prints figures. The checkpoints are `synthetic.write_model`'s seeded random fp16
files with real-size text encoders (SD1.5: CLIP ViT-L; SDXL: CLIP ViT-L + OpenCLIP bigG) and the real
cross-attention K/V (the rest of the U-Net left out: no method here reads it). Each run is

    python -m concept_eraser erase MODEL --method M --erase "Van Gogh" --erase "Claude Monet"
        --preserve "a photo" --format patch --out ... --report ... --device DEVICE

and the table gives, per family and method: the method time the report records (`seconds`: the method
alone, text encoders included, not the probe, the report figures or writing), and the whole process
(start-up, imports, reading, the method, the recoverability probe, the per-layer figures, writing the
patch). For scale it also gives the start-up alone (the same command refused at once because --out
exists: interpreter, imports, argument checks) and the time to read every tensor of the file through
safetensors onto the device in one process (`read file`, imports excluded).

    python benchmarks/bench_end_to_end.py [--device cpu|cuda] [--quick] [--json PATH] [--baseline DIR]

--baseline DIR runs every command a second time with DIR (another checkout of the project) first on
PYTHONPATH, alternating with this one, and prints the before/after ratio: figures from the same run,
so that the machine's load affects both alike. --quick uses tiny text encoders (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from harness import add_common_args, write_json  # noqa: E402
from safetensors import safe_open  # noqa: E402
from synthetic import write_model  # noqa: E402

CONCEPTS = ["--erase", "Van Gogh", "--erase", "Claude Monet", "--preserve", "a photo"]
METHOD_PARAMS = {"space": ["--set", "iterations=50"]}  # SPACE to convergence takes minutes on a CPU: 50 iterations


def run_cli(root: Path, model: Path, method: str, out_dir: Path, device: str, threads: int | None) -> dict:
    """One `erase` process with `root` first on PYTHONPATH: {"process": s, "method": s} (None when it failed)."""
    out, report = out_dir / f"{method}.safetensors", out_dir / f"{method}.json"
    for stale in (out, report):
        stale.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "concept_eraser", "erase", str(model), "--method", method, *CONCEPTS,
               *METHOD_PARAMS.get(method, []), "--format", "patch", "--out", str(out), "--report", str(report),
               "--device", device]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=out_dir, capture_output=True, text=True, check=False)
    process = time.perf_counter() - start
    if done.returncode != 0:
        print(f"    {method} failed ({root}):\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"process": None, "method": None}
    return {"process": process, "method": json.loads(report.read_text())["seconds"]}


def start_up(root: Path, model: Path, out_dir: Path, device: str) -> float:
    """The same command refused at once (its --out exists): interpreter, imports, argument checks."""
    taken = out_dir / "exists.safetensors"
    taken.write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "concept_eraser", "erase", str(model), *CONCEPTS, "--out", str(taken),
                    "--device", device], env=env, cwd=out_dir, capture_output=True, check=False)
    return time.perf_counter() - start


def read_seconds(model: Path, device: str) -> float:
    """Every tensor of the file read through safetensors onto `device` (the page cache is warm)."""
    start = time.perf_counter()
    with safe_open(str(model), framework="pt", device="cpu") as f:
        for key in f.keys():
            f.get_tensor(key).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def fmt(x: float | None) -> str:
    return "failed" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, threads_help="OMP_NUM_THREADS of the runs (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny text encoders: a smoke test of this script")
    p.add_argument("--families", default="sd15,sdxl", help="comma list of sd15, sdxl")
    p.add_argument("--methods", default="uce,rece,erasepro", help="comma list (space runs 50 iterations)")
    p.add_argument("--baseline", type=Path, help="another checkout: run it too, alternating, and print ratios")
    p.add_argument("--models", type=Path, help="folder for the generated checkpoints (kept; reused when present)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    hardware = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"End-to-end benchmark — torch {torch.__version__}, {args.device} ({hardware}{load}); "
          f"{'tiny (--quick)' if args.quick else 'real-size'} text encoders, fp16 checkpoints, --format patch")
    roots = [("new", ROOT)] + ([("old", args.baseline.resolve())] if args.baseline else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        models = args.models or Path(scratch)
        models.mkdir(parents=True, exist_ok=True)
        for family in args.families.split(","):
            path = models / f"{family}.safetensors"
            start = time.perf_counter()
            if not path.exists() or args.quick:
                write_model(models, family, args.quick)
            size = path.stat().st_size
            read = read_seconds(path, args.device)
            print(f"\n{family}: {size / 1e9:.2f} GB (ready in {time.perf_counter() - start:.0f} s), read in "
                  f"{read:.2f} s", flush=True)
            boot = {label: start_up(root, path, Path(scratch), args.device) for label, root in roots}
            for method in args.methods.split(","):
                figures = {}
                for label, root in roots:
                    out_dir = Path(scratch) / label
                    out_dir.mkdir(exist_ok=True)
                    figures[label] = run_cli(root, path, method, out_dir, args.device, args.threads)
                    print(f"  {method:9s} {label}: method {fmt(figures[label]['method'])} s, process "
                          f"{fmt(figures[label]['process'])} s", flush=True)
                rows.append((family, method, read, boot, figures))

    labels = [label for label, _ in roots]
    head = f"{'model':5s} {'method':9s} {'read file':>9s}"
    for label in labels:
        head += f" {'start-up ' + label:>12s} {'method ' + label:>11s} {'process ' + label:>12s}"
    if args.baseline:
        head += f" {'method old/new':>15s} {'process old/new':>16s}"
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    print(f"\n== command line, one process per run (seconds; {args.device}, {hardware}{load}) ==")
    print(head)
    for family, method, read, boot, figures in rows:
        line = f"{family:5s} {method:9s} {read:9.2f}"
        for label in labels:
            line += f" {boot[label]:12.2f} {fmt(figures[label]['method']):>11s} {fmt(figures[label]['process']):>12s}"
        if args.baseline:
            new, old = figures["new"], figures["old"]
            for part, width in (("method", 15), ("process", 16)):
                ratio = old[part] / new[part] if old[part] and new[part] else None
                line += f" {'—' if ratio is None else f'×{ratio:.2f}':>{width}s}"
        print(line)
    print("  method: the report's `seconds` (the method alone); process: the whole command; start-up: the command "
          "refused at once (imports); read file: every tensor through safetensors onto the device.")
    write_json(args.json, "end_to_end", torch.device(args.device), hardware,
               runs=[{"model": family, "method": method, "read_file_seconds": read,
                      **{f"{part}_seconds_{label}": (boot[label] if part == "start_up" else figures[label][part])
                         for label in labels for part in ("start_up", "method", "process")}}
                     for family, method, read, boot, figures in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
