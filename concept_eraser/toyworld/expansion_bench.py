"""Concept expansion on ToyWorld: each method with and without `expand`, against a paraphrase attack it never sees.

`python -m concept_eraser.toyworld.expansion_bench [--quick] [--expand 8] [--curve 1 2 4 8 16]` prints
markdown tables. Same tasks, prompts, seeds and judge as `benchmark`; the eraser gets the same canonical
words and preserved values, plus (with expansion) the wordings `concept_eraser.expansion` adds. Columns:
erased, preserved, paraphrase (the benchmark's own attack) and **unseen attack**: prompts composed
differently from both the benchmark's lists and anything the expansion builds — every synonym and
implicit word of the target in full captions whose other attributes use other synonyms or noun forms
("a scarlet ball over checks", "a violet wedge on stripes", "a cherry over a speckled background").
The expansion only ever sees the targets, guides, preserved words and the vocabulary, so no attack
prompt is among its candidates. `--curve` adds the trade-off: number of added wordings against both
attacks and preservation.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from .. import erase
from ..params import parse_assignments
from . import judge as judge_module
from . import world
from .benchmark import ATTRIBUTES, TASKS, Bench, Task, erased_row, pct
from .pipeline import CHECKPOINT, ToyWorldPipeline

METHODS = ("uce", "rece", "space", "erasepro")


def _article(text: str) -> str:
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def _background(value: str, i: int) -> str:
    """Background words the benchmark's attack never pairs with a paraphrase: noun form or a middle synonym."""
    if i % 2 == 0:
        return f"{('over', 'on')[i // 2 % 2]} {world.BACKGROUND_NOUNS[value]}"
    return f"{('on', 'over')[i // 2 % 2]} {_article(world.BACKGROUND_WORDS[value][2])} background"


def unseen_attack(attribute: str, value: str, n: int) -> list[tuple[str, dict]]:
    """`n` prompts that ask for `value` of `attribute` with one of its non-canonical wordings, composed
    unlike the benchmark's lists: the other attributes worded by their middle synonyms, or left unsaid
    where the caption grammar allows it (a colour-less shape), backgrounds in noun form."""
    if attribute == "background":
        words = [f"{w} background" for w in world.BACKGROUND_WORDS[value][1:]] + [world.BACKGROUND_NOUNS[value]]
        implied = [{}] * len(words)
    else:
        table = world.SHAPE_WORDS if attribute == "shape" else world.COLOUR_WORDS
        words = list(table[value][1:])
        implied = [{}] * len(words)
        for noun, (shape, colour) in world.IMPLICIT.items():
            if {"shape": shape, "colour": colour}[attribute] == value:
                words.append(noun)
                implied.append({"shape": shape, "colour": colour})
    others = [a for a in ATTRIBUTES if a != attribute]
    combos = list(itertools.product(*(ATTRIBUTES[a] for a in others)))
    rows = []
    for i in range(n):
        word, imp = words[i % len(words)], implied[i % len(words)]
        attrs = dict(zip(others, combos[(i * 11 + 5) % len(combos)]))  # another stride than the benchmark's 7
        attrs[attribute] = value
        attrs.update(imp)
        if attribute == "background":
            subject = f"{world.COLOUR_WORDS[attrs['colour']][1]} {world.SHAPE_WORDS[attrs['shape']][2]}"
            prep = ("over", "on")[i % 2]
            rows.append((f"{_article(subject)} {prep} {word if ' ' not in word else _article(word)}", attrs))
            continue
        if imp:
            subject = word
        elif attribute == "shape":
            subject = f"{world.COLOUR_WORDS[attrs['colour']][1]} {word}"
        else:
            subject = f"{word} {world.SHAPE_WORDS[attrs['shape']][2]}"
        rows.append((f"{_article(subject)} {_background(attrs['background'], i)}", attrs))
    return rows


def target_unsaid(task: Task, rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The attack's scenes with the target replaced by what the guide stands for (no colour word for the empty
    guide, "shape" for "shape"): what a perfect erasure would draw, so the share of the target in these samples
    is the floor of the unseen attack."""
    def scene(attrs: dict) -> dict:
        return {a: attrs[a] for a in ATTRIBUTES} | {task.attribute: task.anchor}
    return [(world.describe(**scene(attrs)), attrs) for _, attrs in rows]


def evaluate(bench: Bench, task: Task, runs: list[tuple[str, int]], settings: dict) -> list[dict]:
    sets = bench.task_sets(task)
    per = max(1, bench.n // len(task.targets))
    sets["unseen"] = [r for v in task.targets for r in unseen_attack(task.attribute, v, per)]
    before = {name: bench.run(bench.base, rows, bench.seed + i) for i, (name, rows) in enumerate(sets.items())}
    out = [{"task": task.name, "method": "(none)", "expand": 0, "added": [],
            "erased": 1 - before["target"].share(task.attribute, task.targets), "preserved": 1.0,
            "paraphrase": before["paraphrase"].share(task.attribute, task.targets),
            "unseen": before["unseen"].share(task.attribute, task.targets), "drift": 0.0, "seconds": 0.0}]
    floor = bench.run(bench.base, target_unsaid(task, sets["unseen"]), bench.seed + list(sets).index("unseen"))
    out.append({"task": task.name, "method": "(target unsaid)", "expand": 0, "added": [], "erased": None,
                "preserved": None, "paraphrase": None, "unseen": floor.share(task.attribute, task.targets),
                "drift": None, "seconds": None})
    for method, expand in runs:
        start = time.perf_counter()
        result = erase(bench.model, method, task.concepts(), {**settings, "expand": expand})
        seconds = time.perf_counter() - start
        pipe = ToyWorldPipeline(bench.model, result.patch)
        after = {name: bench.run(pipe, rows, bench.seed + i) for i, (name, rows) in enumerate(sets.items())}
        added = result.report.get("expansion", {}).get("added", [])
        out.append({**erased_row(task, method, before, after, seconds), "expand": expand,
                    "added": [w["text"] for w in added], "unseen": after["unseen"].share(task.attribute, task.targets)})
    return out


def table(results: list[dict]) -> str:
    lines = [("| task | method | expand | erased ↑ | preserved ↑ | paraphrase attack ↓ | unseen attack ↓ | drift ↓ "
              "| solve (s) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['task']} | {r['method']} | {r['expand'] or 'off'} | {pct(r['erased'])} "
                     f"| {pct(r['preserved'])} | {pct(r['paraphrase'])} | {pct(r['unseen'])} "
                     f"| {pct(r['drift'], 1)} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m concept_eraser.toyworld.expansion_bench",
                                     description="Methods with and without concept expansion on ToyWorld.")
    parser.add_argument("--quick", action="store_true", help="the first task only, 16 samples per prompt set")
    parser.add_argument("--tasks", nargs="*", type=int, default=None, help="task numbers (1-4; default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--expand", type=int, default=8, help="wordings per target for the 'with expansion' rows")
    parser.add_argument("--curve", nargs="*", type=int, default=[],
                        help="also run the first method with these expand values (trade-off curve)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="expansion parameter for every run, e.g. expand_separation=1.5")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(Path(args.checkpoint), judge_module.load(), 16 if args.quick else args.samples, args.seed,
                  args.steps)
    tasks = TASKS[:1] if args.quick else [TASKS[i - 1] for i in args.tasks] if args.tasks else TASKS
    runs = [(m, e) for m in args.methods for e in (0, args.expand)]
    runs += [(args.methods[0], e) for e in args.curve if (args.methods[0], e) not in runs]
    results = []
    for task in tasks:
        results += evaluate(bench, task, runs, parse_assignments(args.set))
        print(table(results[-len(runs) - 1:]), file=sys.stderr, flush=True)  # progress: this task's rows
    print(table(sorted(results, key=lambda r: (r["task"], r["method"] != "(none)", r["method"], r["expand"]))))
    print("\nadded wordings:")
    seen = set()
    for r in results:
        if r["added"] and (r["task"], r["expand"]) not in seen:
            seen.add((r["task"], r["expand"]))
            print(f"- {r['task']}, expand {r['expand']}: {', '.join(r['added'])}")


if __name__ == "__main__":
    main()
