"""Writing files safely: no overwrite of a file that appears meanwhile, concurrent runs, signals, the user's umask,
long names, fp8 checkpoints, no-op warnings and provenance."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from concept_eraser import CheckpointModel, Concepts, erase, save_checkpoint, save_patch
from concept_eraser.cli import main
from concept_eraser.denoiser import training_size
from concept_eraser.errors import InvalidParameterError
from concept_eraser.safetensors_io import PARTIAL_PREFIX, PARTIAL_SUFFIX, LazyTensor, file_sha256, write_safetensors
from concept_eraser.tiny import make_tiny_checkpoint, tiny_state_dict
from concept_eraser.tokenizer import WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


def test_a_file_that_appears_while_writing_is_kept(tmp_path):
    target = tmp_path / "out.safetensors"

    def someone_else_writes():  # another run finishes first, while this one streams its tensors
        target.write_bytes(b"the other run's result")
        return torch.ones(2)

    with pytest.raises(InvalidParameterError, match="created by something else while this run was writing"):
        write_safetensors(target, {"a": LazyTensor(torch.float32, (2,), someone_else_writes)})
    assert target.read_bytes() == b"the other run's result" and partials(tmp_path) == []


def test_a_full_disk_is_a_clean_error(tmp_path):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(InvalidParameterError, match="out: could not write .* No space left on device; nothing was"):
        write_safetensors(tmp_path / "o.safetensors", {"a": LazyTensor(torch.float32, (1,), full)})
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_users_umask_and_overwrite_keeps_the_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_safetensors(tmp_path / "a.safetensors", {"a": torch.zeros(2)})
        assert out.stat().st_mode & 0o777 == 0o644  # readable by a ComfyUI service account, as the folder allows
        os.chmod(out, 0o640)
        write_safetensors(out, {"a": torch.ones(2)}, overwrite=True)
        assert out.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        assert write_safetensors(tmp_path / "b.safetensors", {"a": torch.zeros(2)}).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_the_longest_legal_name_can_be_written(tmp_path):
    name = "n" * (255 - len(".safetensors")) + ".safetensors"  # the temporary name must not add bytes to it
    assert load_file(str(write_safetensors(tmp_path / name, {"a": torch.zeros(1)})))["a"].shape == (1,)


@pytest.fixture(scope="module")
def sd1_patch(tiny_checkpoints, tmp_path_factory):
    model = CheckpointModel(tiny_checkpoints["sd1"])
    result = erase(model, "uce", Concepts.build(["x"]), {"token_policy": "last_word"})
    return save_patch(result.patch, tmp_path_factory.mktemp("patch") / "patch.safetensors")


# The real command line in a fresh process, made to pause in the middle of writing its output (after two tensors)
# and say so, so that a signal or a second run lands there on any machine.
PAUSING_CLI = """
import sys, time
import concept_eraser.safetensors_io as io
write, written = io.tensor_bytes, []
def paused(tensor):
    written.append(1)
    if len(written) == 3:
        print("writing", flush=True)
        time.sleep(float(sys.argv[1]))
    return write(tensor)
io.tensor_bytes = paused
from concept_eraser.cli import main
sys.exit(main(sys.argv[2:]))
"""


def apply_process(model, patch, out, pause: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", PAUSING_CLI, str(pause), "apply", str(model), str(patch),
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_writing(run: subprocess.Popen) -> None:
    line = run.stdout.readline()
    assert line == "writing\n", (line, run.communicate())
    assert partials(Path(run.args[-1]).parent)


def test_two_runs_writing_the_same_output_one_succeeds(tiny_checkpoints, sd1_patch, tmp_path):
    out = tmp_path / "out.safetensors"
    runs = [apply_process(tiny_checkpoints["sd1"], sd1_patch, out, pause=3) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.startswith("error: --out: ") and ("already exists" in loser or "created by something else" in loser)
    assert "Traceback" not in loser
    assert load_file(str(out)).keys() == load_file(str(tiny_checkpoints["sd1"])).keys() and partials(tmp_path) == []


def test_sigterm_during_the_write_leaves_nothing(tiny_checkpoints, sd1_patch, tmp_path):
    run = apply_process(tiny_checkpoints["sd1"], sd1_patch, tmp_path / "out.safetensors", pause=60)
    wait_until_writing(run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143 and "terminated; no partial file was left" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_partial_file_of_a_killed_run_is_removed_by_the_next(tiny_checkpoints, sd1_patch, tmp_path, capsys):
    run = apply_process(tiny_checkpoints["sd1"], sd1_patch, tmp_path / "out.safetensors", pause=60)
    wait_until_writing(run)
    run.kill()  # SIGKILL: nothing can clean up
    run.communicate(timeout=60)
    left = partials(tmp_path)
    assert len(left) == 1 and not (tmp_path / "out.safetensors").exists()
    assert main(["erase", str(tiny_checkpoints["sd1"]), "--out", str(tmp_path / "next.safetensors")]) == 2  # no --erase
    err = capsys.readouterr().err
    assert f"warning: removed {tmp_path / left[0]}" in err and "killed while writing" in err
    assert list(tmp_path.iterdir()) == []


def test_a_named_pipe_named_like_a_partial_file_is_left_alone(tmp_path):
    """Looking for partial files of killed runs must not open a pipe for reading: that blocks until a writer comes."""
    pipe = tmp_path / f"{PARTIAL_PREFIX}deadbeef{PARTIAL_SUFFIX}"
    os.mkfifo(pipe)
    write_safetensors(tmp_path / "out.safetensors", {"w": torch.zeros(2)})
    assert pipe.exists() and (tmp_path / "out.safetensors").exists()


def test_fp8_checkpoints_are_solved_in_float32_and_written_back_in_fp8(tmp_path):
    sd = {k: v.float().to(torch.float8_e4m3fn) for k, v in tiny_state_dict("sd1").items()}
    fp8 = write_safetensors(tmp_path / "fp8.safetensors", sd)
    # the independent reference: the same values in float32, erased there, rounded to fp8 at the end
    fp32 = write_safetensors(tmp_path / "fp32.safetensors", {k: v.float() for k, v in sd.items()})
    concepts, params = Concepts.build(["Van Gogh"], preserve=["Claude Monet"]), {"token_policy": "last_word"}
    out = {}
    for name, path in (("fp8", fp8), ("fp32", fp32)):
        model = CheckpointModel(path)
        out[name] = load_file(str(save_checkpoint(model, erase(model, "uce", concepts, params).patch,
                                                  tmp_path / f"{name}-erased.safetensors")))
    assert all(t.dtype == torch.float8_e4m3fn for t in out["fp8"].values())
    kv = CheckpointModel(fp8).arch.map_keys()
    changed = sum(not torch.equal(out["fp8"][k].float(), sd[k].float()) for k in kv)
    assert changed == len(kv)
    for key in kv:
        # one fp8 step (12.5 % relative) apart at most, where float32 rounding sits on a tie
        torch.testing.assert_close(out["fp8"][key].float(), out["fp32"][key].to(torch.float8_e4m3fn).float(),
                                   rtol=0.125, atol=2 ** -9)


def test_fp8_patches_of_dense_edits_are_saved_and_applied_as_changes(tmp_path):
    """SPACE's edits are stored as W − W_o in float32 (fp8 has no dtype promotion in torch): the saved patch,
    applied to the same fp8 model, gives what the erase gives, and its delta equals the float32 difference."""
    sd = {k: v.float().to(torch.float8_e4m3fn) for k, v in tiny_state_dict("sd1").items()}
    fp8 = write_safetensors(tmp_path / "fp8.safetensors", sd)
    model = CheckpointModel(fp8)
    result = erase(model, "space", Concepts.build(["Van Gogh"]), {"iterations": 5})
    relative = result.patch.relative(model.weight)
    for key, (stage,) in relative.edits.items():
        assert stage.kind == "delta" and stage.delta.dtype == torch.float32
        expected = result.patch.apply_to(key, model.weight(key)).float() - model.weight(key).float()
        assert torch.equal(stage.delta, expected)
        assert torch.equal(relative.apply_to(key, model.weight(key)).float(),
                           result.patch.apply_to(key, model.weight(key)).float())


@pytest.mark.filterwarnings("ignore:the erasure changed no weight")  # also said by rcond=1, seen above
def test_no_op_erasures_are_warned_about(tiny_checkpoints, tmp_path, capsys):
    sd1 = tiny_checkpoints["sd1"]
    code = main(["erase", str(sd1), "--erase", "a cat", "--guide", "A  Cat", "--set", "token_policy=last_word",
                 "--out", str(tmp_path / "same.safetensors")])
    out, err = capsys.readouterr()
    assert code == 0 and "warning: guide: 'a cat' is mapped to itself, so it is not erased" in err
    assert "the erasure changed no weight" in err and "0 matrices changed" in out
    with pytest.warns(UserWarning, match=r"are now all zero, so those layers ignore every prompt \(SPACE: lower mu\)"):
        # W = 0 is the optimum once μ ≥ max|∇f(0)| = max|2 W_o (Ṽ Ũᵀ + λ I)|: ~2.6e3 at unit scales on the tiny
        # model (token features of norm ~100), ~260 at 0.1, so μ = 1e3 (its maximum) zeroes every K/V exactly
        erase(CheckpointModel(sd1), "space", Concepts.build(["x"]), {"mu": 1e3, "erase_scale": 0.1,
                                                                     "preserve_scale": 0.1})
    with pytest.warns(UserWarning, match="rcond=1 kept rank 0 of its"):
        erase(CheckpointModel(sd1), "erasepro", Concepts.build(["x"]), {"rcond": 1.0, "token_policy": "first_k",
                                                                       "edit_unet": True})
    with pytest.warns(UserWarning, match="resolution=4096 is 65536× the pixels of this model's native 16²"):
        training_size(4096, "toyworld", "eps", 4)
    tokenizer = WordTokenizer(["red", "circle"], 8)
    with pytest.warns(UserWarning, match="dragon not in the model's vocabulary of 2 words"):
        tokenizer("a red dragon")


def test_provenance_is_truthful(tiny_checkpoints, tmp_path, capsys):
    sd1 = CheckpointModel(tiny_checkpoints["sd1"])
    once = save_checkpoint(sd1, erase(sd1, "uce", Concepts.build(["x"]), {"token_policy": "last_word"}).patch,
                           tmp_path / "once.safetensors")
    model = CheckpointModel(once)
    result = erase(model, "uce", Concepts.build(["y"]), {"token_policy": "last_word"})
    twice = save_checkpoint(model, result.patch, tmp_path / "twice.safetensors")
    with safe_open(str(twice), "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny random sd1 (erased: x, y)"  # not nested per step
    patch = save_patch(result.patch, tmp_path / "patch.safetensors")
    other = make_tiny_checkpoint(tmp_path / "other.safetensors", "sd1", seed=7)
    assert main(["apply", str(other), str(patch), "--out", str(tmp_path / "forced.safetensors"), "--force"]) == 0
    with safe_open(str(tmp_path / "forced.safetensors"), "pt") as f:
        meta = f.metadata()
    step = json.loads(meta["concept_eraser.steps"])[-1]
    assert step["source"]["sha256"] == file_sha256(once)  # where the patch was solved
    assert step["applied"] == {"to": {"name": "other.safetensors", "sha256": file_sha256(other)}, "forced": True}
    assert meta["concept_eraser.source_sha256"] == file_sha256(other)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "forced.safetensors")]) == 0
    assert "applied as a patch to other.safetensors with --force" in capsys.readouterr().out
