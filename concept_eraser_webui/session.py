"""The erasures applied to the loaded model, in place, and how to take them back.

One `ErasureSession` per WebUI process. Erase solves on the model's current weights (earlier
erasures included, so erasures stack), then writes the new values into the live tensors, keeping a
CPU copy of every tensor the first time it changes: Restore copies those back, bit for bit.

The state belongs to one model object holding one checkpoint (file + hash). When the WebUI loads
other weights into that object, the edit is gone with them and the state is dropped without writing
(not when the tensors still hold what was written: A1111 reports a new VAE as a loaded model too).
When it makes another model object current while ours stays in memory (A1111 keeps several with
"Maximum number of checkpoints loaded at the same time" > 1), ours is first restored, so that
switching back gives the checkpoint as it is on disk. Tensors are checked against exact fingerprints
of what was written before anything is written back, so a backup never lands on weights it does not
belong to.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from concept_eraser import erase as solve
from concept_eraser.concepts import Concepts
from concept_eraser.editable import EditableModel, Progress
from concept_eraser.errors import Cancelled, EraserError
from concept_eraser.methods import METHODS
from concept_eraser.patch import ErasurePatch, check_finite

from .live import LiveTensors, digest

log = logging.getLogger("concept_eraser")


@dataclass(frozen=True)
class CheckpointId:
    """Which checkpoint a model object holds: its file and, where the host computed it, its SHA-256."""

    filename: str
    title: str
    sha256: str | None = None

    def short(self) -> str:
        return (self.sha256 or "")[:10]

    def matches(self, other: "CheckpointId | None") -> bool:
        if other is None or other.filename != self.filename:
            return False
        return not (self.sha256 and other.sha256 and self.sha256 != other.sha256)


class LiveModel(Protocol):
    """What the session needs from the host for one loaded model object (see `host.py`)."""

    obj: Any
    checkpoint: CheckpointId
    tensors: LiveTensors

    def settle(self) -> None:
        """Put back weights the host's LoRA machinery swapped in, so the tensors hold the base weights."""

    def after_write(self) -> None:
        """Tell the host its weights changed (cached conditionings, LoRA caches, model reloads)."""

    def editable(self, prior_steps: Sequence[dict]) -> EditableModel:
        """The solver's view of this model (weights by checkpoint key, the host's text encoder)."""

    def file_steps(self) -> tuple[dict, ...]:
        """Provenance of erasures already baked into the checkpoint file (its metadata)."""


@dataclass
class Record:
    """One erasure as applied: what it did, and its provenance step (as written into saved files)."""

    method: str
    concepts: dict
    params: dict
    keys: tuple[str, ...]
    seconds: float
    step: dict
    report: dict = field(repr=False, default_factory=dict)
    artifacts: dict = field(repr=False, default_factory=dict)  # KPOP's learned prompt (Save as learned_prompt)
    dropped_before: str | None = None  # why earlier erasures were dropped, if they were since the last action


class ErasureSession:
    def __init__(self):
        self.lock = threading.RLock()
        self.notice: str | None = None  # why erasures were dropped, shown with the status until the next erasure
        self._clear()

    def _clear(self) -> None:
        self._model: weakref.ReferenceType | None = None
        self.checkpoint: CheckpointId | None = None
        self.backups: dict[str, torch.Tensor] = {}  # key → original tensor (CPU, host dtype)
        self.written: dict[str, str] = {}  # key → fingerprint of what the last erasure wrote
        self.records: list[Record] = []
        self.patch: ErasurePatch | None = None  # all erasures composed, oldest first
        self.base_steps: tuple[dict, ...] = ()  # erasures already in the checkpoint file

    # ---- state ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.records)

    def model_object(self):
        return self._model() if self._model is not None else None

    def owns(self, live: LiveModel | None) -> bool:
        return live is not None and self.active and self.model_object() is live.obj

    def reconcile(self, live: LiveModel | None,
                  live_for: Callable[[Any], LiveModel | None] | None = None) -> str | None:
        """Drop the state when the model it belongs to no longer holds it (checked lazily before every
        action; the host's model-loaded callback goes through `model_loaded`). Returns what happened, or None."""
        with self.lock:
            if not self.active:
                return None
            ours = self.model_object()
            where = self.checkpoint.title if self.checkpoint else "the previous checkpoint"
            if ours is None:
                return self._drop(f"the model the erasures were applied to ({where}) was unloaded: erasures dropped")
            if live is not None and live.obj is ours:
                if not live.checkpoint.matches(self.checkpoint):
                    return self._drop(f"weights were reloaded into the model ({where} → {live.checkpoint.title}): "
                                      "erasures dropped")
                return None
            if live is None:
                return None  # nothing current (being loaded); keep the state until we know more
            # another model object is current; ours may still sit in memory, erased: restore it
            restored = False
            try:
                old = live_for(ours) if live_for else None
                restored = old is not None and old.checkpoint.matches(self.checkpoint) and self._write_back(old)
            finally:
                notice = self._drop(f"checkpoint changed ({where} → {live.checkpoint.title}): erasures dropped"
                                    + ("; the erased model still in memory was restored" if restored else ""))
            return notice

    def model_loaded(self, obj, live_for: Callable[[Any], LiveModel | None]) -> str | None:
        """The host just loaded weights into `obj`. If that is our model object, its erasure is gone with
        its old weights, unless its tensors still hold what was written (A1111 calls this after loading only
        another VAE); otherwise another model became current, and ours (if still in memory) is restored."""
        with self.lock:
            if not self.active:
                return None
            ours = self.model_object()
            where = self.checkpoint.title if self.checkpoint else "the previous checkpoint"
            try:
                live = live_for(obj)
                loaded = live.checkpoint.title
            except Exception:  # noqa: BLE001 - cannot look at it: its weights are not ours
                live, loaded = None, "another checkpoint"
            if (ours is obj and live is not None and live.checkpoint.matches(self.checkpoint)
                    and self._holds_written(live)):
                return None  # A1111 also calls this after reloading only the VAE: the erased weights are in place
            if ours is None or ours is obj:
                return self._drop(f"{loaded} was loaded into the model that held the erasures on {where}: "
                                  "erasures dropped (the weights are the new file's)")
            try:
                old = live_for(ours)
                restored = old is not None and old.checkpoint.matches(self.checkpoint) and self._write_back(old)
            except Exception:  # noqa: BLE001 - cannot look at it any more: nothing to restore into
                restored = False
            return self._drop(f"{loaded} was loaded: the erasures on {where} were dropped"
                              + ("; the erased model still in memory was restored" if restored else ""))

    def _drop(self, notice: str) -> str:
        """Forget the erasures (their weights are gone or restored) and say so: in the status until the next
        erasure, and in the WebUI's console (a warning: the WebUI shows warnings, not info)."""
        self._clear()
        self.notice = notice
        log.warning("concept_eraser: %s", notice)
        return notice

    def _write_back(self, live: LiveModel) -> bool:
        """Restore originals into `live` if every edited tensor still holds exactly what was written.
        False (and nothing written) when it does not, or when the model cannot be read any more (A1111
        moves a model it discards to the "meta" device)."""
        if not self._holds_written(live):
            return False
        for key, original in self.backups.items():
            live.tensors.write(key, original)
        live.after_write()
        return True

    def _holds_written(self, live: LiveModel) -> bool:
        """Whether every edited tensor of `live` still holds exactly what the last erasure wrote (False when the
        model cannot be read any more: A1111 moves a model it discards to the "meta" device)."""
        try:
            live.settle()
            return all(key in live.tensors and digest(live.tensors.read(key)) == expected
                       for key, expected in self.written.items())
        except Exception:  # noqa: BLE001 - an unreadable model holds nothing of ours
            return False

    # ---- erase ---------------------------------------------------------------------------------
    def erase(self, live: LiveModel, method: str, concepts: Concepts, params: Mapping[str, Any] | None,
              progress: Progress, interrupted: Callable[[], bool] = lambda: False,
              live_for: Callable[[Any], LiveModel | None] | None = None) -> Record:
        """Solve on the current weights and write the result into the model. The model is unchanged if
        the solve fails or is interrupted (the solver never touches it; writing is all or nothing)."""
        with self.lock:
            self.reconcile(live, live_for)
            live.settle()
            prior = (self.base_steps if self.active else live.file_steps()) + tuple(r.step for r in self.records)
            result = solve(live.editable(prior), method, concepts, params, progress)
            if interrupted():
                raise Cancelled("interrupted: nothing was changed")
            start = time.perf_counter()
            before: dict[str, torch.Tensor] = {}
            new_backups: list[str] = []
            fingerprints: dict[str, str] = {}
            try:
                for key in result.patch.edits:
                    current = live.tensors.read(key)
                    new = result.patch.apply_to(key, current)
                    check_finite(key, new)
                    new = new.to(current.dtype)
                    saved = current.cpu()
                    before[key] = saved
                    if key not in self.backups:
                        self.backups[key] = saved
                        new_backups.append(key)
                    live.tensors.write(key, new)
                    fingerprints[key] = digest(new)
            except BaseException:
                for key, value in before.items():
                    live.tensors.write(key, value)
                for key in new_backups:
                    self.backups.pop(key, None)
                live.after_write()
                raise
            live.after_write()
            if not self.active:
                self._model = weakref.ref(live.obj)
                self.checkpoint = live.checkpoint
                self.base_steps = live.file_steps()
            self.written.update(fingerprints)
            self.patch = result.patch if self.patch is None else self.patch.then(result.patch)
            step = result.patch.steps[-1] if result.patch.steps else {}
            record = Record(result.report["method"], result.report["concepts"], result.report["params"],
                            tuple(result.patch.edits), result.report["seconds"] + time.perf_counter() - start,
                            step, result.report, result.artifacts, self.notice)
            self.records.append(record)
            self.notice = None  # said with this erasure's result instead
            return record

    # ---- restore -------------------------------------------------------------------------------
    def restore(self, live: LiveModel | None, live_for: Callable[[Any], LiveModel | None] | None = None) -> int:
        """Put every changed tensor back as it was before the first erasure. Returns how many."""
        with self.lock:
            self.reconcile(live, live_for)
            if not self.active or live is None:
                return 0
            live.settle()
            for key, original in self.backups.items():
                live.tensors.write(key, original)
            live.after_write()
            count = len(self.backups)
            self._clear()
            return count

    @contextmanager
    def originals(self, live: LiveModel) -> Iterator[None]:
        """Inside: the model holds its original tensors; afterwards (also on errors and interrupts) the
        erased ones again, checked against their fingerprints."""
        with self.lock:
            if not self.owns(live):
                yield
                return
            live.settle()
            erased = {key: live.tensors.read(key).cpu() for key in self.backups}
            for key, original in self.backups.items():
                live.tensors.write(key, original)
            live.after_write()
            try:
                yield
            finally:
                # skipped when the host loaded other weights meanwhile (its callback dropped the state)
                if self.owns(live) and live.checkpoint.matches(self.checkpoint):
                    live.settle()
                    for key, value in erased.items():
                        live.tensors.write(key, value)
                    live.after_write()
                    bad = [k for k, d in self.written.items() if digest(live.tensors.read(k)) != d]
                    if bad:
                        raise EraserError(f"the erased weights could not be put back exactly ({bad[0]})")

    def _file_steps(self, live: LiveModel | None) -> tuple[dict, ...]:
        if self.active:
            return self.base_steps
        return live.file_steps() if live is not None else ()

    # ---- report --------------------------------------------------------------------------------
    def status(self, live: LiveModel | None) -> dict:
        with self.lock:
            checkpoint = live.checkpoint if live is not None else None
            out = {
                "checkpoint": checkpoint.title if checkpoint else None,
                "sha256": checkpoint.sha256 if checkpoint else None,
                "erasures": [
                    {"method": r.method, "erase": r.concepts.get("erase", []), "guide": r.concepts.get("guide", []),
                     "preserve": r.concepts.get("preserve", []), "params": r.params, "tensors": len(r.keys),
                     "seconds": round(r.seconds, 3)}
                    for r in self.records
                ],
                "changed_tensors": len(self.backups),
                "baked_in_file": _concepts(self._file_steps(live)),
            }
            if self.notice:
                out["notice"] = self.notice
            out["text"] = status_text(out)
            return out


def _concepts(steps) -> list:
    return [s.get("concepts", {}).get("erase", []) for s in steps]


def status_text(status: Mapping[str, Any]) -> str:
    """One line for the tab: which erasures are active on which checkpoint."""
    if not status.get("checkpoint"):
        return "No checkpoint loaded."
    name = status["checkpoint"]
    baked = [", ".join(c) for c in status.get("baked_in_file") or [] if c]
    file_note = f" (the file itself already has erased: {'; '.join(baked)})" if baked else ""
    if not status.get("erasures"):
        return f"No erasure active on {name}: the weights are the file's{file_note}."
    parts = []
    for i, e in enumerate(status["erasures"], 1):
        targets = ", ".join(e["erase"])
        guides = sorted(set(e["guide"]))
        to = f" → {', '.join(repr(g) for g in guides)}" if guides and guides != [""] else ""
        keep = f", keeping {', '.join(e['preserve'])}" if e["preserve"] else ""
        parts.append(f"{i}. {METHODS[e['method']].title}: {targets}{to}{keep}")
    return (f"{len(status['erasures'])} erasure(s) active on {name}, {status['changed_tensors']} tensors changed in "
            f"memory (Restore puts the originals back): " + "; ".join(parts) + file_note)
