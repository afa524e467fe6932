"""What every benchmark script shares: the common options, device set-up, timing, peak memory and the JSON
result file written beside the printed table.

    p = argparse.ArgumentParser(...); add_common_args(p)       # --device, --threads, --json
    device, hardware = setup_device(p, args)
    peak, sampled, seconds, result = measure_peak(fn, device)  # one run: its time and peak memory
    best, runs, peak, sampled, result = best_of(fn, device)    # best time of a few runs (the first gives the peak)
    write_json(args.json, "uce", device, hardware, time=rows)  # when --json PATH was given
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def add_common_args(parser: argparse.ArgumentParser, threads_help: str = "torch CPU threads (default: torch's)"):
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the result rows as JSON to PATH (replaced if it exists)")


def setup_device(parser: argparse.ArgumentParser, args) -> tuple[torch.device, str]:
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
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def malloc_trim():
    """Return freed heap memory to the system, so that RSS measures live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fix_mmap_threshold() -> bool:
    """Make glibc serve every allocation above 128 KiB with its own mmap (no dynamic threshold), so
    freed tensors leave RSS at once and the peak reflects live memory, not the heap's history.
    Under glibc's default dynamic threshold the per-matrix float32 temporaries end up in the heap,
    where small long-lived results split the freed holes: the same solve then peaks anywhere from
    0.15× to 1.8× the SDXL weights depending on what ran before (see bench_uce.py --default-malloc)."""
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
    malloc_trim()
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


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def best_of(fn, device: torch.device, sample_rss: bool = False, min_repeats: int = 3, max_seconds: float = 4.0):
    """Best of up to `min_repeats` runs of fn() (one when it already takes > max_seconds), each timed between
    device syncs. The first run also gives the peak memory and the result. Returns (best seconds, runs, peak,
    sampled peak, result)."""
    sync = make_sync(device)
    peak, sampled, first, result = measure_peak(fn, device, sample_rss)
    times = [first]
    while len(times) < min_repeats and sum(times) <= max_seconds:
        sync()
        t0 = time.perf_counter()
        again = fn()
        sync()
        times.append(time.perf_counter() - t0)
        del again
    return min(times), len(times), peak, sampled, result


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def write_json(path: Path | None, benchmark: str, device: torch.device, hardware: str, **tables) -> None:
    """Write `tables` (name → list of row dicts, the figures of the printed tables in SI units: seconds,
    bytes) with the run's context to `path`, through a temporary file renamed into place; nothing when
    `path` is None."""
    if path is None:
        return
    document = {
        "benchmark": benchmark,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "torch": torch.__version__,
        "device": str(device),
        "hardware": hardware,
        "cpu_threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tables": tables,
    }
    text = json.dumps(document, indent=1, default=str, ensure_ascii=False)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets: a result file gets the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"results written to {path}")
