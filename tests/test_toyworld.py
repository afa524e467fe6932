"""ToyWorld: deterministic world, the judge, every method through the ToyWorld adapter, and a short
benchmark run on the shipped weights (no training here)."""

import contextlib

import pytest
import torch

from concept_eraser import METHODS, erase
from concept_eraser.checkpoint import CheckpointModel
from concept_eraser.concepts import Concepts
from concept_eraser.toyworld import benchmark, judge, world
from concept_eraser.toyworld.pipeline import CHECKPOINT, ToyWorldPipeline


@pytest.fixture(scope="module")
def toy_model():
    return CheckpointModel(CHECKPOINT)


@pytest.fixture(scope="module")
def the_judge():
    return judge.load()


def test_rendering_is_deterministic_and_captions_say_what_is_drawn():
    first = world.render(world.random_scenes(torch.Generator().manual_seed(5), 16))
    again = world.render(world.random_scenes(torch.Generator().manual_seed(5), 16))
    other = world.render(world.random_scenes(torch.Generator().manual_seed(6), 16))
    assert first.shape == (16, 3, world.SIZE, world.SIZE)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Pinned: the shipped weights were trained on exactly these pixels.
    assert first.double().sum().item() == pytest.approx(5586.3038, abs=1e-3)
    gen = torch.Generator().manual_seed(0)
    for scene in world.random_scenes(gen, 200):
        said = world.parse(world.caption(scene, gen))
        assert all(value in (None, getattr(scene, k)) for k, value in said.items())
    assert world.parse("a sun on stripes") == {"shape": "circle", "colour": "yellow", "background": "stripes"}


def test_judge_reads_fresh_renders_and_does_not_call_blobs_circles(the_judge):
    scores = judge.accuracy(the_judge, seed=2024, n=400)
    assert min(scores["shape"], scores["colour"], scores["background"]) >= 0.98, scores
    gen = torch.Generator().manual_seed(3)
    images, labels = judge.degraded_batch(gen, 400)
    shapeless = labels["shape"] == len(world.SHAPES)
    verdicts = the_judge.verdicts(images[shapeless])
    circles = sum(v["shape"] == "circle" for v in verdicts) / len(verdicts)
    nones = sum(v["shape"] == judge.NONE for v in verdicts) / len(verdicts)
    assert circles < 0.05 and nones > 0.9, (circles, nones)


def test_the_checkpoint_is_a_toyworld_checkpoint_with_a_word_tokenizer(toy_model):
    assert toy_model.arch.family == "toyworld"
    assert len(toy_model.arch.map_keys()) > 0 and all(".attn2.to_" in k for k in toy_model.arch.map_keys())
    encoded = toy_model.text_encoder.encode(["a red circle on a striped background", "", "a zorblax"])
    window = toy_model.arch.encoders[0].window
    assert encoded.features.shape == (3, window, toy_model.arch.context_dim)
    assert encoded.lengths == (9, 2, 4)  # BOS + words + EOS; unknown words become <|unk|>


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_through_the_toyworld_adapter(toy_model, method):
    few_steps = {"steps": 2, "ddim_steps": 4} if method == "kpop" else {}  # trains: a few steps show the plumbing
    # KPOP has no preserve list and says so
    said = pytest.warns(UserWarning, match="preserved") if method == "kpop" else contextlib.nullcontext()
    with said:
        result = erase(toy_model, method, Concepts.build(["circle"], ["square"], ["triangle"]), few_steps)
    assert result.report["architecture"] == "toyworld"
    assert result.patch.edits and all(k in toy_model.reader for k in result.patch.edits)
    images = ToyWorldPipeline(toy_model, result.patch).sample(["a red circle"], seed=0, steps=4)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("method", ["uce", "rece", "space", "erasepro"])
def test_a_short_benchmark_at_the_defaults_erases_and_keeps_the_rest(the_judge, one_thread, method):
    """Each closed-form method at its defaults, judged on circle → square (8 samples per set, 8 steps). Measured:
    preserved 100 % (UCE, SPACE, ErasePro), 88 % (RECE); RECE's former defaults (5 epochs, the last returned, its UCE
    step at λ 0.1) kept 0 %, and 5 epochs from the official UCE step 25 %."""
    bench = benchmark.Bench(CHECKPOINT, the_judge, samples=8, seed=0, steps=8)
    results = bench.evaluate(benchmark.TASKS[0], benchmark.runs_for([method]), grid_dir=None)
    before, after = results
    assert before["target"] >= 0.75, before
    assert after["erased"] >= 0.75 and after["preserved"] >= 0.75, after
