"""Concept expansion: finds the wordings ToyWorld was trained with, never adds one nearer a kept concept
(checked with the K/V products themselves), is deterministic, honours vetoes, gives a host's whole-window encoder's
result, and reaches every method."""

import json
import types

import pytest
import torch

from concept_eraser import METHODS, erase, presets
from concept_eraser import expansion as expansion_module
from concept_eraser.checkpoint import CheckpointModel
from concept_eraser.cli import main
from concept_eraser.concepts import Concepts
from concept_eraser.errors import InvalidParameterError
from concept_eraser.expansion import expand
from concept_eraser.toyworld import world
from concept_eraser.toyworld.benchmark import concept_word
from concept_eraser.toyworld.pipeline import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

TABLES = {"shape": (world.SHAPES, world.SHAPE_WORDS), "colour": (world.COLOURS, world.COLOUR_WORDS),
          "background": (world.BACKGROUNDS, world.BACKGROUND_WORDS)}


@pytest.fixture(scope="module")
def toy_model():
    return CheckpointModel(CHECKPOINT)


def task(attribute, value, guide=()):
    values = TABLES[attribute][0]
    return Concepts.build([concept_word(attribute, value)], guide,
                          [concept_word(attribute, v) for v in values if v != value])


@pytest.mark.parametrize("attribute", list(TABLES))
def test_finds_the_synonyms_toyworld_was_trained_with(toy_model, attribute):
    values, words = TABLES[attribute]
    for value in values:
        found = expand(toy_model, task(attribute, value), 12, separation=1.0)
        added = {word for w in found.added for word in w.text.split()}
        # multi-word synonyms ("round shape", "plus sign") count by their distinctive first word
        missing = [s for s in words[value][1:] if s.split()[0] not in added]
        assert not missing, f"{value}: {missing} not among {[w.text for w in found.added]}"


def kv_outputs(model, texts):
    """Every K/V matrix times the last word's and the EOS token's features: [n, Σ outputs × 2]."""
    encoded = model.text_encoder.encode(texts)
    columns = torch.stack([encoded.features[i, [max(n - 2, 0), n - 1]] for i, n in enumerate(encoded.lengths)])
    outputs = [columns.double() @ model.weight(k).double().T for k in model.arch.map_keys()]
    return torch.cat(outputs, dim=-1).flatten(1)


@pytest.mark.parametrize("case", [("shape", "circle", ("square",)), ("colour", "red", ()),
                                  ("background", "stripes", ("plain background",))])
def test_adds_nothing_nearer_a_preserved_concept_guide_or_the_empty_prompt(toy_model, case):
    attribute, value, guide = case
    concepts = task(attribute, value, guide)
    found = expand(toy_model, concepts, 64, separation=1.0)
    assert len(found.added) >= 4
    kept = list(dict.fromkeys(concepts.preserve + concepts.guides + ("",)))
    added = [w.text for w in found.added]
    out = kv_outputs(toy_model, [concepts.targets[0], *kept, *added])
    target, refs, cand = out[0], out[1:1 + len(kept)], out[1 + len(kept):]
    to_target = (cand - target).norm(dim=1)
    to_kept = torch.cdist(cand, refs)
    assert (to_target[:, None] < to_kept).all()
    # the reported scores are these distances, relative to the target's distance from the empty prompt
    scale = (target - refs[kept.index("")]).norm()
    assert [w.distance for w in found.added] == pytest.approx((to_target / scale).tolist(), rel=1e-4)
    assert [w.margin for w in found.added] == pytest.approx(
        ((to_kept.min(1).values - to_target) / scale).tolist(), rel=1e-3, abs=1e-5)
    # a stricter separation keeps a subset, each at least that many times nearer its target
    strict = expand(toy_model, concepts, 64, separation=1.3)
    assert {w.text for w in strict.added} < set(added)
    assert all(w.margin + w.distance >= 1.3 * w.distance for w in strict.added)


def test_deterministic_and_vetoes_are_honoured(toy_model):
    concepts = task("shape", "circle", ("square",))
    first = expand(toy_model, concepts, 5)
    expansion_module._CACHE.clear()
    again = expand(toy_model, concepts, 5)
    def listed(result):
        return [(w.text, w.distance, w.margin) for w in result.added]
    assert listed(first) == listed(again)
    assert first.concepts.targets == ("circle", *[w.text for w in first.added])
    assert set(first.concepts.guides) == {"square"}
    vetoed = first.added[0].text
    other = expand(toy_model, concepts, 5, exclude=[vetoed.upper()])
    assert vetoed not in other.concepts.targets and [w.text for w in other.vetoed] == [vetoed]
    assert [w.text for w in other.added] == [w.text for w in first.added[1:]] + [other.added[-1].text]


def test_encoding_reports_progress_every_few_prompts(toy_model):
    """Every progress call is a host's cancel point: ComfyUI encodes one whole window per prompt (about a second on
    a CPU), so the ~100–600 candidates must not run between two calls."""
    expansion_module._CACHE.clear()
    calls = []
    expand(toy_model, task("shape", "circle", ("square",)), 5, progress=lambda done, total, _: calls.append(done))
    assert len(calls) > 3 and max(b - a for a, b in zip(calls, calls[1:])) <= 16


def test_a_host_encoder_running_whole_windows_finds_the_same_wordings(toy_model):
    """A host's text encoder offers `encode` only (whole windows); the checkpoint's own runs up to each batch's
    longest EOS. The same wordings and scores come out, to the rounding of the products."""
    class HostEncoder:
        def __init__(self, encoder):
            self.encode = encoder.encode

    host = types.SimpleNamespace(arch=toy_model.arch, device=toy_model.device, weight=toy_model.weight,
                                 text_encoder=HostEncoder(toy_model.text_encoder))
    for attribute, value in (("shape", "circle"), ("colour", "red")):
        expansion_module._CACHE.clear()  # the same encoder: its cached features would answer the host
        ours = expand(toy_model, task(attribute, value), 6)
        expansion_module._CACHE.clear()
        theirs = expand(host, task(attribute, value), 6)
        assert [w.text for w in theirs.added] == [w.text for w in ours.added]
        assert [w.distance for w in theirs.added] == pytest.approx([w.distance for w in ours.added], rel=1e-5)


def test_every_method_offers_it_and_erase_reports_it(toy_model):
    for method in METHODS.values():
        assert {"expand", "expand_exclude", "expand_separation"} <= {p.name for p in method.params}
    concepts = task("shape", "circle", ("square",))
    result = erase(toy_model, "uce", concepts, {"expand": 3, "expand_exclude": "disc, ball"})
    report = result.report["expansion"]
    assert len(report["added"]) == 3 and not {"disc", "ball"} & {w["text"] for w in report["added"]}
    assert result.report["concepts"]["erase"] == ["circle", *[w["text"] for w in report["added"]]]
    assert result.patch.steps[0]["concepts"]["erase"] == result.report["concepts"]["erase"]
    assert "expansion" not in erase(toy_model, "uce", concepts).report
    with pytest.raises(InvalidParameterError, match="expand"):
        erase(toy_model, "uce", concepts, {"expand": -1})


def test_clip_vocabulary_on_a_random_sd1_model(tiny_checkpoints, monkeypatch):
    """CLIP's 49k-token vocabulary: the input-embedding pre-filter, phrases and templates; still only
    wordings nearer the target than anything kept."""
    monkeypatch.setattr(expansion_module, "POOL", 32)  # fewer prompts to encode; the path is the same
    model = CheckpointModel(tiny_checkpoints["sd1"])
    concepts = Concepts.build(["Van Gogh"], [], ["Claude Monet"])
    found = expand(model, concepts, 6, separation=1.0)
    assert 0 < len(found.added) <= 6 and found.candidates > expansion_module.POOL
    assert all(w.margin > 0 for w in found.added)
    assert [w.text for w in expand(model, concepts, 6, separation=1.0).added] == [w.text for w in found.added]


def test_command_line_prints_the_added_wordings(tmp_path, capsys):
    base = ["erase", str(CHECKPOINT), "--erase", "circle", "--guide", "square", "--preserve", "square", "--format",
            "patch"]
    assert main(base + ["--expand", "3", "--expand-exclude", "disc", "--out", str(tmp_path / "p.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "expansion: 3 wordings added" in out and "'disc' vetoed" in out
    assert "warning" not in err  # the candidates it tries are its own business: no word of the user's is unknown
    assert main(base + ["--expand", "off", "--out", str(tmp_path / "q.safetensors")]) == 0
    assert "expansion" not in capsys.readouterr().out
    assert main(base + ["--expand", "lots", "--out", str(tmp_path / "r.safetensors")]) == 2
    assert "error: expand" in capsys.readouterr().err


def test_presets_carry_provenance_and_licence_and_reach_the_command_line(tiny_checkpoints, tmp_path, capsys):
    assert {"nudity", "violence", "watermarks"} <= set(presets.names())
    for name in presets.names():
        header = (presets.FOLDER / f"{name}.txt").read_text(encoding="utf-8")
        assert "Provenance:" in header and "Licence: CC0-1.0" in header
        wordings = presets.load(name)
        assert len(wordings) >= 5 and len(set(wordings)) == len(wordings)
        assert not any(w.startswith("#") for w in wordings)
    with pytest.raises(InvalidParameterError, match="nudity"):
        presets.load("nudiy")
    report = tmp_path / "report.json"
    assert main(["erase", str(tiny_checkpoints["sd1"]), "--preset", "watermarks", "--erase", "logo",
                 "--out", str(tmp_path / "p.safetensors"), "--format", "patch", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["concepts"]["erase"] == ["logo", *[w for w in presets.load("watermarks")
                                                                            if w != "logo"]]


def test_target_unsaid_rows_replace_the_target_by_what_the_guide_stands_for():
    """The unseen attack's floor: its scenes with the target worded as the guide (not at all for the empty guide)."""
    from concept_eraser.toyworld.benchmark import TASKS
    from concept_eraser.toyworld.expansion_bench import target_unsaid, unseen_attack

    words = {"shape": world.SHAPE_WORDS, "colour": world.COLOUR_WORDS, "background": world.BACKGROUND_WORDS}
    for task in TASKS:
        rows = [r for v in task.targets for r in unseen_attack(task.attribute, v, 12)]
        unsaid = target_unsaid(task, rows)
        assert [attrs for _, attrs in unsaid] == [attrs for _, attrs in rows]
        target_words = {w for v in task.targets for w in words[task.attribute][v]} | set(world.IMPLICIT)
        for text, _ in unsaid:
            assert not target_words & set(text.split()), text
            assert task.guide.split()[0] in text.split() if task.guide else True
