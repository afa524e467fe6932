"""A checkpoint file as an editable model, and writing erasures out as checkpoint, patch or LoRA."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Mapping

import torch

from .denoiser import ModuleDenoiser, ldm_inputs, sd_alphas_cumprod, training_size
from .encoding import CheckpointTextEncoder
from .errors import EraserError, InvalidParameterError, UnsupportedModelError
from .models.arch import ENCODER_PREFIXES, FAMILIES, UNET_PREFIX, ArchSpec, detect, is_text_encoder_key
from .models.text_encoders import hf_state_dict
from .patch import FINGERPRINT_SIZE, ErasurePatch, check_written_finite, edit_from_parts
from .safetensors_io import LazyTensor, SafetensorsReader, read_metadata_json, write_safetensors

# What an erasure can be saved as (`save_erasure`); learned_prompt is KPOP's prompt, not the erasure itself.
FORMATS = ("checkpoint", "patch", "lora", "learned_prompt")
META_PREFIX = "concept_eraser."


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device", "cuda was asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise InvalidParameterError("device", f"{name!r} is not auto, cpu or cuda")
    return torch.device(name)


class CheckpointModel:
    """A single-file checkpoint read lazily through safetensors: SD1.x / SD2.x / SDXL, or Flux.1 / SD3 whose text
    encoders are in the file or in `text_encoders`, files of their own by slot ("clip_l", "clip_g", "t5xxl").
    Those are mounted under the names an all-in-one file gives them (`ENCODER_PREFIXES`); only the model file's
    own tensors are ever written (`save_checkpoint`). `encoder_fields` names each slot in error messages. `text`
    False: a Flux / SD3 file may come without its text encoders (to apply or inspect an edit of its maps)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 text_encoders: Mapping[str, str | os.PathLike] | None = None,
                 encoder_fields: Mapping[str, str] | None = None, text: bool = True):
        self.reader = SafetensorsReader(path)
        self.path = self.reader.path
        self.device = torch.device(device)
        self.mounted: dict[str, SafetensorsReader] = {}  # key prefix → the text-encoder file served under it
        for slot, file in (text_encoders or {}).items():
            field = (encoder_fields or {}).get(slot, slot)
            if slot not in ENCODER_PREFIXES:
                raise InvalidParameterError(field, f"{slot!r} is not a text-encoder slot "
                                            f"({', '.join(ENCODER_PREFIXES)})")
            prefix = ENCODER_PREFIXES[slot]
            if any(k.startswith(prefix) for k in self.reader.keys()):
                raise InvalidParameterError(field, f"{self.path.name} already holds a {slot} text encoder "
                                            f"({prefix}*); give no other")
            reader = SafetensorsReader(file, field)
            if "scaled_fp8" in reader:
                raise InvalidParameterError(field, f"{reader.path.name} is a scaled-fp8 file (its weights need "
                                            "per-tensor scales); use an fp16, bf16 or plain fp8 file of this encoder")
            self.mounted[prefix] = reader
        shapes = {k: i.shape for k, i in self.reader.infos.items()}
        for prefix, reader in self.mounted.items():
            shapes |= {prefix + k: i.shape for k, i in reader.infos.items()}
        fields = {slot: (encoder_fields or {}).get(slot, slot) for slot in text_encoders or {}}
        try:
            self.arch: ArchSpec = detect(shapes, self.reader.metadata, text=text or bool(text_encoders))
        except UnsupportedModelError as exc:
            if exc.slot in fields:  # the fault is in an encoder file given, not in the model file
                raise InvalidParameterError(fields[exc.slot], str(exc)) from None
            raise
        for slot, field in fields.items():
            if not any(e.prefix.startswith(ENCODER_PREFIXES[slot]) for e in self.arch.encoders):
                raise InvalidParameterError(field, f"{self.arch.title} reads no {slot} text encoder; leave it out")
        self._text_encoder: CheckpointTextEncoder | None = None
        # The provenance digest reads the whole file (SDXL: 2-7 s): a background thread reads it while the
        # method works, instead of on its path. Daemon: a process that never asks for it need not wait.
        self._sha256: Future[str] = Future()
        threading.Thread(target=self._hash, name=f"sha256 {self.path.name}", daemon=True).start()
        if self.device.type == "cuda":  # start the driver (1-2 s) now, not inside the method's first copy
            threading.Thread(target=torch.cuda.init, name="cuda init", daemon=True).start()

    def _hash(self) -> None:
        try:
            self._sha256.set_result(self.reader.sha256())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the digest
            self._sha256.set_exception(exc)

    def sha256(self) -> str:
        """SHA-256 of the whole file, as read by the background thread."""
        return self._sha256.result()

    @property
    def text_encoder(self) -> CheckpointTextEncoder:
        if self._text_encoder is None:
            self._text_encoder = CheckpointTextEncoder(self.arch, self.keys(), self.weight, self.device)
        return self._text_encoder

    def weight(self, key: str) -> torch.Tensor:
        for prefix, reader in self.mounted.items():
            if key.startswith(prefix):
                return reader.get(key[len(prefix):]).to(self.device)
        return self.reader.get(key).to(self.device)

    def keys(self) -> list[str]:
        return self.reader.keys() + [prefix + k for prefix, reader in self.mounted.items() for k in reader.keys()]

    def source(self) -> dict:
        source = {"name": self.path.name, "sha256": self.sha256()}
        if self.mounted:
            source["text_encoders"] = {prefix.split(".")[1]: reader.path.name
                                       for prefix, reader in self.mounted.items()}
        return source

    def prior_steps(self) -> tuple[dict, ...]:
        return read_steps(self.reader.metadata, "model")

    def denoiser(self, resolution: int | None = None) -> ModuleDenoiser:
        """The file's U-Net rebuilt from its own weights (`models.unet`), for gradient methods: float32 on
        the CPU, float16 on CUDA; latents of `resolution` pixels (default: the model's native size)."""
        from .models.unet import LDMUNet, config_from_shapes
        from .toyworld import diffusion as toy_diffusion
        from .toyworld.unet import ToyUNet, UNetConfig

        if self.arch.denoiser != "unet":
            raise UnsupportedModelError(f"gradient methods train a U-Net; {self.arch.title} is a transformer (MMDiT)")
        if self.arch.variant != "base":
            raise UnsupportedModelError(f"gradient methods need a plain text-to-image U-Net, not {self.arch.variant}")
        tensors = {k[len(UNET_PREFIX):]: k for k in self.reader.keys() if k.startswith(UNET_PREFIX)}
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        prediction = "v" if is_v_prediction(self.reader, self.arch) else "eps"
        if self.arch.family == "toyworld":  # pixel space, its own noise schedule
            with torch.device("meta"):  # built empty: the file's weights are assigned below (SDXL: 10 GB less)
                net = ToyUNet(UNetConfig.from_dict(self.arch.extra["toyworld"]["unet"]))
            alphas, factor, x0_clip = toy_diffusion.ALPHA_BAR, 1, toy_diffusion.X0_CLIP
        else:
            try:
                with torch.device("meta"):
                    net = LDMUNet(config_from_shapes({n: self.reader.infos[k].shape for n, k in tensors.items()},
                                                     self.arch.family))
            except (KeyError, ValueError) as exc:
                missing = f"no tensor {exc}" if isinstance(exc, KeyError) else exc
                raise UnsupportedModelError(f"{self.path.name}: its U-Net cannot be rebuilt for training "
                                            f"(incomplete or unusual layout: {missing})") from None
            # ComfyUI reads a v-prediction file with a `ztsnr` key as a zero-terminal-SNR model (and writes one)
            zsnr = prediction == "v" and "ztsnr" in self.reader.infos
            alphas, factor, x0_clip = sd_alphas_cumprod(zero_terminal_snr=zsnr), 8, None
        downsamples = sum(n.endswith(".op.weight") for n in tensors)
        size = training_size(resolution, self.arch.family, prediction, factor * 2 ** downsamples)
        try:
            net.load_state_dict({n: self.reader.get(k).to(self.device, dtype) for n, k in tensors.items()},
                                assign=True)
        except RuntimeError as exc:  # names the first missing / unexpected / mis-shaped tensors
            detail = next((line.strip() for line in str(exc).splitlines()[1:]), str(exc))
            raise UnsupportedModelError(f"{self.path.name}: its U-Net does not match the layout derived from it: "
                                        f"{detail[:300]}") from None
        net.requires_grad_(False).eval()
        channels = self.reader.infos[UNET_PREFIX + "out.2.weight"].shape[0]
        return ModuleDenoiser(net, UNET_PREFIX, ldm_inputs(self.arch.family, size), device=self.device, dtype=dtype,
                              latent_shape=(channels, size // factor, size // factor), alphas_cumprod=alphas,
                              prediction=prediction, x0_clip=x0_clip)


def is_v_prediction(reader: SafetensorsReader, arch: ArchSpec) -> bool:
    """A `v_pred` marker key (what ComfyUI writes for v-prediction models), or for SD2 the heuristic the hosts
    use: SD 2.x 768-v's last transformer norm bias is spread far wider than the 512-base's."""
    if "v_pred" in reader.infos:
        return True
    norm_bias = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    return arch.family == "sd2" and norm_bias in reader.infos and reader.get(norm_bias).float().std(
        unbiased=False).item() > 0.09


STEP_FIELDS = {"method": str, "params": dict, "concepts": dict, "source": dict, "results": dict, "created": str,
               "library": str, "architecture": str, "applied": dict}


def read_steps(metadata: Mapping[str, str], field: str = "model") -> tuple[dict, ...]:
    """The erasures recorded in a file's metadata, checked (inspect and the hosts read their fields)."""
    steps = read_metadata_json(metadata, META_PREFIX + "steps", [], field)
    for n, step in enumerate(steps, 1):
        problem = step_problem(step)
        if problem:
            raise InvalidParameterError(field, f"erasure {n} of its metadata {META_PREFIX}steps {problem}; was the "
                                        "file edited by hand?")
    return tuple(steps)


def step_problem(step) -> str | None:
    if not isinstance(step, dict):
        return "is not a JSON object"
    for name, kind in STEP_FIELDS.items():
        if name in step and not isinstance(step[name], kind):
            return f"has a {name} that is not a JSON {'text' if kind is str else 'object'}"
    for name, texts in step.get("concepts", {}).items():
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return f"has concepts.{name} that is not a list of texts"
    source, applied = step.get("source", {}), step.get("applied", {})
    if not isinstance(applied.get("to", {}), dict):
        return "has an applied.to that is not a JSON object"
    for name, value in (("source.name", source.get("name", "")), ("applied.to.name", applied.get("to", {}).get(
            "name", ""))):
        if not isinstance(value, str):
            return f"has a {name} that is not a JSON text"
    if not isinstance(applied.get("forced", False), bool):
        return "has an applied.forced that is not true or false"
    fingerprint = source.get("fingerprint", [])
    if not (isinstance(fingerprint, list) and len(fingerprint) in (0, FINGERPRINT_SIZE) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in fingerprint)):
        return f"has a source.fingerprint that is not a list of {FINGERPRINT_SIZE} finite numbers"
    if not isinstance(source.get("after", []), list):
        return "has a source.after that is not a list"
    probe = step.get("results", {}).get("probe", {})
    if not isinstance(probe, dict) or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), (int, float)) for k in ("residual", "cosine"))
            for f in probe.values()):
        return "has a results.probe that is not {target: {residual, cosine}}"
    return None


def provenance_metadata(patch: ErasurePatch, file_format: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    from . import __version__

    meta = dict(base or {})
    concepts = sorted({c for step in patch.steps for c in step.get("concepts", {}).get("erase", [])})
    meta.update({
        META_PREFIX + "format": file_format,
        META_PREFIX + "version": __version__,
        META_PREFIX + "architecture": patch.architecture,
        META_PREFIX + "steps": json.dumps(list(patch.steps)),
        META_PREFIX + "erased": ", ".join(concepts),
    })
    return meta


def save_checkpoint(model: CheckpointModel, patch: ErasurePatch, out, overwrite: bool = False, extra_meta=None,
                    field: str = "out") -> Path:
    """The whole checkpoint with the patch applied: same keys, order and dtypes; untouched tensors
    are copied bit for bit, one tensor in memory at a time. Every edited tensor is checked finite as
    written (in the model's dtype), so an overflowing or NaN patch fails and leaves nothing."""
    reader = model.reader
    missing = [k for k in patch.edits if k not in reader]
    if missing:
        if is_text_encoder_key(missing[0]):
            raise EraserError(f"the patch edits {missing[0]}, a text encoder given in a file of its own, not in this "
                              "checkpoint: save the erasure as a LoRA or a patch")
        raise EraserError(f"the patch edits {missing[0]}, which this checkpoint does not have")

    def source(key):
        info = reader.infos[key]
        if key in patch.edits:
            return LazyTensor(info.dtype, info.shape, lambda: patch.apply_to(key, reader.get(key)))
        return LazyTensor(info.dtype, info.shape, lambda: reader.get(key))

    steps = model.prior_steps() + patch.steps
    full = ErasurePatch(patch.architecture, patch.edits, steps)
    meta = provenance_metadata(full, "checkpoint", reader.metadata)
    meta[META_PREFIX + "source_sha256"] = model.sha256()  # the file these tensors were copied from
    title = ERASED_SUFFIX.sub("", reader.metadata.get("modelspec.title", model.path.stem))
    meta["modelspec.title"] = f"{title} (erased: {meta[META_PREFIX + 'erased']})"
    if model.arch.modelspec_architecture and "modelspec.architecture" not in meta:
        meta["modelspec.architecture"] = model.arch.modelspec_architecture
    meta.update(extra_meta or {})
    return write_safetensors(out, [(k, source(k)) for k in reader.keys()], meta, overwrite, field,
                             check=lambda key, tensor: key in patch.edits and check_written_finite(key, tensor))


ERASED_SUFFIX = re.compile(r"( \(erased: [^()]*\))+$")  # what save_checkpoint appends to the title, once


def check_tensors_finite(tensors) -> None:
    """Patch and LoRA factors are written in float32 as they are: refuse NaN or Inf among them."""
    for name, tensor in tensors:
        if tensor.is_floating_point():
            check_written_finite(name, tensor)


def save_patch(patch: ErasurePatch, out, overwrite: bool = False, field: str = "out") -> Path:
    """Only the changed tensors: ``{stage}.{part}::{key}`` entries plus a JSON index in the metadata."""
    tensors, index = [], {}
    for key, stages in patch.edits.items():
        index[key] = [s.kind for s in stages]
        for i, stage in enumerate(stages):
            tensors += [(f"{i}.{part}::{key}", t.detach().cpu().contiguous()) for part, t in stage.tensors().items()]
    meta = provenance_metadata(patch, "patch")
    meta[META_PREFIX + "edits"] = json.dumps(index)
    check_tensors_finite(tensors)
    return write_safetensors(out, tensors, meta, overwrite, field)


def load_patch(path, field: str = "patch") -> ErasurePatch:
    """A patch file, checked: its index, every stage's tensors (shapes, dtypes, finite) and its provenance."""
    reader = SafetensorsReader(path, field)
    meta = reader.metadata
    if meta.get(META_PREFIX + "format") != "patch":
        raise InvalidParameterError(field, f"{reader.path.name} is not a Concept Eraser patch file")
    index = read_metadata_json(meta, META_PREFIX + "edits", {}, field)
    parts: dict[tuple[str, str], dict[str, str]] = {}  # (stage, key) → {part: tensor name "{stage}.{part}::{key}"}
    for name in reader.keys():
        head, _, key = name.partition("::")
        stage, _, part = head.partition(".")
        parts.setdefault((stage, key), {})[part] = name
    edits = {}
    for key, kinds in index.items():
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise InvalidParameterError(field, f"its edit index lists {kinds!r} for {key}, not a list of edit kinds")
        stages = []
        for i, kind in enumerate(kinds):
            names = parts.get((str(i), key), {})
            try:
                stages.append(edit_from_parts(kind, {part: reader.get(name) for part, name in names.items()}))
            except ValueError as exc:
                raise InvalidParameterError(field, f"stage {i} of {key}: {exc}") from None
        edits[key] = tuple(stages)
    unlisted = [names for (stage, key), names in parts.items()
                if key not in index or not stage.isdigit() or int(stage) >= len(index[key])]
    if unlisted:
        raise InvalidParameterError(field, f"it holds {next(iter(unlisted[0].values()))}, which its edit index "
                                    "does not list")
    architecture = meta.get(META_PREFIX + "architecture", "")
    return ErasurePatch(architecture, edits, read_steps(meta, field))


def save_artifacts(artifacts: Mapping[str, torch.Tensor], report: Mapping, out, overwrite: bool = False,
                   field: str = "out") -> Path:
    """What a method learned besides its patch (KPOP's prompt) as safetensors, with the method, concepts,
    layers it feeds and source in the metadata. Whoever has it can bring the concept back: keep it private."""
    meta = {
        META_PREFIX + "format": "learned_prompt",
        META_PREFIX + "method": str(report.get("method")),
        META_PREFIX + "architecture": str(report.get("architecture")),
        META_PREFIX + "concepts": json.dumps(report.get("concepts", {})),
        META_PREFIX + "params": json.dumps(report.get("params", {})),
        META_PREFIX + "layers": json.dumps(report.get("prompt_layers", [])),
        META_PREFIX + "source": json.dumps(report.get("source", {})),
    }
    tensors = [(k, v.detach().contiguous()) for k, v in artifacts.items()]
    check_tensors_finite(tensors)
    return write_safetensors(out, tensors, meta, overwrite, field)


def lora_name(key: str, prefix: str = UNET_PREFIX) -> str:
    """Kohya name of a denoiser module: `lora_unet_` + its name behind `prefix` (the file's denoiser prefix) with
    dots as underscores. SD: LDM naming, as SDXL LoRAs use; ComfyUI and A1111 load it. Flux / SD3: BFL / SAI
    naming, which ComfyUI's LoRA loader maps for every model (comfy/lora.py `model_lora_keys_unet`)."""
    if not key.startswith(prefix) or not key.endswith(".weight"):
        raise EraserError(f"{key} has no LoRA name")
    return "lora_unet_" + key[len(prefix):-len(".weight")].replace(".", "_")


def lora_modules(key: str, up: torch.Tensor, down: torch.Tensor, arch: ArchSpec | None = None):
    """[(kohya module name, up, down)] for one edited weight. Denoiser keys: `lora_name`. Text-encoder
    keys take transformers' CLIP names behind the encoder's prefix (lora_te_ for SD1/SD2, lora_te1_ /
    lora_te2_ for SDXL's CLIP-L / bigG), as kohya and ComfyUI name them, e.g.
    lora_te_text_model_encoder_layers_0_self_attn_q_proj. An OpenCLIP fused in_proj (rows q; k; v)
    becomes the three q/k/v modules, each with its rows of `up` and the same `down`: exactly the edit."""
    if arch is not None and arch.is_denoiser_key(key):
        return [(lora_name(key, arch.denoiser_prefix), up, down)]
    if arch is None and key.startswith(UNET_PREFIX):
        return [(lora_name(key), up, down)]
    spec = next((e for e in arch.encoders if key.startswith(e.prefix)), None) if arch else None
    if spec is None:
        why = ("it is neither a denoiser nor a text-encoder weight" if arch else
               "text-encoder weights are named only when the model's architecture is given (save_lora(..., arch=))")
        raise InvalidParameterError("format", f"{key} has no LoRA name: {why}")
    if spec.layout == "t5":  # ComfyUI's name for T5 (comfy/lora.py): slot prefix + transformers' name, no text_model_
        return [(spec.lora_prefix + key[len(spec.prefix):-len(".weight")].replace(".", "_"), up, down)]
    parts = hf_state_dict(spec, [key], lambda _: up)
    if not parts or not all(name.endswith(".weight") for name in parts):
        raise InvalidParameterError("format", f"{key} has no LoRA name (only projection weights do)")
    return [(spec.lora_prefix + "text_model_" + name[:-len(".weight")].replace(".", "_"), part, down)
            for name, part in parts.items()]


def save_lora(patch: ErasurePatch, out, overwrite: bool = False, arch: ArchSpec | None = None,
              field: str = "out") -> Path:
    """The erasure as a standard LoRA (up/down/alpha = rank, so its scale is 1 at strength 1).
    `arch` (the model's) is needed when the erasure edited the text encoder (ErasePro)."""
    if not patch.is_low_rank():
        raise InvalidParameterError(
            "format", "this erasure changed whole matrices (not low-rank), so it cannot be a LoRA; "
            "save it as a checkpoint or a patch"
        )
    tensors = []
    ranks = set()
    for key in patch.edits:
        for name, up, down in lora_modules(key, *patch.low_rank_factors(key), arch):
            ranks.add(up.shape[1])
            tensors += [
                (f"{name}.lora_up.weight", up.cpu().contiguous()),
                (f"{name}.lora_down.weight", down.cpu().contiguous()),
                (f"{name}.alpha", torch.tensor(float(up.shape[1]))),
            ]
    meta = provenance_metadata(patch, "lora")
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                 "ss_network_alpha": str(max(ranks))})
    modelspec = next((f.modelspec_architecture for f in FAMILIES if f.name == patch.architecture), None)
    if modelspec:
        meta["modelspec.architecture"] = f"{modelspec}/lora"
    meta["modelspec.title"] = "Concept Eraser: " + meta[META_PREFIX + "erased"]
    check_tensors_finite(tensors)
    return write_safetensors(out, tensors, meta, overwrite, field)


def save_erasure(fmt: str, out, patch: ErasurePatch, arch: ArchSpec, *,
                 checkpoint: Callable[[Path], Path] | None = None,
                 solved_on: Callable[[str], torch.Tensor] | None = None, artifacts: Mapping | None = None,
                 report: Mapping | None = None, overwrite: bool = False, field: str = "out") -> Path:
    """Write an erasure to `out` in one of FORMATS, the same way for every host (command line, ComfyUI, WebUI):

    - checkpoint: the whole model, by `checkpoint(out)`: the host's own writer (`save_checkpoint` for a file);
    - patch: only the changed tensors, dense and sparse edits as changes to `solved_on` (the weights they were
      solved on) where given, so that the patch applies to a model read in another dtype;
    - lora: the low-rank erasure as a LoRA (`arch` names the text encoders' modules);
    - learned_prompt: what the method learned besides the patch (`artifacts`, described by its `report`)."""
    if fmt == "checkpoint":
        return checkpoint(Path(out))
    if fmt == "patch":
        return save_patch(patch.relative(solved_on) if solved_on else patch, out, overwrite, field)
    if fmt == "lora":
        return save_lora(patch, out, overwrite, arch=arch, field=field)
    if fmt == "learned_prompt":
        if not artifacts:
            raise InvalidParameterError("format", f"{(report or {}).get('method')} learned no prompt; "
                                        "'learned_prompt' is for KPOP with use_prompt on")
        return save_artifacts(artifacts, report or {}, out, overwrite, field)
    raise InvalidParameterError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
