"""Everything that touches the WebUI itself: which host runs (`detect_host`, the one place that
decides), its loaded model as a `LiveModel`, its progress/interrupt state, its folders and lists.

Two hosts share this adapter:

- AUTOMATIC1111 1.10 (`modules/`): `shared.sd_model` is an LDM `LatentDiffusion` / SGM
  `DiffusionEngine`, hijacked (text encoders wrapped in `FrozenCLIPEmbedderWithCustomWords` & co.);
  weights are edited in the modules themselves; its builtin LoRA extension keeps weight backups on
  the modules (`network_weights_backup`), put back before every read and write (`live.settle_lora`).
- Forge ("Forge 2", `modules_forge/` + `backend/`): `shared.sd_model` is a `ForgeDiffusionEngine`
  whose `forge_objects_original` holds the U-Net patcher (`model.diffusion_model`) and the CLIP
  patcher (transformers text encoders `clip_l` / `clip_h` / `clip_g`); its LoRA loader replaces
  parameters and keeps the originals in `lora_loader.backup` (`live.forge_settle_lora`).

`modules.*` and `backend.*` are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from concept_eraser.checkpoint import read_steps
from concept_eraser.denoiser import ModuleDenoiser, alphas_from_sigmas, ldm_inputs, training_size
from concept_eraser.errors import Cancelled, EraserError, UnsupportedModelError
from concept_eraser.models.arch import ArchSpec

from .live import FORGE_TEXT_PREFIX, LiveTensors, Slot, a1111_slots, forge_settle_lora, forge_text_slots, settle_lora
from .model import EncoderLayer, HostTextEncoder, WebUIModel, host_arch
from .session import CheckpointId

A1111 = "a1111"
FORGE = "forge"
HOST_TITLES = {A1111: "AUTOMATIC1111 WebUI", FORGE: "Forge"}
EDITABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FORGE_STALE_LORA_HASH = "concept_eraser: weights changed"


class NoModelError(EraserError):
    """No checkpoint is loaded (or loading it failed)."""


def detect_host() -> str:
    """Forge ships the `modules_forge` package next to `modules`; AUTOMATIC1111 does not."""
    import sys

    if sys.modules.get("modules_forge") is not None:
        return FORGE
    try:
        return FORGE if importlib.util.find_spec("modules_forge") is not None else A1111
    except (ImportError, ValueError):
        return A1111


def checkpoint_id(obj) -> CheckpointId:
    info = getattr(obj, "sd_checkpoint_info", None)
    if info is None:
        return CheckpointId(str(getattr(obj, "sd_model_checkpoint", "") or "unknown"), "unknown checkpoint")
    return CheckpointId(str(info.filename), str(getattr(info, "title", None) or os.path.basename(info.filename)),
                        getattr(info, "sha256", None))


def _file_steps(obj) -> tuple[dict, ...]:
    info = getattr(obj, "sd_checkpoint_info", None)
    metadata = getattr(info, "metadata", None) or {}
    return read_steps({k: v for k, v in metadata.items() if isinstance(v, str)}, "checkpoint")


def _check_dtypes(tensors: LiveTensors, keys: Sequence[str]) -> None:
    for key in keys:
        dtype = tensors.dtype(key)
        if dtype not in EDITABLE_DTYPES:
            raise UnsupportedModelError(
                f"the loaded model keeps {key} as {dtype} (fp8 or quantized storage); erasing needs fp16, bf16 or "
                "fp32 weights: switch the weight storage setting back to the default and reload the checkpoint")


def clear_condition_caches() -> None:
    """The WebUI caches prompt conditionings across generations (`StableDiffusionProcessing.cached_c`,
    kept while "persistent_cond_cache" is on); after a text-encoder edit they are stale."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, getattr(processing, "StableDiffusionProcessingTxt2Img", None),
                getattr(processing, "StableDiffusionProcessingImg2Img", None)):
        if cls is None:
            continue
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            value = cls.__dict__.get(name)
            if isinstance(value, list):
                setattr(cls, name, [None] * len(value))


# ---- AUTOMATIC1111 --------------------------------------------------------------------------------

class A1111Engine:
    """A1111's text-encoder wrapper (sd_hijack_clip / sd_hijack_open_clip), called as `process_tokens` does."""

    def __init__(self, wrapper, device, autocast):
        self.wrapper = wrapper
        self.device = device
        self.autocast = autocast
        self.id_start, self.id_end, self.id_pad = wrapper.id_start, wrapper.id_end, wrapper.id_pad

    def tokenize(self, texts):
        return self.wrapper.tokenize(list(texts))

    def encode(self, tokens):
        hijack = getattr(self.wrapper, "hijack", None)
        if hijack is not None and hasattr(hijack, "fixes"):
            hijack.fixes = None  # no textual-inversion substitutions for plain prompts
        with self.autocast():
            z = self.wrapper.encode_with_transformers(tokens.to(self.device))
        return z, getattr(z, "pooled", None)


def a1111_layers(obj, family: str, opts) -> list[EncoderLayer]:
    """The hidden state each encoder feeds the U-Net, as the wrappers compute it (see sd_hijack_clip.py)."""
    skip = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
    if family == "sd1":
        return [EncoderLayer(-1, True) if skip <= 1 else EncoderLayer(-skip, True)]
    if family == "sd2":
        return [EncoderLayer(-(int(getattr(obj.cond_stage_model.wrapped, "layer_idx", 1)) + 1), True)]
    clip_l, clip_g = (e.wrapped for e in obj.conditioner.embedders[:2])
    if getattr(opts, "sdxl_clip_l_skip", False) is True:
        first = EncoderLayer(-skip, False)
    elif getattr(clip_l, "layer", "hidden") == "last":
        first = EncoderLayer(-1, True)
    else:
        depth = clip_l.transformer.config.num_hidden_layers
        index = int(clip_l.layer_idx)
        first = EncoderLayer(index - (depth + 1) if index >= 0 else index, False)
    second = EncoderLayer(-2 if getattr(clip_g, "layer", "penultimate") == "penultimate" else -1, False)
    return [first, second]


class A1111Model:
    """`LiveModel` over an A1111 `shared.sd_model` (LDM/SGM modules, edited in place)."""

    host = A1111

    def __init__(self, obj):
        from modules import devices, shared

        if getattr(obj, "forge_objects", None) is not None:
            raise UnsupportedModelError("this is a Forge model object")
        self.obj = obj
        self.tensors = LiveTensors(lambda: {"model": obj}, a1111_slots(obj.named_parameters()))
        self._devices, self._opts = devices, shared.opts

    @property
    def checkpoint(self) -> CheckpointId:
        return checkpoint_id(self.obj)

    def settle(self) -> None:
        settle_lora(self.obj.modules())

    def after_write(self) -> None:
        clear_condition_caches()
        # A1111 also keeps the empty prompt's conditioning from load time (it pads prompt and negative prompt
        # to one length with it, "Pad prompt/negative prompt"): recompute it from the text encoder as it is now
        if getattr(self.obj, "cond_stage_model_empty_prompt", None) is not None:
            from modules import sd_models

            with self._devices.autocast(), torch.no_grad():
                self.obj.cond_stage_model_empty_prompt = sd_models.get_empty_cond(self.obj)

    def file_steps(self) -> tuple[dict, ...]:
        return _file_steps(self.obj)

    def source(self) -> dict:
        c = self.checkpoint
        return {"name": os.path.basename(c.filename), "title": c.title, "host": HOST_TITLES[A1111],
                **({"sha256": c.sha256} if c.sha256 else {})}

    def editable(self, prior_steps: Sequence[dict]) -> WebUIModel:
        arch = host_arch(self.tensors)
        _check_dtypes(self.tensors, arch.map_keys())
        arch = host_arch(self.tensors, a1111_layers(self.obj, arch.family, self._opts))
        wrappers = [self.obj.cond_stage_model] if arch.family != "sdxl" else list(self.obj.conditioner.embedders[:2])
        engines = [A1111Engine(w, self._devices.device, self._devices.autocast) for w in wrappers]
        encoder = HostTextEncoder(engines, [e.pooled for e in arch.encoders], arch.encoders[0].window)
        return WebUIModel(self.tensors, arch, encoder, self.source(), prior_steps,
                          lambda resolution: self.denoiser(arch, resolution))

    def denoiser(self, arch: ArchSpec, resolution: int | None) -> ModuleDenoiser:
        """The loaded LDM/SGM U-Net (`sd_model.model.diffusion_model`) on the host's device and dtype; A1111 keeps
        the model loaded while a job runs. Its schedule is the model's own `alphas_cumprod`."""
        prediction = "v" if getattr(self.obj, "parameterization", "eps") == "v" else "eps"
        unet = self.obj.model.diffusion_model
        return ldm_denoiser(unet, "model.diffusion_model.", arch, resolution, prediction,
                            self._devices.device, next(unet.parameters()).dtype,
                            torch.as_tensor(self.obj.alphas_cumprod).detach().float().cpu())


def ldm_denoiser(unet, prefix: str, arch: ArchSpec, resolution: int | None, prediction: str, device, dtype,
                 alphas_cumprod: torch.Tensor) -> ModuleDenoiser:
    """`ModuleDenoiser` over a WebUI's LDM-style U-Net, called as the hosts call it (SDXL: with `y`)."""
    size = training_size(resolution, arch.family, prediction)
    return ModuleDenoiser(unet, prefix, ldm_inputs(arch.family, size), device=torch.device(device), dtype=dtype,
                          latent_shape=(4, size // 8, size // 8), alphas_cumprod=alphas_cumprod,
                          prediction=prediction)


# ---- Forge ----------------------------------------------------------------------------------------

class ForgeEngine:
    """Forge's `ClassicTextProcessingEngine` for one encoder, called as its `process_tokens` does."""

    def __init__(self, engine, load):
        self.engine = engine
        self.load = load
        self.id_start, self.id_end, self.id_pad = engine.id_start, engine.id_end, engine.id_pad

    def tokenize(self, texts):
        return self.engine.tokenize(list(texts))

    def encode(self, tokens):
        self.load()
        with torch.inference_mode():
            z = self.engine.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        return z.clone(), (pooled.clone() if pooled is not None else None)


def forge_family(obj) -> str:
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(obj, flag, False):
            return family
    raise UnsupportedModelError(
        f"Forge loaded this as {type(obj).__name__}; Concept Eraser edits SD1.x, SD2.x and SDXL")


class ForgeModel:
    """`LiveModel` over a Forge `ForgeDiffusionEngine`: the original (LoRA-free) patchers' modules."""

    host = FORGE

    def __init__(self, obj):
        self.obj = obj
        self.family = forge_family(obj)
        objects = obj.forge_objects_original
        self.unet_patcher, self.clip_patcher = objects.unet, objects.clip
        unet_root, clip_root = self.unet_patcher.model, objects.clip.cond_stage_model
        slots = {"model." + n: Slot((("unet", n),)) for n, _ in unet_root.named_parameters()
                 if n.startswith("diffusion_model.")}
        slots.update(forge_text_slots(self.family, clip_root.named_parameters()))
        self.tensors = LiveTensors(self._roots, slots)

    def _roots(self) -> dict:
        return {"unet": self.unet_patcher.model, "clip": self.clip_patcher.cond_stage_model}

    @property
    def checkpoint(self) -> CheckpointId:
        return checkpoint_id(self.obj)

    def settle(self) -> None:
        forge_settle_lora([self.unet_patcher.model, self.clip_patcher.cond_stage_model])

    def after_write(self) -> None:
        from backend import memory_management

        # the patchers merge LoRAs when they are (re)loaded: unload so the next generation merges them
        # again on top of the weights as they are now; and make the LoRA script rebuild its patched
        # objects from the originals (it skips that while its hash equals the wanted LoRAs', so a hash that
        # matches no LoRA list, not even the empty one)
        memory_management.unload_all_models()
        self.obj.current_lora_hash = FORGE_STALE_LORA_HASH
        clear_condition_caches()

    def file_steps(self) -> tuple[dict, ...]:
        return _file_steps(self.obj)

    def source(self) -> dict:
        c = self.checkpoint
        return {"name": os.path.basename(c.filename), "title": c.title, "host": HOST_TITLES[FORGE],
                **({"sha256": c.sha256} if c.sha256 else {})}

    def _layers(self, engines) -> list[EncoderLayer]:
        return [EncoderLayer(-max(int(e.clip_skip), int(e.minimal_clip_skip)), bool(e.final_layer_norm))
                for e in engines]

    def editable(self, prior_steps: Sequence[dict]) -> WebUIModel:
        from backend import memory_management

        arch = host_arch(self.tensors)
        _check_dtypes(self.tensors, arch.map_keys())
        if self.family == "sdxl":
            engines = [self.obj.text_processing_engine_l, self.obj.text_processing_engine_g]
        else:
            engines = [self.obj.text_processing_engine]
        arch = host_arch(self.tensors, self._layers(engines))

        def load():
            memory_management.load_model_gpu(self.clip_patcher.patcher)

        encoder = HostTextEncoder([ForgeEngine(e, load) for e in engines], [e.pooled for e in arch.encoders],
                                  arch.encoders[0].window)
        return WebUIModel(self.tensors, arch, encoder, self.source(), prior_steps,
                          lambda resolution: self.denoiser(arch, resolution))

    def denoiser(self, arch: ArchSpec, resolution: int | None) -> ModuleDenoiser:
        """Forge's U-Net weights (the original patcher's `diffusion_model`, loaded by Forge's memory manager) in
        the solver's own LDM U-Net: Forge's inference-only modules add in place (`x += n` in its transformer
        blocks), which autograd cannot differentiate. Its schedule from the predictor's sigmas (ᾱ = 1 / (σ² + 1))."""
        from backend import memory_management

        from concept_eraser.models.unet import LDMUNet, config_from_shapes

        memory_management.load_model_gpu(self.unet_patcher)
        model = self.unet_patcher.model
        predictor = model.predictor
        prediction = "v" if "v" in str(getattr(predictor, "prediction_type", "eps")).lower() else "eps"
        weights = dict(model.diffusion_model.named_parameters())
        try:
            with torch.device("meta"):  # built empty, then given Forge's tensors (no copy)
                unet = LDMUNet(config_from_shapes({n: tuple(w.shape) for n, w in weights.items()}, arch.family))
            # frozen first: Forge's tensors are inference tensors, which cannot become parameters requiring grad
            unet.requires_grad_(False).eval()
            unet.load_state_dict(weights, strict=True, assign=True)
        except (KeyError, ValueError, StopIteration, RuntimeError) as exc:
            raise UnsupportedModelError(f"Forge's U-Net cannot be rebuilt for training: {str(exc)[:300]}") from None
        return ldm_denoiser(unet, "model.diffusion_model.", arch, resolution, prediction,
                            self.unet_patcher.load_device, next(iter(weights.values())).dtype,
                            alphas_from_sigmas(predictor.sigmas))


# ---- the host ---------------------------------------------------------------------------------------

class Host:
    """The running WebUI, as the tab and the HTTP route need it."""

    def __init__(self, kind: str | None = None):
        self.kind = kind or detect_host()
        self.title = HOST_TITLES[self.kind]

    # model -------------------------------------------------------------------------------------
    def current_object(self, load: bool = False):
        """The loaded model object, or None. With `load`, loads the selected checkpoint if none is yet."""
        from modules import sd_models, shared

        if self.kind == FORGE:
            # Forge holds a placeholder (`FakeInitialModel`) until the first generation loads the checkpoint
            obj = sd_models.model_data.sd_model
            if getattr(obj, "forge_objects", None) is None:
                if not load:
                    return None
                obj, _reloaded = sd_models.forge_model_reload()
            return obj
        if load:
            return shared.sd_model
        return sd_models.model_data.sd_model

    def live_for(self, obj):
        if obj is None:
            return None
        if getattr(obj, "forge_objects", None) is not None or self.kind == FORGE:
            return ForgeModel(obj)
        return A1111Model(obj)

    def live(self, load: bool = False):
        obj = self.current_object(load)
        if obj is None:
            if load:
                raise NoModelError("no checkpoint is loaded: select one in the checkpoint list first")
            return None
        return self.live_for(obj)

    # jobs, progress, interrupt -------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, name: str, id_task: str | None = None) -> Iterator[Any]:
        """Run as the WebUI runs a generation: one at a time (its queue lock), with its progress state
        (so /sdapi/v1/progress and the progress bar follow), and its Interrupt."""
        from modules import call_queue, progress, shared

        if id_task:
            progress.add_task_to_queue(id_task)
        with call_queue.queue_lock:
            shared.state.begin(job=name)
            if id_task:
                progress.start_task(id_task)
            shared.state.job_count = 1
            try:
                yield shared.state
            finally:
                if id_task:
                    progress.finish_task(id_task)
                shared.state.textinfo = None  # the WebUI's end() keeps it: "KPOP: preparing" would outlive a failure
                shared.state.end()

    def finish_task(self, id_task: str | None) -> None:
        """Mark the tab's task as done for the progress bar, also when it failed before its job started."""
        if id_task:
            from modules import progress

            progress.finish_task(id_task)

    def progress(self, state):
        """The solver's progress(done, total, message) as the host's progress state; raises `Cancelled`
        (before anything is written) once Interrupt was pressed."""

        def report(done: int, total: int, message: str) -> None:
            if self.interrupted(state):
                raise Cancelled("interrupted: nothing was changed")
            state.sampling_steps = max(int(total), 1)
            state.sampling_step = min(int(done), state.sampling_steps)
            state.textinfo = f"Concept Eraser: {message}"

        return report

    @staticmethod
    def interrupted(state) -> bool:
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))

    def interrupt(self) -> None:
        from modules import shared

        shared.state.interrupt()

    # folders and lists ---------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        from modules import sd_models, shared

        return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    def lora_dir(self) -> Path:
        from modules import paths, shared

        return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))

    def patch_dir(self) -> Path:
        from modules import paths

        return Path(paths.models_path) / "ConceptEraser"

    def refresh_checkpoints(self) -> list[str]:
        from modules import sd_models

        sd_models.list_models()
        return sd_models.checkpoint_tiles()

    def refresh_loras(self) -> None:
        import sys

        networks = sys.modules.get("networks")  # the builtin LoRA extension's module, when it is loaded
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

    def find_checkpoint(self, path: Path):
        from modules import sd_models

        for info in sd_models.checkpoints_list.values():
            if os.path.abspath(info.filename) == os.path.abspath(path):
                return info
        return None


FAMILIES = tuple(FORGE_TEXT_PREFIX)
