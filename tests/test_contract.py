"""The contract every registered method keeps, run against each of them (as diffusers runs one scheduler
contract over every scheduler): a method added to `METHODS` gets these tests by registering.

- the input model is untouched (its weights are live tensors here, as a host serves them);
- a run cancelled from the progress callback raises `Cancelled` and leaves the model as it was;
- the erasure saves and loads back in every format it supports (checkpoint, patch, LoRA when low-rank, learned
  prompt when it learns one) and gives the same weights when applied; the others are refused naming `format`;
- the same inputs give the same patch, bit for bit;
- every bad parameter value is refused before any work, naming the parameter;
- the written weights are finite, in the model's dtype (ToyWorld as shipped, fp32, and cast to fp16);
- the provenance (method, parameters, concepts, source fingerprint) is recorded in the patch and its files.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from concept_eraser import METHODS, CheckpointModel, Concepts, erase
from concept_eraser.checkpoint import load_patch, lora_modules, read_steps, save_checkpoint, save_erasure, save_lora
from concept_eraser.errors import Cancelled, InvalidParameterError
from concept_eraser.params import Param, resolve
from concept_eraser.safetensors_io import SafetensorsReader, write_safetensors
from concept_eraser.toyworld.pipeline import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

# Settings that keep a run to seconds on these tiny models; a method without an entry runs at its defaults.
QUICK = {
    "kpop": {"steps": 1, "ddim_steps": 2, "prompt_size": 1},
    "space": {"iterations": 20, "mu": 0.05},  # a given μ skips its search (0.05: about 40 % zeros here)
    "rece": {"epochs": 1},
}
CONCEPTS = Concepts.build(["circle"], ["square"], ["triangle"])


class LiveModel(CheckpointModel):
    """A checkpoint whose weights are live tensors, as a host serves them: `weight` returns the same tensor
    every time, so a method that wrote into one would change the model."""

    def __init__(self, path):
        super().__init__(path)
        self.live = {k: super(LiveModel, self).weight(k) for k in self.keys()}
        self.snapshot = {k: v.clone() for k, v in self.live.items()}

    def weight(self, key: str) -> torch.Tensor:
        return self.live[key]

    def untouched(self) -> bool:
        return all(torch.equal(self.live[k], self.snapshot[k]) for k in self.live)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """ToyWorld as shipped (fp32) and cast to fp16, metadata kept."""
    reader = SafetensorsReader(CHECKPOINT)
    half = write_safetensors(tmp_path_factory.mktemp("contract") / "toyworld-fp16.safetensors",
                             [(k, t.half() if t.is_floating_point() else t)
                              for k, t in ((k, reader.get(k)) for k in reader.infos)], reader.metadata)
    return {"fp32": LiveModel(CHECKPOINT), "fp16": LiveModel(half)}


class Counter:
    def __init__(self, cancel_at: int | None = None):
        self.calls, self.cancel_at = 0, cancel_at

    def __call__(self, done, total, message):
        self.calls += 1
        if self.calls == self.cancel_at:
            raise Cancelled("stopped by the test")


def run(model, method, progress=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KPOP: "no preserved prompts", convergence notes
        return erase(model, method, CONCEPTS, QUICK.get(method, {}), progress or Counter())


@pytest.fixture(scope="module")
def results(models):
    """(result, progress calls) per (dtype, method), and a second fp32 result per method."""
    out = {}
    for dtype, model in models.items():
        for method in METHODS:
            counter = Counter()
            out[dtype, method] = (run(model, method, counter), counter.calls)
    out.update({("again", method): (run(models["fp32"], method), None) for method in METHODS})
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_input_model_untouched_and_result_deterministic(models, results, method):
    (first, _), (second, _) = results["fp32", method], results["again", method]
    assert models["fp32"].untouched() and models["fp16"].untouched()
    assert first.patch.edits.keys() == second.patch.edits.keys() and first.patch.edits
    for key, stages in first.patch.edits.items():
        for a, b in zip(stages, second.patch.edits[key], strict=True):
            assert a.kind == b.kind
            for part, tensor in a.tensors().items():
                assert torch.equal(tensor, b.tensors()[part]), (key, part)
    for name, tensor in first.artifacts.items():
        assert torch.equal(tensor, second.artifacts[name]), name


@pytest.mark.parametrize("method", list(METHODS))
def test_cancel_leaves_the_model_and_returns_nothing(models, results, method):
    calls = results["fp32", method][1]
    assert calls >= 2, "a method must report progress (hosts cancel from it)"
    with pytest.raises(Cancelled):
        run(models["fp32"], method, Counter(cancel_at=calls // 2))
    assert models["fp32"].untouched()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_written_weights_are_finite_in_the_models_dtype(models, results, method, dtype):
    model = models[dtype]
    patch = results[dtype, method][0].patch
    for key in patch.edits:
        new = patch.apply_to(key, model.weight(key))
        assert new.dtype == model.weight(key).dtype and new.shape == model.weight(key).shape, key
        assert torch.isfinite(new.float()).all(), key


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_report_gives_zeros_for_a_sparse_methods_tensors_only(models, results, method, dtype):
    """SPACE's result is sparse whether each matrix is stored as CSR or dense (the smaller): its zeros are in the
    report; no other method's dense or low-rank edit has a zeros figure."""
    result = results[dtype, method][0]
    for key, figures in result.report["layers"].items():
        if METHODS[method].sparse:
            new = result.patch.apply_to(key, models[dtype].weight(key))
            assert figures["zeros"] == pytest.approx((new == 0).double().mean().item()) and figures["zeros"] > 0.1
        else:
            assert "zeros" not in figures, key


@pytest.mark.parametrize("method", list(METHODS))
def test_bad_parameters_are_refused_by_name_before_any_work(models, method):
    model = models["fp32"]

    def bad_value(p: Param):
        if p.kind is bool:
            return "maybe"
        if p.kind is str:
            return "no-such-choice" if p.choices else 12
        if p.max is not None:
            return p.max * 2 + 1
        return p.min - 1 if p.min is not None else "many"

    def no_work(*_):
        raise AssertionError("work started before the parameters were checked")

    for p in [*METHODS[method].params, Param("no_such_parameter", int, 0, "")]:
        with pytest.raises(InvalidParameterError) as caught:
            erase(model, method, CONCEPTS, {p.name: bad_value(p)}, no_work)
        assert caught.value.field == p.name, (p.name, str(caught.value))
        assert str(caught.value).startswith(f"{p.name}: ") and caught.value.detail in str(caught.value)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_supported_format_round_trips_and_others_are_refused(models, results, method, tmp_path):
    model = models["fp32"]
    result = results["fp32", method][0]
    patch = result.patch
    expected = {key: patch.apply_to(key, model.weight(key)) for key in patch.edits}

    path = save_erasure("checkpoint", tmp_path / "whole.safetensors", patch, model.arch,
                        checkpoint=lambda out: save_checkpoint(model, patch, out))
    saved = CheckpointModel(path)
    for key in model.live:
        assert torch.equal(saved.weight(key), expected.get(key, model.weight(key))), key

    path = save_erasure("patch", tmp_path / "patch.safetensors", patch, model.arch, solved_on=model.weight)
    loaded = load_patch(path)
    for key, want in expected.items():
        torch.testing.assert_close(loaded.apply_to(key, model.weight(key)), want, rtol=1e-6, atol=1e-6)

    if patch.is_low_rank():
        reader = SafetensorsReader(save_lora(patch, tmp_path / "lora.safetensors", arch=model.arch))
        for key, want in expected.items():
            deltas = []  # one module per tensor; an OpenCLIP fused in_proj's q, k, v modules stack as its rows
            for name, _up, _down in lora_modules(key, *patch.low_rank_factors(key), model.arch):
                up, down = (reader.get(f"{name}.lora_{part}.weight").double() for part in ("up", "down"))
                deltas.append(reader.get(f"{name}.alpha").item() / up.shape[1] * up @ down)
            torch.testing.assert_close((model.weight(key).double() + torch.cat(deltas)).float(), want,
                                       rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(InvalidParameterError) as caught:
            save_erasure("lora", tmp_path / "lora.safetensors", patch, model.arch)
        assert caught.value.field == "format"

    if result.artifacts:
        reader = SafetensorsReader(save_erasure("learned_prompt", tmp_path / "prompt.safetensors", patch, model.arch,
                                                artifacts=result.artifacts, report=result.report))
        assert reader.metadata["concept_eraser.method"] == method
        for name, tensor in result.artifacts.items():
            assert torch.equal(reader.get(name), tensor.detach().cpu()), name
    else:
        with pytest.raises(InvalidParameterError) as caught:
            save_erasure("learned_prompt", tmp_path / "prompt.safetensors", patch, model.arch, report=result.report)
        assert caught.value.field == "format"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["whole.safetensors", "patch.safetensors"] + ["lora.safetensors"] * patch.is_low_rank()
        + ["prompt.safetensors"] * bool(result.artifacts))  # a refused format leaves no file


@pytest.mark.parametrize("method", list(METHODS))
def test_provenance_is_recorded_in_the_patch_and_its_files(models, results, method, tmp_path):
    model = models["fp32"]
    result = results["fp32", method][0]
    (step,) = result.patch.steps
    values = resolve(METHODS[method].params, QUICK.get(method, {}), method)
    # what `auto` chose is recorded: the pooled edit is off on ToyWorld (no pooled path)
    assert step["method"] == method and step["params"] == dict(values.replace(pooled_edit=False))
    assert step["concepts"] == CONCEPTS.as_dict() and step["architecture"] == "toyworld"
    assert step["source"]["name"] == CHECKPOINT.name and len(step["source"]["fingerprint"]) == 8
    assert step["created"] and "probe" in step["results"]
    saved = save_checkpoint(model, result.patch, tmp_path / "erased.safetensors")
    assert read_steps(SafetensorsReader(saved).metadata) == result.patch.steps
