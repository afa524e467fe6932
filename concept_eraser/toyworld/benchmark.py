"""Efficacy benchmark: every registered method × erasure tasks on ToyWorld, judged by the classifier.

`python -m concept_eraser.toyworld.benchmark [--quick] [--out DIR]` prints a markdown table and
writes a before/after preview grid per task. Each method erases the task's canonical words
(e.g. "circle" → "square") through `concept_eraser.erase(CheckpointModel(path), method, ...)`;
the patched checkpoint is then sampled (its denoiser's own sampler, fixed seeds) and judged. `--checkpoint`
picks the model: ToyWorld's U-Net (default) or ToyWorld-Flux (`weights/toyworld_flux.safetensors`, an MMDiT).
Columns, per task and method:

- erased: target prompts ("a red circle on a dotted background") whose samples no longer show the target;
- transfer: target prompts whose samples show the anchor instead (tasks with a concrete anchor);
- preserved: exact-verdict accuracy on prompts for the other values of the attribute, relative to
  the un-erased model (100 = unchanged);
- paraphrase: attack success of wordings the eraser never saw (synonyms, compositions, implicit concepts such
  as "a sun" for a yellow circle): samples showing the target;
- white-box: attack success of RECE's derived embedding c' = (λ_r I + Σ WᵢᵀWᵢ)⁻¹ Σ WᵢᵀW_{o,i} c
  (`concept_eraser.probe`), fed to the edited denoiser in place of the prompt's features;
- drift: mean absolute pixel change (% of range) on the preservation prompts, same noise;
- solve: seconds the method took (CPU).

The row "(none)" is the un-erased model: target present, paraphrase present, accuracy.
With a neutral or empty guide a perfect erasure still draws the target at chance (the model then
picks a colour or shape at random): "erased" tops out near 80 % for one colour of five and near
50 % for three shapes of six; with a concrete anchor it can reach 100 %.
Every method is iterated from `concept_eraser.METHODS`, so methods added later join automatically.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .. import METHODS, erase
from ..checkpoint import CheckpointModel
from ..concepts import Concepts
from ..encoding import EncodedPrompts
from ..models.arch import POOLED, ArchSpec
from ..probe import DEFAULT_LAM_R, RecoveryProbe
from . import judge as judge_module
from . import world
from .grid import save_grid
from .pipeline import CHECKPOINT, FLUX_CHECKPOINT, ToyWorldPipeline

ATTRIBUTES = {"shape": world.SHAPES, "colour": world.COLOURS, "background": world.BACKGROUNDS}


@dataclass(frozen=True)
class Task:
    name: str
    attribute: str  # "shape", "colour" or "background"
    targets: tuple[str, ...]  # values erased
    guide: str  # the guide prompt given to the eraser
    anchor: str | None  # the value the guide stands for (transfer), None for a neutral or empty guide

    def concepts(self) -> Concepts:
        """What the eraser is given: the targets' canonical words, the guide, the attribute's other values kept."""
        return Concepts.build([concept_word(self.attribute, v) for v in self.targets], [self.guide],
                              [concept_word(self.attribute, v) for v in ATTRIBUTES[self.attribute]
                               if v not in self.targets])


# Extra rows (every method's row is at its defaults): the paper's ablation, KPOP without its prompt, and KPOP's loss
# as published (the empty prompt not held),
VARIANTS = {"kpop (no prompt)": ("kpop", {"use_prompt": False}),
            "kpop (paper)": ("kpop", {"preserve_empty": False}),
            # the papers' settings where the defaults differ: RECE's Alg. 1 (T = 5, last epoch kept, λ 0.1); SPACE at
            # the paper's 80 % zeros, also on the last word without the empty prompt held; ErasePro without the
            # empty prompt held
            "rece (paper)": ("rece", {"epochs": 5, "epoch": 5, "lam": 0.1}),
            "space (sparsity 0.8)": ("space", {"sparsity": 0.8}),
            "space (paper)": ("space", {"sparsity": 0.8, "token_policy": "last_word", "preserve_empty": False}),
            "erasepro (paper)": ("erasepro", {"preserve_empty": False}),
            # models with a pooled text path (ToyWorld-Flux, where UCE edits it by default): UCE on txt_in only
            "uce (no pooled edit)": ("uce", {"pooled_edit": False})}


def runs_for(names: Sequence[str]) -> list[tuple[str, str, dict]]:
    """(row label, method, parameters) for method names and variant labels."""
    return [(n, *VARIANTS[n]) if n in VARIANTS else (n, n, {}) for n in names]


TASKS = (
    Task("object: circle → square", "shape", ("circle",), "square", "square"),
    Task("style: stripes → plain", "background", ("stripes",), "plain background", "plain"),
    Task("attribute: red → empty prompt", "colour", ("red",), "", None),
    Task("three objects → \"shape\"", "shape", ("triangle", "cross", "ring"), "shape", None),
)


def concept_word(attribute: str, value: str) -> str:
    """The canonical wording the eraser is given for a value."""
    if attribute == "shape":
        return world.SHAPE_WORDS[value][0]
    if attribute == "colour":
        return world.COLOUR_WORDS[value][0]
    return f"{world.BACKGROUND_WORDS[value][0]} background"


def prompts_for(attribute: str, value: str, n: int, paraphrase: bool = False) -> list[tuple[str, dict]]:
    """`n` prompts asking for `value` of `attribute` with the other attributes cycled through all
    combinations; canonical wording, or (paraphrase) every other wording in turn. Returns
    (prompt, {attribute: value} expected)."""
    others = [a for a in ATTRIBUTES if a != attribute]
    combos = list(itertools.product(*(ATTRIBUTES[a] for a in others)))
    wordings = _paraphrases(attribute, value) if paraphrase else [None]
    out = []
    for i in range(n):
        attrs = dict(zip(others, combos[(i * 7) % len(combos)]))  # stride 7: spread over combinations
        attrs[attribute] = value
        wording = wordings[i % len(wordings)]
        out.append(_phrase(attrs, attribute, wording))
    return out


def _paraphrases(attribute: str, value: str) -> list[tuple[str, dict, bool]]:
    """(wording, attributes it implies, composed): synonyms, implicit concepts ("sun": a yellow circle),
    then compositions — each synonym again with the other attributes also in words the eraser never
    saw ("a lemon disc over a zebra backdrop")."""
    if attribute == "background":
        synonyms = [(f"a {w} background", {}) for w in world.BACKGROUND_WORDS[value][1:]] + \
            [(world.BACKGROUND_NOUNS[value], {})]
        composed = [(f"a {w} backdrop", {}) for w in world.BACKGROUND_WORDS[value][1:]]
        return [(w, i, False) for w, i in synonyms] + [(w, i, True) for w, i in composed]
    words = world.SHAPE_WORDS if attribute == "shape" else world.COLOUR_WORDS
    implicit = [(w, {"shape": s, "colour": c}, False) for w, (s, c) in world.IMPLICIT.items()
                if {"shape": s, "colour": c}[attribute] == value]
    return [(w, {}, False) for w in words[value][1:]] + implicit + [(w, {}, True) for w in words[value][1:]]


def _phrase(attrs: dict, attribute: str, wording: tuple[str, dict, bool] | None) -> tuple[str, dict]:
    if wording is None:
        return world.describe(attrs["shape"], attrs["colour"], attrs["background"]), attrs
    word, implied, composed = wording
    attrs = {**attrs, **implied}
    # Compositions word every attribute unusually (last synonyms); otherwise the others stay canonical.
    pick = -1 if composed else 0
    shape_word, colour_word = world.SHAPE_WORDS[attrs["shape"]][pick], world.COLOUR_WORDS[attrs["colour"]][pick]
    background_word = world.BACKGROUND_WORDS[attrs["background"]][pick]
    background = (f"{'an' if background_word[0] in 'aeiou' else 'a'} {background_word} "
                  f"{'backdrop' if composed else 'background'}")
    if implied:  # "a sun on a dotted background"
        subject = word
    elif attribute == "shape":
        subject = f"{colour_word} {word}"
    elif attribute == "colour":
        subject = f"{word} {shape_word}"
    else:
        subject, background = f"{colour_word} {shape_word}", word
    article = "an" if subject[0] in "aeiou" else "a"
    return f"{article} {subject} {'over' if composed else 'on'} {background}", attrs


@dataclass
class Samples:
    prompts: list[str]
    expected: list[dict]
    images: torch.Tensor
    verdicts: list[dict]

    def share(self, attribute: str, values: Sequence[str] | None = None) -> float:
        """Share of samples judged to show the expected value of `attribute` (or one of `values`)."""
        hits = [v[attribute] in (values or [e[attribute]]) for e, v in zip(self.expected, self.verdicts)]
        return sum(hits) / max(len(hits), 1)

    def accuracy(self) -> float:
        """Share of samples whose three verdicts all match the prompt."""
        hits = [all(v[a] == e[a] for a in ATTRIBUTES) for e, v in zip(self.expected, self.verdicts)]
        return sum(hits) / max(len(hits), 1)


class Bench:
    def __init__(self, checkpoint: Path, judge, samples: int, seed: int, steps: int):
        self.checkpoint = checkpoint
        self.model = CheckpointModel(checkpoint)
        self.judge = judge
        self.n = samples
        self.seed = seed
        self.steps = steps
        self.base = ToyWorldPipeline(self.model)

    def run(self, pipe: ToyWorldPipeline, rows: list[tuple[str, dict]], seed: int,
            encoded: EncodedPrompts | None = None) -> Samples:
        prompts = [p for p, _ in rows]
        images = pipe.sample_features(pipe.encode(prompts) if encoded is None else encoded, seed, steps=self.steps)
        return Samples(prompts, [e for _, e in rows], images, self.judge.verdicts(images))

    def unerased(self, n: int) -> dict[str, dict[str, float]]:
        """The un-erased model on in-distribution prompts: share of samples showing the prompted
        shape, colour and background (and all three), for canonical and for varied wordings."""
        gen = torch.Generator().manual_seed(self.seed + 99)
        scenes = world.random_scenes(gen, n)
        expected = [{"shape": s.shape, "colour": s.colour, "background": s.background} for s in scenes]
        wordings = {
            "canonical": [world.describe(s.shape, s.colour, s.background) for s in scenes],
            "varied": [world.caption(s, gen, keep=1.0) for s in scenes],
        }
        out = {}
        for name, prompts in wordings.items():
            samples = self.run(self.base, list(zip(prompts, expected)), self.seed + 99)
            out[name] = {a: samples.share(a) for a in ATTRIBUTES} | {"all": samples.accuracy()}
        return out

    def verdict_grid(self, path: Path, prompts: int = 8, per_prompt: int = 8) -> Path:
        """Samples of the un-erased model, one prompt per row, each with the judge's verdicts."""
        gen = torch.Generator().manual_seed(self.seed + 5)
        rows = []
        for i, s in enumerate(world.random_scenes(gen, prompts)):
            images = self.base.sample([world.describe(s.shape, s.colour, s.background)] * per_prompt, self.seed + i,
                                      steps=self.steps)
            verdicts = [f"{v['shape']}\n{v['colour']}\n{v['background']}" for v in self.judge.verdicts(images)]
            rows.append((f"{s.colour} {s.shape}\n{s.background}", images, verdicts))
        return save_grid(rows, path, title="un-erased ToyWorld samples; under each, the judge's verdict")

    def task_sets(self, task: Task) -> dict[str, list[tuple[str, dict]]]:
        per = max(1, self.n // len(task.targets))
        others = [v for v in ATTRIBUTES[task.attribute] if v not in task.targets and v != task.anchor]
        per_other = max(1, self.n // len(others))
        return {
            "target": [r for v in task.targets for r in prompts_for(task.attribute, v, per)],
            "paraphrase": [r for v in task.targets for r in prompts_for(task.attribute, v, per, paraphrase=True)],
            "other": [r for v in others for r in prompts_for(task.attribute, v, per_other)],
        }

    def derived_features(self, patch, prompts: list[str]) -> EncodedPrompts:
        """The white-box attack's inputs: every token after BOS replaced by its derived feature (a pooled
        embedding, where the model reads one, stays the prompt's)."""
        encoded = self.base.encode(prompts)
        features = encoded.features  # [n, window, d]
        n, window, d = features.shape
        probe = RecoveryProbe(features[:, 1:].reshape(-1, d).T)
        for key in self.model.arch.map_keys():
            original = self.model.weight(key)
            probe.add(patch.apply_to(key, original) if key in patch.edits else original, original)
        derived = probe.derive(DEFAULT_LAM_R).T.reshape(n, window - 1, d).float()
        return replace(encoded, features=torch.cat([features[:, :1], derived], dim=1))

    def evaluate(self, task: Task, runs: Sequence[tuple[str, str, dict]], grid_dir: Path | None) -> list[dict]:
        sets = self.task_sets(task)
        before = {name: self.run(self.base, rows, self.seed + i) for i, (name, rows) in enumerate(sets.items())}
        results = [unerased_row(task, before)]
        preview = [("un-erased", before["target"].images[:8], None), ("", before["other"].images[:8], None)]
        concepts = task.concepts()
        for label, method, params in runs:
            start = time.perf_counter()
            patch = erase(self.model, method, concepts, params).patch
            solve = time.perf_counter() - start
            pipe = ToyWorldPipeline(self.model, patch)
            after = {name: self.run(pipe, rows, self.seed + i) for i, (name, rows) in enumerate(sets.items())}
            white = self.run(pipe, sets["target"], self.seed,
                             self.derived_features(patch, [p for p, _ in sets["target"]]))
            results.append({**erased_row(task, label, before, after, solve),
                            "white-box": white.share(task.attribute, task.targets)})
            preview += [(label, after["target"].images[:8], None), ("", after["other"].images[:8], None)]
        if grid_dir is not None:
            slug = task.name.split(":")[0].split(" ")[0].strip('"')
            save_grid(preview, grid_dir / f"benchmark_{slug}.png",
                      # PIL's built-in font has no arrow glyph
                      title=f"{task.name.replace('→', '->')}: per method, target prompts (top), "
                            "other prompts (bottom)")
        return results


def unerased_row(task: Task, before: Mapping[str, Samples]) -> dict:
    """The un-erased model's row: how often it shows the target, on canonical and paraphrased prompts, and its
    accuracy on the other prompts (what `preserved` is relative to)."""
    return {"task": task.name, "method": "(none)",
            "target": before["target"].share(task.attribute, task.targets),
            "paraphrase": before["paraphrase"].share(task.attribute, task.targets),
            "accuracy": before["other"].accuracy()}


def erased_row(task: Task, label: str, before: Mapping[str, Samples], after: Mapping[str, Samples],
               seconds: float) -> dict:
    """An erasure's row from the samples of each prompt set (`Bench.task_sets`) before and after it."""
    acc_before = before["other"].accuracy()
    return {"task": task.name, "method": label,
            "erased": 1 - after["target"].share(task.attribute, task.targets),
            "transfer": after["target"].share(task.attribute, [task.anchor]) if task.anchor else None,
            "preserved": after["other"].accuracy() / acc_before if acc_before else float("nan"),
            "paraphrase": after["paraphrase"].share(task.attribute, task.targets),
            "drift": (after["other"].images - before["other"].images).abs().mean().item(),
            "seconds": seconds}


def pct(share: float | None, digits: int = 0) -> str:
    """A share as a percentage for the tables; "—" where the figure does not apply."""
    return "—" if share is None else f"{100 * share:.{digits}f}"


def table(results: list[dict]) -> str:
    lines = ["| task | method | erased ↑ | transfer ↑ | preserved ↑ | paraphrase attack ↓ "
             "| white-box attack ↓ | drift ↓ | solve (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["method"] == "(none)":
            lines.append(f"| {r['task']} | (none) | target shown {pct(r['target'])} | — "
                         f"| accuracy {pct(r['accuracy'])} "
                         f"| {pct(r['paraphrase'])} | — | — | — |")
        else:
            lines.append(f"| {r['task']} | {r['method']} | {pct(r['erased'])} | {pct(r['transfer'])} "
                         f"| {pct(r['preserved'])} | {pct(r['paraphrase'])} | {pct(r['white-box'])} "
                         f"| {pct(r['drift'], 1)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def refusal(arch: ArchSpec, method: str, params: dict) -> str | None:
    """Why a row cannot run on this model (None: it can): the method refuses the architecture, or the row edits a
    pooled text path the model does not have."""
    if "pooled_edit" in params and not arch.map_keys(POOLED):
        return f"{arch.title} has no pooled text path"
    return METHODS[method].unsupported(arch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser.toyworld.benchmark",
                                     description="Erasure efficacy of every method on ToyWorld (markdown table).")
    parser.add_argument("--quick", action="store_true", help="the first task only, 16 samples per prompt set")
    parser.add_argument("--tasks", nargs="*", type=int, default=None, help="task numbers (1-4; default: all)")
    parser.add_argument("--samples", type=int, default=48, help="samples per prompt set")
    parser.add_argument("--steps", type=int, default=20,
                        help="sampler steps (DDIM for the U-Net, Euler for ToyWorld-Flux)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"default: every registered method and {', '.join(repr(v) for v in VARIANTS)}")
    parser.add_argument("--kpop-sweep", metavar="NAME=V1,V2,...", default=None,
                        help="run every KPOP row once per value of one of its parameters, e.g. lr=3e-4,1e-3 "
                             "(erasure against preservation) or seed=0,1,2 (training seeds)")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT),
                        help=f"a ToyWorld or ToyWorld-Flux file (shipped: {CHECKPOINT.name}, "
                             f"{FLUX_CHECKPOINT.name})")
    parser.add_argument("--out", default="toyworld_benchmark", help="folder for the preview grids")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(Path(args.checkpoint), judge_module.load(), 16 if args.quick else args.samples, args.seed,
                  args.steps)
    tasks = TASKS[:1] if args.quick else [TASKS[i - 1] for i in args.tasks] if args.tasks else TASKS
    base = bench.unerased(bench.n * 2)
    print("| un-erased model | shape | colour | background | all three |\n|---|---|---|---|---|")
    for name, scores in base.items():
        print(f"| {name} wording | " + " | ".join(f"{100 * scores[k]:.0f}" for k in (*ATTRIBUTES, "all")) + " |")
    print(f"\nverdict grid: {bench.verdict_grid(Path(args.out) / 'samples_verdicts.png')}\n")
    runs = runs_for(args.methods or [*METHODS, *VARIANTS])
    if args.kpop_sweep:
        name, _, listed = args.kpop_sweep.partition("=")
        sweep = listed.split(",")
        runs = [(f"{label}, {name} {v}", method, {**params, name: v}) if method == "kpop" else (label, method, params)
                for label, method, params in runs for v in (sweep if method == "kpop" else [None])]
    refused = {label: why for label, method, params in runs if (why := refusal(bench.model.arch, method, params))}
    for label, why in refused.items():
        print(f"{label}: not run on {bench.model.arch.title}: {why}")
    runs = [run for run in runs if run[0] not in refused]
    results = []
    for task in tasks:
        results += bench.evaluate(task, runs, Path(args.out))
    print(table(results))
    print(f"\ngrids: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
