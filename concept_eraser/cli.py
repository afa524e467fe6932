"""Command line: ``python -m concept_eraser erase|inspect|apply|demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from . import __version__, presets
from .api import erase
from .checkpoint import (FORMATS, META_PREFIX, CheckpointModel, check_patch_fits, load_patch, resolve_device,
                         save_artifacts, save_checkpoint, save_lora, save_patch)
from .concepts import Concepts
from .errors import EraserError, InvalidParameterError
from .expansion import describe_expansion
from .methods import METHODS
from .params import parse_assignments
from .safetensors_io import SafetensorsReader, check_writable, read_metadata_json


def _method_help() -> str:
    lines = []
    for method in METHODS.values():
        lines.append(f"{method.name}: {method.summary}")
        for p in method.params:
            default = "rule in help" if p.default is None else p.default
            lines.append(f"    {p.name} (default {default}; {p.describe_range()}): {p.help}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser", description="Erase concepts from Stable "
                                     "Diffusion checkpoints by editing their weights.")
    parser.add_argument("--version", action="version", version=f"concept_eraser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("erase", help="erase concepts from a checkpoint into a new file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="methods and their --set parameters:\n" + _method_help())
    e.add_argument("model", help="input checkpoint (.safetensors; SD1.x, SD2.x or SDXL)")
    e.add_argument("--method", default="uce", help=f"one of {', '.join(METHODS)} (default uce)")
    e.add_argument("--erase", action="append", default=[], metavar="TEXT", help="concept to erase (repeatable)")
    e.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help=f"erase a shipped list of wordings too (repeatable): {', '.join(presets.names())}")
    e.add_argument("--guide", action="append", default=[], metavar="TEXT",
                   help="what each erased concept becomes: one for all, or one per --erase (default: empty prompt)")
    e.add_argument("--preserve", action="append", default=[], metavar="TEXT", help="concept to keep (repeatable)")
    e.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method parameter (repeatable)")
    e.add_argument("--expand", metavar="N|off", help="also erase up to N wordings per concept that the model treats "
                   "like it (the `expand` parameter; default off); the added wordings are printed")
    e.add_argument("--expand-exclude", action="append", default=[], metavar="TEXT",
                   help="a wording the expansion must not add (repeatable)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.add_argument("--format", default="checkpoint", choices=FORMATS,
                   help="checkpoint: the whole model; patch: only the changed tensors; lora: a LoRA file")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    e.add_argument("--report", help="write the report as JSON to this file")
    e.add_argument("--save-prompt", metavar="FILE", help="kpop: also write the learned prompt (.safetensors); it "
                   "re-enables the erased concept, so keep it private")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")

    i = sub.add_parser("inspect", help="architecture, cross-attention layers and erasure provenance of a file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print JSON")

    a = sub.add_parser("apply", help="apply a patch file to a checkpoint")
    a.add_argument("model")
    a.add_argument("patch")
    a.add_argument("--out", required=True)
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--force", action="store_true", help="apply even if the patch was made for another checkpoint")

    d = sub.add_parser("demo", help="erase 'circle' from the bundled ToyWorld model, judge samples before and after, "
                                     "write a preview grid (no download)")
    d.add_argument("--out-dir", default="concept-eraser-demo")
    return parser


def _save(model: CheckpointModel, patch, fmt: str, out: Path, overwrite: bool) -> Path:
    if fmt == "checkpoint":
        return save_checkpoint(model, patch, out, overwrite)
    if fmt == "patch":
        return save_patch(patch, out, overwrite)
    return save_lora(patch, out, overwrite, arch=model.arch)


def _progress(done: int, total: int, message: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{message}: {done}/{total}   ", end="" if done < total else "\n", file=sys.stderr, flush=True)


def cmd_erase(args) -> int:
    # Check everything cheap before any heavy work, so bad input fails at once and writes nothing.
    out = check_writable(args.out, args.overwrite, "--out")
    report_path = check_writable_json(args.report, args.overwrite) if args.report else None
    prompt_path = check_writable(args.save_prompt, args.overwrite, "--save-prompt") if args.save_prompt else None
    concepts = Concepts.build(args.erase + [w for name in args.preset for w in presets.load(name)
                                            if w not in args.erase], args.guide, args.preserve)
    params = parse_assignments(args.set)
    if args.expand is not None:
        params["expand"] = "0" if args.expand.strip().lower() == "off" else args.expand
    if args.expand_exclude:
        params["expand_exclude"] = ", ".join([params.get("expand_exclude", ""), *args.expand_exclude]).strip(", ")
    model = CheckpointModel(args.model, resolve_device(args.device))
    print(f"{model.path.name}: {model.arch.describe()}")
    result = erase(model, args.method, concepts, params, _progress)
    if prompt_path and not result.artifacts:
        raise InvalidParameterError("--save-prompt", f"method {args.method} learned no prompt to save")
    start = time.perf_counter()
    written = _save(model, result.patch, args.format, out, args.overwrite)
    report = dict(result.report, output={"path": str(written), "format": args.format,
                                          "bytes": written.stat().st_size,
                                          "seconds": round(time.perf_counter() - start, 3)})
    if "expansion" in report:
        print(describe_expansion(report["expansion"]))
    changes = [v["relative_change"] for v in report["layers"].values()]
    print(f"erased {', '.join(concepts.targets)} with {args.method} in {report['seconds']:.2f} s: "
          f"{len(changes)} matrices changed, relative change mean {sum(changes) / len(changes):.4f}, "
          f"max {max(changes):.4f}")
    print(f"wrote {written} ({args.format}, {written.stat().st_size / 1e6:.1f} MB)")
    if prompt_path:
        print(f"wrote {save_artifacts(result.artifacts, result.report, prompt_path, args.overwrite)} (learned prompt)")
    if report_path:
        report_path.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {report_path}")
    return 0


def check_writable_json(path: str, overwrite: bool) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise InvalidParameterError("--report", f"the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise InvalidParameterError("--report", f"{path} already exists; choose another name or pass --overwrite")
    return path


def describe_file(path: str) -> dict:
    reader = SafetensorsReader(path)
    meta = reader.metadata
    info: dict = {"file": reader.path.name, "bytes": reader.path.stat().st_size}
    fmt = meta.get(META_PREFIX + "format")
    if fmt in ("patch", "lora"):
        info["kind"] = fmt
        info["architecture"] = meta.get(META_PREFIX + "architecture")
        info["tensors"] = len(reader.keys())
        if fmt == "patch":
            info["edits"] = read_metadata_json(meta, META_PREFIX + "edits", {})
    elif fmt == "learned_prompt":
        info.update(kind=fmt, method=meta.get(META_PREFIX + "method"),
                    architecture=meta.get(META_PREFIX + "architecture"),
                    concepts=read_metadata_json(meta, META_PREFIX + "concepts", {}),
                    layers=read_metadata_json(meta, META_PREFIX + "layers", []),
                    tokens={k: list(reader.infos[k].shape) for k in reader.keys()})
    else:
        model = CheckpointModel(path)
        arch = model.arch
        info.update(kind="checkpoint", architecture=arch.family, title=arch.title, variant=arch.variant,
                    context_dim=arch.context_dim, summary=arch.describe(),
                    cross_attention={k: list(reader.infos[k].shape) for k in arch.kv_keys},
                    text_encoders=[{"name": e.name, "layout": e.layout, "width": e.width, "layers": e.layers,
                                    "features": ("penultimate" if e.hidden_layer == -2 else "last") + " layer" +
                                    (", final norm" if e.final_norm else "")} for e in arch.encoders],
                    dtypes=sorted({str(reader.infos[k].dtype).replace("torch.", "") for k in arch.kv_keys}))
    info["erasures"] = read_metadata_json(meta, META_PREFIX + "steps", [])
    return info


def cmd_inspect(args) -> int:
    info = describe_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['kind']}, {info['architecture']}")
    if info["kind"] == "checkpoint":
        print(info["summary"])
        print(f"K/V dtype: {', '.join(info['dtypes'])}")
        for key, shape in info["cross_attention"].items():
            print(f"  {key}  {shape[0]}×{shape[1]}")
    elif "edits" in info:
        print(f"{len(info['edits'])} edited tensors")
    elif info["kind"] == "learned_prompt":
        print(f"{info['method']} prompt for {', '.join(info['concepts'].get('erase', []))}: tokens "
              f"{info['tokens']}, read by {len(info['layers'])} cross-attention K/V matrices; it re-enables "
              "the erased concept")
    if not info["erasures"]:
        print("no erasure recorded")
    for n, step in enumerate(info["erasures"], 1):
        print(f"erasure {n}: {step.get('method')} of {', '.join(step.get('concepts', {}).get('erase', []))} "
              f"on {step.get('source', {}).get('name')} ({step.get('created')}), params {step.get('params')}")
        results = dict(step.get("results", {}))
        for target, figures in results.pop("probe", {}).items():
            print(f"  recoverability of {target!r} (see concept_eraser.probe): residual {figures['residual']:.3f}, "
                  f"cosine {figures['cosine']:.3f} (residual 0 / cosine 1 = fully recoverable)")
        if results:
            print(f"  results: {json.dumps(results)}")
    return 0


def cmd_apply(args) -> int:
    out = check_writable(args.out, args.overwrite, "--out")
    model = CheckpointModel(args.model)
    patch = load_patch(args.patch)
    check_patch_fits(model, patch, args.force)
    written = save_checkpoint(model, patch, out, args.overwrite)
    print(f"applied {len(patch.edits)} edited tensors; wrote {written}")
    return 0


def cmd_demo(args) -> int:
    from .toyworld import demo

    return demo.run(Path(args.out_dir), main)


COMMANDS = {"erase": cmd_erase, "inspect": cmd_inspect, "apply": cmd_apply, "demo": cmd_demo}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return COMMANDS[args.command](args)
    except EraserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
