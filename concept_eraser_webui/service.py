"""What the tab and the HTTP route do, in one place: erase, restore, preview, save, status, weights.

Every action returns plain data (JSON-able dicts, or images for the preview) and raises
`RequestError` (bad input: names the field) or the solver's `EraserError` (the message is for the user).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from concept_eraser.checkpoint import CheckpointModel, save_checkpoint, save_erasure
from concept_eraser.errors import Cancelled
from concept_eraser.patch import ErasurePatch
from concept_eraser.report import report_text

from .host import Host
from .inputs import EraseRequest, RequestError, SaveRequest, default_name
from .live import digest
from .model import host_arch
from .session import ErasureSession, Record

log = logging.getLogger("concept_eraser")

# A1111 converts SD1 checkpoints written by old transformers (no `text_model.` level) on load
# (sd_models.checkpoint_dict_replacements_sd1); the live keys have it, such files do not.
FILE_KEY_ALIASES = (("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),)


def record_summary(record: Record) -> dict:
    return {"method": record.method, **record.concepts, "params": record.params, "tensors": len(record.keys),
            "seconds": round(record.seconds, 3)}


def patch_for_file(patch: ErasurePatch, file_keys) -> ErasurePatch:
    """The patch with its keys renamed to the ones the checkpoint file uses (see FILE_KEY_ALIASES)."""
    keys = set(file_keys)
    edits = {}
    for key, stages in patch.edits.items():
        name = key
        if key not in keys:
            for live, stored in FILE_KEY_ALIASES:
                alias = stored + key[len(live):] if key.startswith(live) else None
                if alias in keys:
                    name = alias
                    break
        edits[name] = stages
    return replace(patch, edits=edits)


class Service:
    def __init__(self, host: Host, session: ErasureSession | None = None):
        self.host = host
        self.session = session or ErasureSession()

    # ---- status ----------------------------------------------------------------------------------
    def status(self, live=None) -> dict:
        live = live if live is not None else self.host.live(load=False)
        self.session.reconcile(live, self.host.live_for)
        return {"host": self.host.title, **self.session.status(live)}

    def on_model_loaded(self, obj) -> None:
        """The host loaded weights into `obj` (a new model, or another checkpoint into a reused one)."""
        self.session.model_loaded(obj, self.host.live_for)

    # ---- erase / restore -------------------------------------------------------------------------
    def erase(self, request: EraseRequest, id_task: str | None = None) -> dict:
        with self.host.job("Concept Eraser: erase", id_task) as state:
            live = self.host.live(load=True)
            record = self.session.erase(live, request.method, request.concepts, request.params,
                                        self.host.progress(state), lambda: self.host.interrupted(state),
                                        self.host.live_for)
            return {"erased": record_summary(record), "report": _report_brief(record.report),
                    "text": report_text(record.report, record.step.get("results")), "status": self.status(live),
                    **({"notice": record.dropped_before} if record.dropped_before else {})}

    def restore(self, id_task: str | None = None) -> dict:
        with self.host.job("Concept Eraser: restore", id_task):
            live = self.host.live(load=False)
            count = self.session.restore(live, self.host.live_for)
            return {"restored_tensors": count, "status": self.status(live)}

    # ---- inspection -------------------------------------------------------------------------------
    def weights(self, keys: Sequence[str] | None = None) -> dict:
        """SHA-256 of the live tensors (K/V by default, plus every tensor an erasure changed): lets API users
        check that Erase changed them and Restore gave the original bytes back."""
        live = self.host.live(load=False)
        if live is None:
            raise RequestError("model", "no checkpoint is loaded", 409)
        self.session.reconcile(live, self.host.live_for)
        arch = host_arch(live.tensors)
        wanted = list(keys) if keys else list(dict.fromkeys(list(arch.map_keys()) + list(self.session.backups)))
        unknown = [k for k in wanted if k not in live.tensors]
        if unknown:
            raise RequestError("keys", f"{unknown[0]} is not a tensor of the loaded model")
        with self.session.lock:
            live.settle()
            out = {}
            for key in wanted:
                tensor = live.tensors.read(key)
                out[key] = {"sha256": digest(tensor), "dtype": str(tensor.dtype).replace("torch.", ""),
                            "shape": list(tensor.shape), "changed": key in self.session.backups}
        return {"checkpoint": live.checkpoint.title, "tensors": out}

    def encode(self, prompts: Sequence[str]) -> dict:
        """The per-token features the solver gets for `prompts` from the host's own text encoder (clip skip
        and all), and which encoder layers they are: for checking what an erasure will work with."""
        live = self.host.live(load=False)
        if live is None:
            raise RequestError("model", "no checkpoint is loaded", 409)
        with self.session.lock:
            self.session.reconcile(live, self.host.live_for)
            live.settle()
            editable = live.editable(())
            encoded = editable.text_encoder.encode(list(prompts))
        return {"checkpoint": live.checkpoint.title, "prompts": list(prompts), "lengths": list(encoded.lengths),
                "encoders": [{"name": e.name, "hidden_layer": e.hidden_layer, "final_norm": e.final_norm}
                             for e in editable.arch.encoders],
                "features": encoded.features.float().cpu().tolist(),
                "pooled": encoded.pooled.float().cpu().tolist() if encoded.pooled is not None else None}

    # ---- preview ------------------------------------------------------------------------------------
    def preview(self, prompts: Sequence[str], settings: Mapping[str, Any], id_task: str | None = None):
        """[(image, caption)] original then erased for each prompt, same seed and settings; and the seed."""
        from .preview import render

        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            prompts = [c for r in self.session.records for c in r.concepts.get("erase", [])][:4]
        if not prompts:
            raise RequestError("prompts", "give the prompts to render (one per line)")
        seed = _seed(settings.get("seed"))
        with self.host.job("Concept Eraser: preview", id_task) as state:
            live = self.host.live(load=True)
            self.session.reconcile(live, self.host.live_for)
            if not self.session.owns(live):
                raise RequestError("preview", "no erasure is active on this checkpoint: Erase first", 409)
            state.job_count = 2 * len(prompts)
            erased = [render(prompt, seed, settings) for prompt in prompts]
            with self.session.originals(live):
                original = [render(prompt, seed, settings) for prompt in prompts]
            if self.host.interrupted(state):
                raise Cancelled("preview interrupted (the erased weights are back in place)")
        gallery = []
        for prompt, before, after in zip(prompts, original, erased):
            gallery.append((before, f"original · {prompt} · seed {seed}"))
            gallery.append((after, f"erased · {prompt} · seed {seed}"))
        return gallery, seed

    # ---- save ---------------------------------------------------------------------------------------
    def default_name(self) -> str:
        live = self.host.live(load=False)
        return default_name(live.checkpoint.filename if live else "model", self.session.records)

    def save(self, request: SaveRequest) -> dict:
        with self.host.job("Concept Eraser: save"):
            live = self.host.live(load=False)
            self.session.reconcile(live, self.host.live_for)
            if live is None or not self.session.owns(live):
                raise RequestError("format", "nothing to save: no erasure is active on the loaded checkpoint", 409)
            patch = self.session.patch
            if request.format == "checkpoint":
                return self._save_checkpoint(live, patch, request)
            last = self.session.records[-1]
            folder = self.host.lora_dir() if request.format == "lora" else self.host.patch_dir()
            folder.mkdir(parents=True, exist_ok=True)
            out = _target(folder, request)
            # dense edits as changes to the original weights (the backups), like the other hosts' patches
            save_erasure(request.format, out, patch, host_arch(live.tensors), solved_on=self.session.backups.get,
                         artifacts=last.artifacts, report=last.report, overwrite=request.overwrite)
            if request.format != "lora":
                return {"format": request.format, "path": str(out)}
            self.host.refresh_loras()
            return {"format": "lora", "path": str(out), "prompt": f"<lora:{out.stem}:1>"}

    def _save_checkpoint(self, live, patch: ErasurePatch, request: SaveRequest) -> dict:
        source = Path(live.checkpoint.filename)
        if source.suffix.lower() != ".safetensors":
            raise RequestError("format", f"the loaded checkpoint {source.name} is not a .safetensors file, so it "
                               "cannot be copied safely; save the erasure as a patch or a LoRA instead", 409)
        folder = self.host.checkpoint_dir()
        out = _target(folder, request)
        if out.resolve() == source.resolve():
            raise RequestError("name", "that is the loaded checkpoint's own file; choose another name")
        config = source.with_suffix(".yaml")  # A1111 reads a checkpoint's own config from <name>.yaml beside it
        out_config = out.with_suffix(".yaml")
        if out_config.exists() and not request.overwrite:
            raise RequestError("name", f"{out_config.name} already exists in {folder} (the WebUI would read it as the "
                               "new checkpoint's config); choose another name or tick Overwrite", 409)
        model = CheckpointModel(source)
        save_checkpoint(model, patch_for_file(patch, model.reader.keys()), out, overwrite=request.overwrite,
                        extra_meta={"concept_eraser.host": self.host.title})
        if config.exists():
            shutil.copyfile(config, out_config)
        elif out_config.exists():  # overwritten: the old file's config is not the new one's
            out_config.unlink()
        self.host.refresh_checkpoints()
        info = self.host.find_checkpoint(out)
        return {"format": "checkpoint", "path": str(out), "title": getattr(info, "title", out.name)}


def _target(folder: Path, request: SaveRequest) -> Path:
    out = folder / f"{request.name}.safetensors"
    if out.exists() and not request.overwrite:
        raise RequestError("name", f"{out.name} already exists in {folder}; choose another name or tick Overwrite", 409)
    return out


def _seed(value) -> int:
    try:
        seed = int(float(value)) if value not in (None, "") else -1
    except (TypeError, ValueError):
        raise RequestError("seed", f"{value!r} is not a whole number") from None
    return random.randrange(2**32) if seed < 0 else seed


def _report_brief(report: Mapping[str, Any]) -> dict:
    """The report without the per-layer table (kept short for the route and the tab)."""
    return {k: v for k, v in report.items() if k not in ("layers",)}


__all__ = ["Service", "record_summary", "patch_for_file"]
