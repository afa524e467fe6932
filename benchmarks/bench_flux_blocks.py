"""Study: UCE on Flux's per-block text projections (`double_blocks.N.txt_attn.qkv`) against the entry projection.

The product edits `txt_in` (and, optionally, `vector_in`): linear maps fed by the text encoder, so UCE's ridge
solve is exact. The text stream reaches every double block's attention through `txt_attn.qkv`, a stronger but
non-linear target: its input is the stream after the earlier blocks (which mix in the image tokens by joint
attention), layer-normed and modulated by shift/scale from the vector `time_in(t) + vector_in(pooled)`. This
script edits the K and V rows of each block's text QKV by the same UCE solve, with features taken from the model
itself and judges the result on ToyWorld-Flux:

- features: the input of `txt_attn.qkv`, captured by a hook, for the concept prompts at the timesteps `TIMES`
  (stacked as columns, each scaled by 1/√#times so that all of them weigh as one prompt does in UCE); the image
  stream at time t is (1 − t)·x₀ + t·ε with x₀ the un-erased model's sample for the guide prompt (target and guide
  see the same image) or for the preserved prompt itself, ε seeded; each prompt's own pooled vector modulates it;
- blocks are solved in order, each one's erased and preserved features read from the model as already edited
  (txt_in and the earlier blocks), mapped onto the un-erased model's guide and preserved features (UCE with
  preserve targets, `linalg.uce_factors`); the Q rows are left alone;
- token policy, λ, erase and preserve scales: UCE's defaults, as the product's row.

Rows: `uce` (txt_in, the product), `uce (pooled edit)` (txt_in and `vector_in`, the product's option),
`uce + block K/V` (txt_in, then every double block), `block K/V only` (blocks from the un-erased txt_in),
`block K/V only (frozen)` (every block's features read through the un-edited model), `pooled + block K/V`
(UCE's pooled edit of `vector_in`, then the blocks; txt_in kept).
Columns as the ToyWorld benchmark (erased, transfer, preserved, paraphrase, drift,
solve seconds); no white-box column (its derived embedding is defined for the entry map only).

`OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_flux_blocks.py [--checkpoint PATH] [--tasks 1 2 3 4]
[--rows ...] [--samples 48] [--quick]` (default: the shipped ToyWorld-Flux, every row, every task)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from concept_eraser import erase
from concept_eraser.concepts import Concepts, preserve_columns, target_columns
from concept_eraser.linalg import uce_factors
from concept_eraser.methods.uce import preserve_scale_for
from concept_eraser.models.arch import UNET_PREFIX
from concept_eraser.patch import DenseEdit, ErasurePatch
from concept_eraser.toyworld import judge as judge_module
from concept_eraser.toyworld.benchmark import TASKS, Bench, Task, erased_row, pct, unerased_row
from concept_eraser.toyworld.pipeline import FLUX_CHECKPOINT, ToyWorldPipeline

TIMES = (1.0, 0.8, 0.6, 0.4, 0.2)  # where the text stream's features are read (the sampler runs t = 1 → 0)
LAM = 0.5  # UCE's λ (its default)
ROWS = ("uce", "uce (pooled edit)", "uce + block K/V", "block K/V only", "block K/V only (frozen)",
        "pooled + block K/V")


def qkv_inputs(denoiser, x: torch.Tensor, t: float, encoded) -> list[torch.Tensor]:
    """Per double block, what its `txt_attn.qkv` reads [n, tokens, hidden]: the normed, modulated text stream."""
    captured = []
    hooks = [block.txt_attn.qkv.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
             for block in denoiser.double_blocks]
    try:
        with torch.no_grad():
            denoiser(x, torch.full((x.shape[0],), t), encoded.features, encoded.pooled)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


class BlockFeatures:
    """The concept prompts with their images and noise, fixed once per task; UCE's columns read from any model."""

    def __init__(self, base: ToyWorldPipeline, concepts: Concepts, seed: int, steps: int):
        preserve = ("",) + tuple(p for p in concepts.preserve if p)  # UCE preserves the empty prompt
        self.preserve_scale = preserve_scale_for(None, len(preserve))
        self.prompts = {"erase": base.encode(concepts.targets), "guide": base.encode(concepts.guides),
                        "preserve": base.encode(preserve)}
        gen = torch.Generator().manual_seed(seed)
        images = {}
        for name in ("guide", "preserve"):
            x0 = base.sample_features(self.prompts[name], seed, steps=steps) * 2 - 1
            images[name] = [(1 - t) * x0 + t * torch.randn(x0.shape, generator=gen) for t in TIMES]
        images["erase"] = images["guide"]  # the target is read on the image its guide draws
        self.images = images
        self.original = {name: self.inputs(base, name) for name in ("guide", "preserve")}

    def inputs(self, pipe: ToyWorldPipeline, name: str) -> list[list[torch.Tensor]]:
        """[time][block] → the qkv inputs [n, tokens, hidden] of prompt set `name` in `pipe`'s model."""
        return [qkv_inputs(pipe.denoiser, x, t, self.prompts[name]) for t, x in zip(TIMES, self.images[name])]

    def columns(self, edited: ToyWorldPipeline, block: int) -> tuple[torch.Tensor, ...]:
        """(C_E, C_G, C_P, T_P) [hidden, columns] for `block`: targets and preserved prompts in the edited model,
        guides and preserved prompts in the un-erased one; UCE's token policy, every timestep stacked."""
        erased, kept = self.inputs(edited, "erase"), self.inputs(edited, "preserve")
        parts = []
        for t in range(len(TIMES)):
            def prompts(name, source):
                return replace(self.prompts[name], features=source[t][block].double())

            c_e, c_g, _ = target_columns(prompts("erase", erased), prompts("guide", self.original["guide"]),
                                         "last_word_to_end")
            c_p = preserve_columns(prompts("preserve", kept), "last_word_to_end")
            t_p = preserve_columns(prompts("preserve", self.original["preserve"]), "last_word_to_end")
            parts.append((c_e, c_g, c_p, t_p))
        return tuple(torch.cat(cols, 1) / math.sqrt(len(TIMES)) for cols in zip(*parts))


def block_patch(bench: Bench, features: BlockFeatures, start: ErasurePatch | None, frozen: bool) -> ErasurePatch:
    """`start` (or nothing) followed by UCE on the K and V rows of every double block's text QKV, in block order;
    features read through the blocks already edited, or (`frozen`) through the un-edited ones (after `start`)."""
    patch = start or ErasurePatch(bench.model.arch.family, {})
    reader = ToyWorldPipeline(bench.model, patch) if frozen else None
    for block in range(len(bench.base.denoiser.double_blocks)):
        c_e, c_g, c_p, t_p = features.columns(reader or ToyWorldPipeline(bench.model, patch), block)
        A, B = uce_factors(c_e, c_g, c_p, LAM, 1.0, features.preserve_scale, torch.float64, preserve_target=t_p)
        key = f"{UNET_PREFIX}double_blocks.{block}.txt_attn.qkv.weight"
        weight = bench.model.weight(key)
        new = weight.double().clone()
        hidden = new.shape[1]
        new[hidden:] += new[hidden:] @ A @ B.T  # rows K, V (Q is rows :hidden)
        if not torch.isfinite(new).all():
            raise FloatingPointError(f"{key}: the solve gave non-finite weights")
        patch = patch.then(ErasurePatch(patch.architecture, {key: (DenseEdit(new.to(weight.dtype)),)}))
    return patch


def make_patch(bench: Bench, row: str, concepts: Concepts) -> ErasurePatch:
    if row in ("uce", "uce (pooled edit)"):
        return erase(bench.model, "uce", concepts, {"pooled_edit": row == "uce (pooled edit)"}).patch
    features = BlockFeatures(bench.base, concepts, bench.seed + 17, bench.steps)
    start = None
    if row == "uce + block K/V":
        start = erase(bench.model, "uce", concepts, {"pooled_edit": False}).patch
    elif row == "pooled + block K/V":  # UCE's pooled edit (vector_in) alone, txt_in kept
        both = erase(bench.model, "uce", concepts, {"pooled_edit": True}).patch
        start = ErasurePatch(both.architecture, {k: v for k, v in both.edits.items() if "vector_in" in k})
    return block_patch(bench, features, start, frozen=row == "block K/V only (frozen)")


def evaluate(bench: Bench, task: Task, rows: list[str]) -> list[dict]:
    sets = bench.task_sets(task)
    before = {name: bench.run(bench.base, prompts, bench.seed + i) for i, (name, prompts) in enumerate(sets.items())}
    results = [unerased_row(task, before)]
    concepts = task.concepts()
    for row in rows:
        start = time.perf_counter()
        patch = make_patch(bench, row, concepts)
        solve = time.perf_counter() - start
        pipe = ToyWorldPipeline(bench.model, patch)
        after = {name: bench.run(pipe, prompts, bench.seed + i) for i, (name, prompts) in enumerate(sets.items())}
        results.append(erased_row(task, row, before, after, solve))
        print(f"{task.name} | {row}: done", flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| task | edit | erased ↑ | transfer ↑ | preserved ↑ | paraphrase attack ↓ | drift ↓ | solve (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["method"] == "(none)":
            lines.append(f"| {r['task']} | (none) | target shown {pct(r['target'])} | — "
                         f"| accuracy {pct(r['accuracy'])} | {pct(r['paraphrase'])} | — | — |")
        else:
            lines.append(f"| {r['task']} | {r['method']} | {pct(r['erased'])} | {pct(r['transfer'])} "
                         f"| {pct(r['preserved'])} | {pct(r['paraphrase'])} | {pct(r['drift'], 1)} "
                         f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(FLUX_CHECKPOINT), help="a ToyWorld-Flux file")
    parser.add_argument("--tasks", nargs="*", type=int, default=None, help="task numbers (1-4; default: all)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--samples", type=int, default=48, help="samples per prompt set")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the first task, 8 samples per set, 8 steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples, steps = (8, 8) if args.quick else (args.samples, args.steps)
    bench = Bench(Path(args.checkpoint), judge_module.load(), samples, args.seed, steps)
    tasks = TASKS[:1] if args.quick else [TASKS[i - 1] for i in args.tasks] if args.tasks else TASKS
    results = [r for task in tasks for r in evaluate(bench, task, args.rows)]
    print(table(results))


if __name__ == "__main__":
    main()
