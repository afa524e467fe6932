"""Command line: ``python -m concept_eraser erase|inspect|apply|demo``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import __version__, presets
from .api import erase
from .checkpoint import (
    FORMATS,
    META_PREFIX,
    CheckpointModel,
    load_patch,
    read_steps,
    resolve_device,
    save_checkpoint,
    save_erasure,
    step_problem,
)
from .concepts import Concepts
from .errors import EraserError, InvalidParameterError, NonFiniteResultError
from .expansion import describe_expansion
from .methods import METHODS, get_method
from .models.arch import ENCODER_OPTIONS, is_text_encoder_key
from .params import parse_assignments, resolve
from .patch import ErasurePatch, check_fits
from .safetensors_io import SafetensorsReader, check_writable, read_metadata_json, write_json
from .tokenizer import T5_TOKENIZER_HINT, use_t5_tokenizer


def _method_help() -> str:
    lines = []
    for method in METHODS.values():
        lines.append(f"{method.name}: {method.summary}")
        for p in method.params:
            default = "auto" if p.default is None else "empty" if p.default == "" else p.default
            lines.append(f"    {p.name} (default {default}; {p.describe_range()}): {p.help}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser", description="Erase concepts from Stable "
                                     "Diffusion, Flux.1 and SD3 checkpoints by editing their weights.")
    parser.add_argument("--version", action="version", version=f"concept_eraser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("erase", help="erase concepts from a checkpoint into a new file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="methods and their --set parameters:\n" + _method_help())
    e.add_argument("model", help="input checkpoint (.safetensors; SD1.x, SD2.x, SDXL, Flux.1 dev/schnell, SD3/3.5)")
    add_text_encoder_options(e)
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
    e.add_argument("--format", default="checkpoint", choices=[f for f in FORMATS if f != "learned_prompt"],
                   help="checkpoint: the whole model; patch: only the changed tensors; lora: a LoRA file")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    e.add_argument("--report", help="write the report as JSON to this file")
    e.add_argument("--save-prompt", metavar="FILE", help="kpop: also write the learned prompt (.safetensors); it "
                   "re-enables the erased concept, so keep it private")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")

    i = sub.add_parser("inspect", help="architecture, text-conditioning maps and erasure provenance of a file")
    i.add_argument("file")
    add_text_encoder_options(i, tokenizer=False)
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


def add_text_encoder_options(parser: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    group = parser.add_argument_group("text encoders in files of their own (Flux.1, SD3; as ComfyUI's "
                                      "models/text_encoders holds them)")
    group.add_argument("--clip-l", metavar="FILE", help="CLIP-L (clip_l.safetensors): Flux, SD3")
    group.add_argument("--clip-g", metavar="FILE", help="CLIP-G (clip_g.safetensors): SD3")
    group.add_argument("--t5", metavar="FILE", help="T5-XXL (t5xxl_fp16.safetensors, ...): Flux, SD3")
    if tokenizer:
        group.add_argument("--t5-tokenizer", metavar="FILE", help="T5's tokenizer.json, needed wherever T5 is (no "
                           "download: e.g. ComfyUI's comfy/text_encoders/t5_tokenizer/tokenizer.json)")


def encoder_files(args) -> dict[str, str]:
    """option → file of the text-encoder options given."""
    given = {option: getattr(args, option[2:].replace("-", "_"), None) for option in ENCODER_OPTIONS.values()}
    return {option: file for option, file in given.items() if file}


def input_files(args, **more: str) -> dict[str, str]:
    """field → file of every input given: the model, `more`, the text-encoder files and T5's tokenizer."""
    tokenizer = {"--t5-tokenizer": args.t5_tokenizer} if getattr(args, "t5_tokenizer", None) else {}
    return {"model": args.model, **more, **encoder_files(args), **tokenizer}


def open_model(args, path: str, device="cpu", text: bool = True) -> CheckpointModel:
    """The model file with the text-encoder files its options give (errors about a file name its option); `text`
    False: a Flux / SD3 file may come without them (`apply`, `inspect`)."""
    slots = {option: slot for slot, option in ENCODER_OPTIONS.items()}
    given = {slots[option]: file for option, file in encoder_files(args).items()}
    with blame("model"):
        model = CheckpointModel(path, device, text_encoders=given, encoder_fields=ENCODER_OPTIONS, text=text)
    if getattr(args, "t5_tokenizer", None):
        use_t5_tokenizer(args.t5_tokenizer, "--t5-tokenizer")
    elif hasattr(args, "t5_tokenizer") and any(e.tokenizer == "t5" for e in model.arch.encoders):
        raise InvalidParameterError("--t5-tokenizer",
                                    f"{model.arch.title} reads prompts through T5: {T5_TOKENIZER_HINT}")
    return model


def _progress(done: int, total: int, message: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{message}: {done}/{total}   ", end="" if done < total else "\n", file=sys.stderr, flush=True)


@contextmanager
def blame(field: str, nonfinite: str | None = None):
    """Errors that name no field (an unreadable file, an unsupported model, a non-finite result) are about
    `field` (non-finite results: about `nonfinite`, where given)."""
    try:
        yield
    except InvalidParameterError:
        raise
    except EraserError as exc:
        at_fault = nonfinite if nonfinite and isinstance(exc, NonFiniteResultError) else field
        raise InvalidParameterError(at_fault, str(exc)) from None


def same_file(a: str, b: str) -> bool:
    """The same file, through symbolic links, hard links or spelling (`a` or `b` may not exist yet)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct(inputs: dict[str, str], outputs: dict[str, str | None]) -> None:
    """Refuse an output that is an input or another output, before any work (with --overwrite too)."""
    seen = list(inputs.items())
    for field, path in outputs.items():
        if path is None:
            continue
        for other_field, other in seen:
            if same_file(path, other):
                what = f"the input {other_field}" if other_field in inputs else f"also given as {other_field}"
                raise InvalidParameterError(field, f"{path} is {what}; choose another name")
        seen.append((field, path))


def cmd_erase(args) -> int:
    # Check everything cheap before any heavy work, so bad input fails at once and writes nothing.
    check_distinct(input_files(args), {"--out": args.out, "--report": args.report, "--save-prompt": args.save_prompt})
    whole = os.path.getsize(args.model) if args.format == "checkpoint" and os.path.isfile(args.model) else 0
    out = check_writable(args.out, args.overwrite, "--out", size=whole)
    if args.report:
        check_writable(args.report, args.overwrite, "--report", suffix=None)
    if args.save_prompt:
        check_writable(args.save_prompt, args.overwrite, "--save-prompt")
    concepts = Concepts.build(args.erase + [w for name in args.preset for w in presets.load(name)
                                            if w not in args.erase], args.guide, args.preserve)
    params = parse_assignments(args.set)
    if args.expand is not None:
        params["expand"] = "0" if args.expand.strip().lower() == "off" else args.expand
    if args.expand_exclude:
        params["expand_exclude"] = ", ".join([params.get("expand_exclude", ""), *args.expand_exclude]).strip(", ")
    method = get_method(args.method)
    if args.save_prompt and not resolve(method.params, params, method.name).get("use_prompt"):
        raise InvalidParameterError("--save-prompt", f"method {method.name} learns no prompt to save"
                                    + (" with use_prompt off" if "use_prompt" in params else ""))
    model = open_model(args, args.model, resolve_device(args.device))
    print(f"{model.path.name}: {model.arch.describe()}")
    with blame("model", nonfinite="result"):
        result = erase(model, args.method, concepts, params, _progress)
    start = time.perf_counter()
    with blame("model", nonfinite="result"):
        written = save_erasure(args.format, out, result.patch, model.arch, solved_on=model.weight,
                               checkpoint=lambda path: save_checkpoint(model, result.patch, path, args.overwrite,
                                                                       field="--out"),
                               overwrite=args.overwrite, field="--out")
    report = dict(result.report, output={"path": str(written), "format": args.format,
                                          "bytes": written.stat().st_size,
                                          "seconds": round(time.perf_counter() - start, 3)})
    if "expansion" in report:
        print(describe_expansion(report["expansion"]))
    changes = [v["relative_change"] for v in report["layers"].values()]
    print(f"erased {', '.join(concepts.targets)} with {args.method} in {report['seconds']:.2f} s: "
          f"{sum(c > 0 for c in changes)} matrices changed, relative change mean {sum(changes) / len(changes):.4f}, "
          f"max {max(changes):.4f}")
    print(f"wrote {written} ({args.format}, {written.stat().st_size / 1e6:.1f} MB)")
    if args.save_prompt:
        saved = save_erasure("learned_prompt", args.save_prompt, result.patch, model.arch, artifacts=result.artifacts,
                             report=result.report, overwrite=args.overwrite, field="--save-prompt")
        print(f"wrote {saved} (learned prompt)")
    if args.report:
        print(f"wrote {write_json(args.report, report, args.overwrite, field='--report')}")
    return 0


def describe_file(path: str, field: str = "file", args=None) -> dict:
    """What `inspect` shows of a file (`args`: the command line's text-encoder options, where given)."""
    with blame(field):
        reader = SafetensorsReader(path, field)
        meta = reader.metadata
        info: dict = {"file": reader.path.name, "bytes": reader.path.stat().st_size}
        fmt = meta.get(META_PREFIX + "format")
        if fmt in ("patch", "lora"):
            info["kind"] = fmt
            info["architecture"] = meta.get(META_PREFIX + "architecture")
            info["tensors"] = len(reader.keys())
            if fmt == "patch":  # read whole, so that inspect refuses what apply would refuse
                info["edits"] = {key: [s.kind for s in stages] for key, stages in load_patch(path, field).edits.items()}
        elif fmt == "learned_prompt":
            concepts = read_metadata_json(meta, META_PREFIX + "concepts", {}, field)
            problem = step_problem({"concepts": concepts})
            if problem:
                raise InvalidParameterError(field, f"its metadata {META_PREFIX}concepts {problem}")
            info.update(kind=fmt, method=meta.get(META_PREFIX + "method"),
                        architecture=meta.get(META_PREFIX + "architecture"), concepts=concepts,
                        layers=read_metadata_json(meta, META_PREFIX + "layers", [], field),
                        tokens={k: list(reader.infos[k].shape) for k in reader.keys()})
        else:
            model = open_model(args, path, text=False) if args else CheckpointModel(path, text=False)
            arch = model.arch
            info.update(kind="checkpoint", architecture=arch.family, title=arch.title, variant=arch.variant,
                        context_dim=arch.context_dim, summary=arch.describe(),
                        maps={m.key: {"shape": list(m.shape), "reads": m.reads} for m in arch.maps},
                        text_encoders=[{"name": e.name, "layout": e.layout, "width": e.width, "layers": e.layers,
                                        "features": ("penultimate" if e.hidden_layer == -2 else "last") + " layer" +
                                        (", final norm" if e.final_norm else "")} for e in arch.encoders],
                        dtypes=sorted({str(reader.infos[m.key].dtype).replace("torch.", "") for m in arch.maps}))
        info["erasures"] = list(read_steps(meta, field))
    return info


def cmd_inspect(args) -> int:
    info = describe_file(args.file, args=args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['kind']}, {info['architecture']}")
    if info["kind"] == "checkpoint":
        print(info["summary"])
        print(f"text-conditioning maps' dtype: {', '.join(info['dtypes'])}")
        for key, m in info["maps"].items():
            print(f"  {key}  {m['shape'][0]}×{m['shape'][1]}  reads {m['reads']}")
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
        if "applied" in step:
            print(f"  applied as a patch to {step['applied'].get('to', {}).get('name')}"
                  + (" with --force (made for another checkpoint)" if step["applied"].get("forced") else ""))
        results = dict(step.get("results", {}))
        for target, figures in results.pop("probe", {}).items():
            print(f"  recoverability of {target!r} (see concept_eraser.probe): residual {figures['residual']:.3f}, "
                  f"cosine {figures['cosine']:.3f} (residual 0 / cosine 1 = fully recoverable)")
        if results:
            print(f"  results: {json.dumps(results)}")
    return 0


def cmd_apply(args) -> int:
    check_distinct(input_files(args, patch=args.patch), {"--out": args.out})
    whole = os.path.getsize(args.model) if os.path.isfile(args.model) else 0
    out = check_writable(args.out, args.overwrite, "--out", size=whole)
    model = open_model(args, args.model, text=False)
    with blame("patch"):
        patch = load_patch(args.patch).in_layout(model.arch)
        outside = next((k for k in patch.edits if is_text_encoder_key(k) and k not in model.reader), None)
        if outside:  # ErasePro on a Flux / SD3 file whose encoders are files of their own: no file to write them to
            raise InvalidParameterError(
                "patch", f"the patch edits {outside}, a text encoder, which this model file does not hold: `apply` "
                "writes the model file alone (text encoders in files of their own are only read); erase again with "
                "--format lora, a LoRA that ComfyUI's LoRA loader applies to the model and its CLIP")
        check_fits(patch, model.arch, model.weight,
                   lambda key: model.reader.infos[key].shape if key in model.reader else None, args.force, "patch",
                   "pass --force")
        # Provenance: the steps were solved on the patch's source; record what they were applied to, and the force.
        applied = {"to": model.source(), "forced": bool(args.force)}
        patch = ErasurePatch(patch.architecture, patch.edits, tuple(dict(s, applied=applied) for s in patch.steps))
        written = save_checkpoint(model, patch, out, args.overwrite, field="--out")
    print(f"applied {len(patch.edits)} edited tensors; wrote {written}")
    return 0


def cmd_demo(args) -> int:
    from .toyworld import demo

    folder = Path(args.out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidParameterError("--out-dir", f"cannot create the folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidParameterError("--out-dir", f"the folder {folder} is not writable")
    return demo.run(folder, main)


COMMANDS = {"erase": cmd_erase, "inspect": cmd_inspect, "apply": cmd_apply, "demo": cmd_demo}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the exception unwinds through the writers, which remove their partial files."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
    raise Terminated


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per run (a prompt is tokenized more than once)
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return COMMANDS[args.command](args)
    except EraserError as exc:
        field = getattr(exc, "field", None)
        print(f"error: {exc}" if field else f"error: {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system failure not foreseen by the checks (they name the field)
        print(f"error: {exc.filename or args.command}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated; no partial file was left", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; no partial file was left", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
