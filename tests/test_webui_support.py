"""Small stand-ins for the WebUI's objects, for the WebUI adapter's unit tests (no WebUI needed).

`install_fake_webui(monkeypatch)` puts fake `modules.*` (and `backend.*`) modules into sys.modules with
just the members the adapter uses; `FakeLDM` mimics an A1111 SD1 model after the hijack (LDM names,
`cond_stage_model.wrapped.transformer` = a real transformers CLIP text model, the token embedding
wrapped once more), `FakeForge` a Forge SD1/SDXL engine (transformers encoders, inference-mode
parameters, a LoRA loader with backups). No test functions here.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from clip_reference import hf_text_model, hf_tokenizer

from concept_eraser.denoiser import sd_alphas_cumprod
from concept_eraser.models.arch import detect
from concept_eraser.models.text_encoders import hf_state_dict
from concept_eraser.safetensors_io import write_safetensors
from concept_eraser.tiny import tiny_state_dict


def runnable_unet(state: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """The U-Net as a module that runs (float32: CPU kernels), when `state` holds a complete one."""
    from concept_eraser.models.unet import LDMUNet, config_from_shapes

    try:
        net = LDMUNet(config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, "sd1"))
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, ValueError, StopIteration, RuntimeError):
        return None
    return net.requires_grad_(False)


def param_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Nested modules whose named_parameters() are exactly `state`'s names."""
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


class EmbeddingsWithFixes(torch.nn.Module):
    """A1111 wraps the token embedding (sd_hijack.EmbeddingsWithFixes): its weight is at `.wrapped.weight`."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = hijack

    def forward(self, input_ids):
        assert self.embeddings.fixes is None, "fixes must be cleared for plain prompts"
        return self.wrapped(input_ids)


class TextModelHolder(torch.nn.Module):
    """transformers 4.x (the WebUIs' versions) keeps the CLIP text transformer under `.text_model`;
    newer versions may not: give the fake that level either way."""

    def __init__(self, model):
        super().__init__()
        self.text_model = getattr(model, "text_model", model)
        object.__setattr__(self, "_model", model)

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)


class FakeClipWrapper(torch.nn.Module):
    """A1111's FrozenCLIPEmbedderWithCustomWords around ldm's FrozenCLIPEmbedder (`.wrapped.transformer`)."""

    def __init__(self, transformer, opts):
        super().__init__()
        self.wrapped = torch.nn.Module()
        self.wrapped.transformer = TextModelHolder(transformer)
        self.wrapped.tokenizer = hf_tokenizer()
        self.hijack = SimpleNamespace(fixes=None)
        emb = self.wrapped.transformer.text_model.embeddings
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self.hijack)
        self.opts = opts
        tok = self.wrapped.tokenizer
        self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = self.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state


def checkpoint_info(path: Path, sha256: str | None = None, metadata: dict | None = None):
    return SimpleNamespace(filename=str(path), title=f"{Path(path).name} [{(sha256 or '')[:10]}]", sha256=sha256,
                           metadata=metadata or {}, name=Path(path).name)


class FakeLDM(torch.nn.Module):
    """An A1111 SD1 model after the hijack; U-Net fp16 as on a GPU, text encoder fp32."""

    def __init__(self, state: dict[str, torch.Tensor], info, opts):
        super().__init__()
        prefix = "model.diffusion_model."
        unet = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.model = torch.nn.Module()
        self.model.diffusion_model = runnable_unet(unet) or param_tree(unet)
        self.alphas_cumprod = sd_alphas_cumprod()
        self.parameterization = "eps"
        arch = detect({k: tuple(v.shape) for k, v in state.items()})
        spec = arch.encoders[0]
        text = hf_text_model(spec, hf_state_dict(spec, list(state), lambda k: state[k]), torch.float32)
        self.cond_stage_model = FakeClipWrapper(text, opts)
        vae = "first_stage_model.decoder.conv_out.weight"
        self.first_stage_model = param_tree({"decoder.conv_out.weight": state[vae]})
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.is_sd1 = True


class FakeState:
    """modules.shared_state.State: the members the adapter uses."""

    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.history = []

    def begin(self, job="(unknown)"):
        self.interrupted = False
        self.job = job
        self.history.append(("begin", job))

    def end(self):
        self.history.append(("end", self.job))
        self.job = ""

    def interrupt(self):
        self.interrupted = True


class Processed:
    def __init__(self, images):
        self.images = images


def image_of_model(model) -> "object":
    """A 4×4 image whose pixels depend on the first K matrix: the stand-in for a real render."""
    from PIL import Image

    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = model.model.diffusion_model.get_parameter(key).detach().float()
    seed = int(hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def install_fake_webui(monkeypatch, tmp_path: Path, forge: bool = False) -> SimpleNamespace:
    """Fake `modules.*` (and for Forge `modules_forge`, `backend.*`) in sys.modules."""
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    state = FakeState()
    opts = SimpleNamespace(CLIP_stop_at_last_layers=1, sdxl_clip_l_skip=False, outdir_samples="",
                           outdir_txt2img_samples=str(tmp_path / "out"), outdir_grids="",
                           outdir_txt2img_grids=str(tmp_path / "grids"))
    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    lora_dir = tmp_path / "models" / "Lora"
    ckpt_dir.mkdir(parents=True)
    sd_models = types.ModuleType("modules.sd_models")

    class SharedModule(types.ModuleType):
        sd_model = property(lambda self: sd_models.model_data.sd_model)

    shared = SharedModule("modules.shared")
    shared.state, shared.opts = state, opts
    shared.cmd_opts = SimpleNamespace(ckpt_dir=str(ckpt_dir), lora_dir=str(lora_dir))
    shared_opts_mod = types.ModuleType("modules.shared_opts")
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.autocast = lambda disable=False: contextlib.nullcontext()
    sd_models.model_data = SimpleNamespace(sd_model=None)
    sd_models.model_path = str(ckpt_dir)
    sd_models.checkpoints_list = {}
    sd_models.listed = []

    def list_models():
        sd_models.checkpoints_list.clear()
        for f in sorted(ckpt_dir.glob("*.safetensors")):
            info = checkpoint_info(f, hashlib.sha256(f.read_bytes()).hexdigest())
            sd_models.checkpoints_list[info.title] = info
        sd_models.listed.append(len(sd_models.checkpoints_list))

    sd_models.list_models = list_models
    # as A1111 computes `sd_model.cond_stage_model_empty_prompt` after loading a model
    sd_models.get_empty_cond = lambda model: model.cond_stage_model.encode_with_transformers(
        torch.tensor([[model.cond_stage_model.id_start] + [model.cond_stage_model.id_end] * 76]))
    sd_models.checkpoint_tiles = lambda use_short=False: list(sd_models.checkpoints_list)
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.RLock()
    progress = types.ModuleType("modules.progress")
    progress.events = []
    progress.add_task_to_queue = lambda i: progress.events.append(("queued", i))
    progress.start_task = lambda i: progress.events.append(("start", i))
    progress.finish_task = lambda i: progress.events.append(("finish", i))
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(tmp_path / "models")
    processing = types.ModuleType("modules.processing")

    class StableDiffusionProcessing:
        cached_c = ["stale", "stale"]
        cached_uc = ["stale", "stale"]

        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

        def close(self):
            self.closed = True

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        cached_hr_c = ["stale", "stale"]
        cached_hr_uc = ["stale", "stale"]

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.calls = []

    def process_images(p):
        processing.calls.append(p)
        if state.interrupted:
            return Processed([])
        return Processed([image_of_model(shared.sd_model)])

    processing.process_images = process_images
    script_callbacks = types.ModuleType("modules.script_callbacks")
    script_callbacks.registered = []
    for name in ("on_ui_tabs", "on_app_started", "on_model_loaded", "on_after_component", "on_ui_settings"):
        setattr(script_callbacks, name, (lambda n: lambda fn, **kw: script_callbacks.registered.append((n, fn)))(name))

    mods = {"modules": pkg, "modules.shared": shared, "modules.devices": devices, "modules.sd_models": sd_models,
            "modules.call_queue": call_queue, "modules.progress": progress, "modules.paths": paths,
            "modules.processing": processing, "modules.script_callbacks": script_callbacks,
            "modules.shared_opts": shared_opts_mod}
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            setattr(pkg, name.split(".", 1)[1], module)
    ns = SimpleNamespace(state=state, opts=opts, shared=shared, sd_models=sd_models, processing=processing,
                         progress=progress, script_callbacks=script_callbacks, ckpt_dir=ckpt_dir, lora_dir=lora_dir,
                         tmp=tmp_path)
    if forge:
        monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
        backend = types.ModuleType("backend")
        backend.__path__ = []
        mm = types.ModuleType("backend.memory_management")
        mm.events = []
        mm.unload_all_models = lambda: mm.events.append("unload_all_models")
        mm.load_model_gpu = lambda patcher: mm.events.append(("load_model_gpu", id(patcher)))
        backend.memory_management = mm
        monkeypatch.setitem(sys.modules, "backend", backend)
        monkeypatch.setitem(sys.modules, "backend.memory_management", mm)
        ns.memory_management = mm
    return ns


def tiny_sd1_file(folder: Path, name: str = "tiny-sd1.safetensors", seed: int = 0) -> tuple[Path, dict]:
    state = tiny_state_dict("sd1", seed=seed, dtype=torch.float16)
    path = folder / name
    write_safetensors(path, state, {"modelspec.title": "tiny"})
    return path, state


def trainable_sd1_file(folder: Path, name: str = "trainable-sd1.safetensors") -> tuple[Path, dict]:
    """A tiny SD1 checkpoint with a complete (small) U-Net, which gradient methods can run."""
    from concept_eraser.models.unet import LDMConfig, LDMUNet

    state = tiny_state_dict("sd1", seed=0, dtype=torch.float16)
    width = state["cond_stage_model.transformer.text_model.final_layer_norm.weight"].shape[0]
    torch.manual_seed(0)
    unet = LDMUNet(LDMConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                             num_res_blocks=(1, 1), transformer_depth=(1, 1), transformer_depth_middle=1,
                             transformer_depth_output=(1, 1, 1, 1), context_dim=width, num_heads=8))
    state = {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}
    state |= {"model.diffusion_model." + k: v.half() for k, v in unet.state_dict().items()}
    path = folder / name
    write_safetensors(path, state, {"modelspec.title": "tiny, complete U-Net"})
    return path, state


def load_fake_a1111(webui, path: Path, state: dict, make_current: bool = True) -> FakeLDM:
    info = checkpoint_info(path, hashlib.sha256(path.read_bytes()).hexdigest())
    model = FakeLDM(state, info, webui.opts)
    with torch.no_grad():
        model.cond_stage_model_empty_prompt = webui.sd_models.get_empty_cond(model)
    if make_current:
        webui.sd_models.model_data.sd_model = model
    return model


def apply_fake_lora(module: torch.nn.Module, delta: torch.Tensor, name: str = "lora") -> None:
    """What A1111's network_apply_weights does on a module: back up once, then add the LoRA in place."""
    if getattr(module, "network_weights_backup", None) is None:
        module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
        module.network_bias_backup = None
    with torch.no_grad():
        module.weight.copy_(module.network_weights_backup.to(module.weight) + delta.to(module.weight))
    module.network_current_names = ((name, 1.0, 1.0, None),)


# ---- Forge ---------------------------------------------------------------------------------------

class FakeLoraLoader:
    """backend.patcher.lora.LoraLoader: replaces parameters by merged copies, keeps the originals."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    def merge(self, key: str, delta: torch.Tensor) -> None:
        owner, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(owner)
        weight = getattr(module, leaf)
        self.backup.setdefault(key, weight)
        with torch.inference_mode():
            merged = torch.nn.Parameter(weight + delta.to(weight), requires_grad=False)
        setattr(module, leaf, merged)
        self.loaded_hash = str([key])

    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for key, weight in self.backup.items():
            owner, _, leaf = key.rpartition(".")
            setattr(self.model.get_submodule(owner), leaf, weight)
        self.backup = {}
        self.loaded_hash = hashes


class FakeForgeEngine:
    """backend.text_processing.classic_engine.ClassicTextProcessingEngine for one encoder."""

    def __init__(self, text_encoder, clip_skip: int, final_layer_norm: bool, pooled: bool, pad: int):
        self.text_encoder = text_encoder
        tok = hf_tokenizer()
        self.tokenizer = tok
        self.id_start, self.id_end, self.id_pad = tok.bos_token_id, tok.eos_token_id, pad
        self.clip_skip = clip_skip
        self.minimal_clip_skip = clip_skip
        self.final_layer_norm = final_layer_norm
        self.return_pooled = pooled

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def encode_with_transformers(self, tokens):
        transformer = self.text_encoder.transformer
        outputs = transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            z.pooled = transformer.text_projection(outputs.pooler_output)
        return z


def _integrated_clip(spec, state, projection: torch.Tensor | None = None):
    text = TextModelHolder(hf_text_model(spec, hf_state_dict(spec, list(state), lambda k: state[k]), torch.float32))
    module = torch.nn.Module()
    module.transformer = text
    if projection is not None:
        text.text_projection = torch.nn.Linear(projection.shape[0], projection.shape[1], bias=False)
        with torch.no_grad():
            text.text_projection.weight.copy_(projection.T.float())
    module.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
    return module


class ForgeEngineObject(SimpleNamespace):
    """A ForgeDiffusionEngine stand-in (a plain object, weak-referenceable like the real one)."""

    __slots__ = ("__weakref__",)


def fake_forge(state: dict[str, torch.Tensor], family: str, info) -> SimpleNamespace:
    """A Forge engine for `state` (sd1 or sdxl), parameters created under inference mode as Forge does."""
    arch = detect({k: tuple(v.shape) for k, v in state.items()})
    with torch.inference_mode():
        kmodel = torch.nn.Module()
        kmodel.diffusion_model = param_tree({k[len("model.diffusion_model."):]: v for k, v in state.items()
                                             if k.startswith("model.diffusion_model.")})
        joint = torch.nn.Module()
        if family == "sd1":
            joint.clip_l = _integrated_clip(arch.encoders[0], state)
        else:
            joint.clip_l = _integrated_clip(arch.encoders[0], state)
            g = arch.encoders[1]
            joint.clip_g = _integrated_clip(g, state, state[g.prefix + "text_projection"])
        for p in list(kmodel.parameters()) + list(joint.parameters()):
            p.requires_grad_(False)
    kmodel.lora_loader = FakeLoraLoader(kmodel)
    joint.lora_loader = FakeLoraLoader(joint)
    # Forge's KModel predictor: the SD schedule as sigmas
    kmodel.predictor = SimpleNamespace(prediction_type="eps",
                                       sigmas=((1 - sd_alphas_cumprod()) / sd_alphas_cumprod()).sqrt())
    unet = SimpleNamespace(model=kmodel, offload_device=torch.device("cpu"), load_device=torch.device("cpu"))
    clip = SimpleNamespace(cond_stage_model=joint, patcher=SimpleNamespace(model=joint))
    objects = SimpleNamespace(unet=unet, clip=clip)
    obj = ForgeEngineObject(forge_objects=objects, forge_objects_original=objects, sd_checkpoint_info=info,
                          is_sd1=family == "sd1", is_sd2=False, is_sdxl=family == "sdxl", current_lora_hash="[x]")
    if family == "sd1":
        obj.text_processing_engine = FakeForgeEngine(joint.clip_l, 1, True, False, 49407)
    else:
        obj.text_processing_engine_l = FakeForgeEngine(joint.clip_l, 2, False, False, 49407)
        obj.text_processing_engine_g = FakeForgeEngine(joint.clip_g, 2, False, True, 0)
    return obj
