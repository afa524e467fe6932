"""The command line end to end, and every bad input: a clear message naming the field, exit code 2,
nothing written."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from concept_eraser import CheckpointModel, Concepts, erase, save_patch
from concept_eraser.cli import main
from concept_eraser.tiny import tiny_state_dict


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_erase_inspect_apply_end_to_end(tiny_checkpoints, tmp_path, capsys):
    model = tiny_checkpoints["sdxl"]
    out, report = tmp_path / "erased.safetensors", tmp_path / "report.json"
    code, stdout, err = run(["erase", model, "--erase", "Van Gogh", "--erase", "a cat", "--guide", "a painting",
                             "--guide", "an animal", "--preserve", "Claude Monet", "--set", "lam=0.2",
                             "--set", "token_policy=last_word", "--out", out, "--report", report,
                             "--device", "cpu"], capsys)
    assert code == 0, err
    assert "140 matrices changed" in stdout
    data = json.loads(report.read_text())
    assert data["method"] == "uce" and data["params"]["lam"] == 0.2
    assert data["concepts"] == {"erase": ["Van Gogh", "a cat"], "guide": ["a painting", "an animal"],
                                "preserve": ["Claude Monet"]}
    assert len(data["layers"]) == 140 and data["seconds"] > 0 and data["output"]["format"] == "checkpoint"

    patch = tmp_path / "patch.safetensors"
    assert run(["erase", model, "--erase", "Van Gogh", "--set", "token_policy=last_word", "--out", patch,
                "--format", "patch"], capsys)[0] == 0
    code, stdout, _ = run(["inspect", patch, "--json"], capsys)
    info = json.loads(stdout)
    assert info["kind"] == "patch" and len(info["edits"]) == 140 and info["erasures"][0]["method"] == "uce"

    applied = tmp_path / "applied.safetensors"
    assert run(["apply", model, patch, "--out", applied], capsys)[0] == 0
    code, stdout, _ = run(["inspect", applied], capsys)
    assert code == 0 and "Stable Diffusion XL" in stdout and "erasure 1: uce of Van Gogh" in stdout
    code, stdout, _ = run(["inspect", model, "--json"], capsys)
    info = json.loads(stdout)
    context_maps = [k for k, m in info["maps"].items() if m["reads"] == "context"]
    assert info["architecture"] == "sdxl" and len(context_maps) == 140 and info["erasures"] == []

    lora = tmp_path / "lora.safetensors"
    assert run(["erase", model, "--erase", "Van Gogh", "--set", "token_policy=last_word", "--out", lora,
                "--format", "lora"], capsys)[0] == 0
    assert len(load_file(str(lora))) == 3 * 140


@pytest.fixture
def nonfinite_checkpoint(tmp_path):
    sd = tiny_state_dict("sd1", dtype=torch.float32)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    sd[key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def sd1_patch(tiny_checkpoints, tmp_path_factory):
    """A low-rank patch of the tiny SD1 model: its tensors and metadata, to damage."""
    model = CheckpointModel(tiny_checkpoints["sd1"])
    result = erase(model, "uce", Concepts.build(["x"]), {"token_policy": "last_word"})
    path = save_patch(result.patch, tmp_path_factory.mktemp("patch") / "patch.safetensors")
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def damaged_patches(folder, tensors, meta):
    """Patch files with one fault each, as hand editing or a broken copy makes them."""
    index = json.loads(meta["concept_eraser.edits"])
    key = next(iter(index))
    up = f"0.up::{key}"
    damaged = {
        "nan": ({**tensors, up: tensors[up].clone().index_fill_(1, torch.tensor([0]), float("nan"))}, {}),
        "big": ({**tensors, up: tensors[up] * 1e6}, {}),  # finite in float32, Inf once applied in float16
        "missing": ({k: v for k, v in tensors.items() if k != up}, {}),
        "shapes": ({**tensors, up: torch.zeros(tensors[up].shape[0], tensors[up].shape[1] + 1)}, {}),
        "index": (tensors, {"concept_eraser.edits": '"x"'}),
        "kinds": (tensors, {"concept_eraser.edits": json.dumps({key: "low_rank"})}),
        "kind": (tensors, {"concept_eraser.edits": json.dumps({key: ["magic"]})}),
        "steps": (tensors, {"concept_eraser.steps": '{"method": "uce"}'}),
        "concepts": (tensors, {"concept_eraser.steps": '[{"concepts": {"erase": 5}}]'}),
        "forced": (tensors, {"concept_eraser.steps": '[{"applied": {"to": {"name": "m"}, "forced": "yes"}}]'}),
        "extra": ({**tensors, "0.delta::model.diffusion_model.foo.weight": torch.zeros(2, 2)}, {}),
        "fingerprint": (tensors, {"concept_eraser.steps": '[{"source": {"fingerprint": "abc"}}]'}),
        "nan-fingerprint": (tensors, {"concept_eraser.steps": '[{"source": {"fingerprint": ' + str([math.nan] * 8)
                                      .replace("nan", "NaN") + "}}]"}),
    }
    for name, (t, m) in damaged.items():
        save_file(t, str(folder / f"patch-{name}.safetensors"), {**meta, **m})


BAD_INPUTS = {
    "missing file": (["erase", "{dir}/nope.safetensors", "--erase", "x"], "model", "does not exist"),
    "pickle": (["erase", "{dir}/model.ckpt", "--erase", "x"], "model", "pickle checkpoint"),
    "unknown transformer layout": (["erase", "{dir}/flux.safetensors", "--erase", "x"], "model",
                                   "Flux.1: unknown transformer layout: model.diffusion_model.txt_in.weight"),
    "no --erase": (["erase", "{sd1}"], "erase", "at least one concept"),
    "more guides than targets": (["erase", "{sd1}", "--erase", "x", "--guide", "a", "--guide", "b"], "guide",
                                 "2 guides for 1 concepts"),
    "lambda zero": (["erase", "{sd1}", "--erase", "x", "--set", "lam=0"], "lam", "must be a number > 0"),
    "lambda negative": (["erase", "{sd1}", "--erase", "x", "--set", "lam=-1"], "lam", "out of range"),
    "parameter given twice": (["erase", "{sd1}", "--erase", "x", "--set", "lam=1", "--set", "lam=2"], "lam",
                              "given twice ('1' and '2')"),
    "unknown parameter": (["erase", "{sd1}", "--erase", "x", "--set", "mu=1"], "mu", "unknown parameter"),
    "bad choice": (["erase", "{sd1}", "--erase", "x", "--set", "token_policy=eos"], "token_policy", "one of"),
    "unknown method": (["erase", "{sd1}", "--erase", "x", "--method", "esd"], "method", "choose one of"),
    "existing output": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/exists.safetensors"], "--out",
                        "already exists"),
    "missing folder": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/no/such/out.safetensors"], "--out",
                       "does not exist"),
    "non-finite": (["erase", "{dir}/nan.safetensors", "--erase", "x"], "result", "NaN or Inf"),
    "bad device": (["erase", "{sd1}", "--erase", "x", "--device", "tpu"], "device", "auto, cpu or cuda"),
    "kpop bad choice": (["erase", "{sd1}", "--erase", "x", "--method", "kpop", "--set", "injection=prepend"],
                        "injection", "one of concat, additive"),
    "kpop without a full U-Net": (["erase", "{sd1}", "--erase", "x", "--method", "kpop"], "model",
                                  "U-Net cannot be rebuilt for training (incomplete or unusual layout: no tensor "
                                  "*.ff.net.2.weight)"),
    "prompt from a closed-form method": (["erase", "{sd1}", "--erase", "x", "--save-prompt", "{dir}/p.safetensors"],
                                         "--save-prompt", "learns no prompt"),
    # output paths against each other and the input, before any work (--overwrite does not allow them)
    "report is the output": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/o.safetensors", "--report",
                              "{dir}/o.safetensors"], "--report", "also given as --out"),
    "report is the model": (["erase", "{sd1}", "--erase", "x", "--report", "{sd1}", "--overwrite"], "--report",
                            "is the input model"),
    "prompt is the output": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/o.safetensors", "--save-prompt",
                              "{dir}/o.safetensors"], "--save-prompt", "also given as --out"),
    "output links to the model": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/link.safetensors",
                                   "--overwrite"], "--out", "is the input model"),
    "apply output is the patch": (["apply", "{sd1}", "{dir}/patch-nan.safetensors", "--out",
                                   "{dir}/patch-nan.safetensors", "--overwrite"], "--out", "is the input patch"),
    # file-system faults, found before the work
    "output is a folder": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/dir.safetensors", "--overwrite"],
                           "--out", "is a folder"),
    "output under a file": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/exists.safetensors/o.safetensors"],
                            "--out", "is a file, not a folder"),
    "read-only folder": (["erase", "{sd1}", "--erase", "x", "--out", "/proc/self/o.safetensors"], "--out",
                         "is not writable"),
    "name too long": (["erase", "{sd1}", "--erase", "x", "--out", "{dir}/" + "n" * 250 + ".safetensors"], "--out",
                      "bytes long"),
    "report in a read-only folder": (["erase", "{sd1}", "--erase", "x", "--report", "/proc/self/r.json"], "--report",
                                     "is not writable"),
    "model is a named pipe": (["erase", "{dir}/fifo.safetensors", "--erase", "x"], "model", "is a named pipe"),
    "patch is a device": (["apply", "{sd1}", "/dev/null"], "patch", "is a character device"),
    "demo folder is a file": (["demo", "--out-dir", "{dir}/exists.safetensors"], "--out-dir", "cannot create"),
    # results that are not finite as written (float16), and damaged patches or metadata
    "overflow in float16": (["erase", "{sd1}", "--erase", "x", "--set", "lam=1e-300", "--set", "erase_scale=1e4"],
                            "result", "NaN or Inf as written in float16"),
    "NaN in a patch": (["apply", "{sd1}", "{dir}/patch-nan.safetensors"], "patch", "up contains NaN or Inf"),
    "patch overflowing float16": (["apply", "{sd1}", "{dir}/patch-big.safetensors"], "patch", "written in float16"),
    "patch part missing": (["apply", "{sd1}", "{dir}/patch-missing.safetensors"], "patch", "missing up"),
    "patch factor shapes": (["apply", "{sd1}", "{dir}/patch-shapes.safetensors"], "patch",
                            "are not out × r and r × in"),
    "patch index not an object": (["apply", "{sd1}", "{dir}/patch-index.safetensors"], "patch", "not a JSON object"),
    "patch kinds not a list": (["apply", "{sd1}", "{dir}/patch-kinds.safetensors"], "patch",
                               "not a list of edit kinds"),
    "patch unknown kind": (["apply", "{sd1}", "{dir}/patch-kind.safetensors"], "patch", "unknown edit kind 'magic'"),
    "patch steps not a list": (["apply", "{sd1}", "{dir}/patch-steps.safetensors"], "patch", "not a JSON list"),
    "patch part not in its index": (["apply", "{sd1}", "{dir}/patch-extra.safetensors"], "patch",
                                    "0.delta::model.diffusion_model.foo.weight, which its edit index does not list"),
    "patch fingerprint not numbers": (["apply", "{sd1}", "{dir}/patch-fingerprint.safetensors"], "patch",
                                      "source.fingerprint that is not a list of 8 finite numbers"),
    "patch fingerprint NaN": (["apply", "{sd1}", "{dir}/patch-nan-fingerprint.safetensors"], "patch",
                              "source.fingerprint that is not a list of 8 finite numbers"),
    "step field of the wrong type": (["inspect", "{dir}/patch-forced.safetensors"], "file",
                                     "applied.forced that is not true or false"),
    "inspect NaN in a patch": (["inspect", "{dir}/patch-nan.safetensors"], "file", "up contains NaN or Inf"),
    "report over the T5 tokenizer": (["erase", "{sd1}", "--erase", "x", "--t5-tokenizer", "{dir}/tokenizer.json",
                                      "--report", "{dir}/tokenizer.json", "--overwrite"], "--report",
                                     "is the input --t5-tokenizer"),
    "inspect steps not a list": (["inspect", "{dir}/patch-steps.safetensors"], "file", "not a JSON list"),
    "inspect step concepts": (["inspect", "{dir}/patch-concepts.safetensors"], "file",
                              "concepts.erase that is not a list"),
    "erased and preserved up to case": (["erase", "{sd1}", "--erase", "Cat", "--preserve", "cat "], "preserve",
                                        "both erased and preserved"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_leaves_nothing_behind(case, tiny_checkpoints, tmp_path, capsys,
                                                                   nonfinite_checkpoint, sd1_patch):
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.ckpt")
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)},
              str(tmp_path / "flux.safetensors"))
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "link.safetensors").symlink_to(tiny_checkpoints["sd1"])
    os.mkfifo(tmp_path / "fifo.safetensors")
    damaged_patches(tmp_path, *sd1_patch)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv, field, message = BAD_INPUTS[case]
    argv = [a.format(dir=tmp_path, sd1=tiny_checkpoints["sd1"]) for a in argv]
    if argv[0] in ("erase", "apply") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.safetensors")]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(f"error: {field}: ") and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"


def test_kpop_writes_a_patch_and_its_learned_prompt(tmp_path, capsys):
    from concept_eraser.toyworld.pipeline import CHECKPOINT

    patch, prompt = tmp_path / "kpop.safetensors", tmp_path / "prompt.safetensors"
    code, stdout, err = run(["erase", CHECKPOINT, "--method", "kpop", "--erase", "circle", "--set", "steps=2",
                             "--set", "ddim_steps=3", "--set", "prompt_size=1", "--format", "patch", "--out", patch,
                             "--save-prompt", prompt], capsys)
    assert code == 0, err
    assert "(learned prompt)" in stdout
    code, stdout, _ = run(["inspect", prompt], capsys)
    assert code == 0 and "kpop prompt for circle" in stdout and "re-enables" in stdout
    assert run(["apply", CHECKPOINT, patch, "--out", tmp_path / "erased.safetensors"], capsys)[0] == 0


def test_help_states_each_parameters_default_and_kind(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the usage, not the epilog
    assert "expand_exclude (default empty; text)" in shown
    assert "pooled_edit (default auto; true or false)" in shown and "lam (default 0.5; a number > 0" in shown


def test_a_long_prompt_is_warned_about_once(tiny_checkpoints, tmp_path, capsys):
    long = " ".join(["cat"] * 100)  # tokenized for the columns, the encoder and the probe
    code, _, err = run(["erase", tiny_checkpoints["sd1"], "--erase", long, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 0 and err.count("only the first 75 are used") == 1, err


def test_overwrite_replaces_an_existing_output(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert run(["erase", tiny_checkpoints["sd1"], "--erase", "x", "--out", out, "--overwrite"], capsys)[0] == 0
    assert out.stat().st_size > 1000


def test_module_entry_point_and_demo_run_in_a_fresh_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "concept_eraser", "demo", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "erased circle with uce" in done.stdout and "erasure 1: uce of circle" in done.stdout
    assert "circle prompts judged circle" in done.stdout
    assert (tmp_path / "report.json").exists() and (tmp_path / "toyworld-demo.png").exists()
