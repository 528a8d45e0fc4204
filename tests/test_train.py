"""train.py end to end on the toy backbones: run directory contract, resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
# tiny, fast settings: a 60-step teacher, a handful of distillation steps
FAST = ["--teacher-steps", "60", "--n-eval", "100", "--N", "4", "--prompts", "2", "--K", "2",
        "--pool-steps", "2", "--log-every", "1", "--eval-teacher-steps", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(args, cache):
    return train.main([*FAST, "--cache-dir", cache, *args])


@pytest.mark.parametrize("backbone", ["toy2d", "digits"])
@pytest.mark.parametrize("method", ["tbcm", "scm"])
def test_run_directory_contract(backbone, method, cache, tmp_path):
    """DESIGN §5: config.json, checkpoints/, student/, metrics.json (schema), samples.png, training.png, log."""
    out = tmp_path / "run"
    assert run(["--backbone", backbone, "--method", method, "--steps", "6", "--ckpt-every", "4",
                "--out", str(out)], cache) == 0
    for name in ("config.json", "metrics.json", "samples.png", "training.png", "log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "student" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"] == backbone and m["method"] == method
    assert m["train"]["steps"] == 6 and m["train"]["nan_skipped"] == 0
    assert set(m["eval"]) == {"distance_name", "data", "teacher@N", "student@1", "student@2", "student@4"}
    for k in ("teacher@N", "student@1", "student@2", "student@4"):
        v = m["eval"][k]
        assert set(v) == {"distance", "alignment", "nfe", "samples_per_s"}
        assert all(isinstance(x, (int, float)) and x == x for x in v.values())
    assert m["eval"]["student@2"]["nfe"] == 2 and m["eval"]["teacher@N"]["nfe"] == 8
    assert len((out / "log.jsonl").read_text().splitlines()) == 6


def test_resume_is_bit_identical(cache, tmp_path):
    """k steps, stop, --resume to n == n steps uninterrupted: same student, EMA, log (CPU, bitwise)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--backbone", "digits", "--ckpt-every", "3"]
    assert run([*common, "--steps", "7", "--out", str(a)], cache) == 0
    assert run([*common, "--steps", "5", "--out", str(b)], cache) == 0
    assert run([*common, "--steps", "7", "--out", str(b), "--resume"], cache) == 0
    ta = load_file(a / "checkpoints" / "step-0000007" / "tensors.safetensors")
    tb = load_file(b / "checkpoints" / "step-0000007" / "tensors.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]
    strip = [{k: v for k, v in json.loads(ln).items() if k != "wall_s"}
             for ln in (a / "log.jsonl").read_text().splitlines()]
    strip_b = [{k: v for k, v in json.loads(ln).items() if k != "wall_s"}
               for ln in (b / "log.jsonl").read_text().splitlines()]
    assert strip == strip_b


@pytest.mark.parametrize("args", [
    ["--backbone", "imagenet"],
    ["--method", "dmd"],
    ["--scheme", "cosine"],
    ["--N", "1"],
    ["--lr", "-1"],
    ["--r-final", "2"],
    ["--steps", "many"],
    ["--backbone", "cifar10"],
    ["--backbone", "cifar10", "--data-dir", "/nonexistent/cifar-10-batches-py"],
    ["--resume"],
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, tmp_path, cache):
    """DESIGN §5: exit 2, one line `error: …`, no run directory."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", *args, "--out", str(out), "--cache-dir", cache],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not out.exists()


def test_existing_run_needs_resume_or_overwrite(cache, tmp_path):
    """A finished run is never silently replaced."""
    out = tmp_path / "run"
    assert run(["--backbone", "toy2d", "--steps", "2", "--out", str(out)], cache) == 0
    assert run(["--backbone", "toy2d", "--steps", "2", "--out", str(out)], cache) == 2
    assert run(["--backbone", "toy2d", "--steps", "2", "--out", str(out), "--overwrite"], cache) == 0


def test_nan_steps_are_skipped_then_stop(cache, tmp_path, monkeypatch):
    """NaN guard: NaN losses are skipped and counted; max_bad_steps in a row stop the run (exit 1)."""
    import loss as loss_mod

    real = loss_mod.scm_loss
    monkeypatch.setattr(train, "scm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    out = tmp_path / "run"
    assert run(["--backbone", "toy2d", "--steps", "10", "--max-bad-steps", "3", "--ckpt-every", "1",
                "--out", str(out)], cache) == 1
    assert not (out / "metrics.json").exists()


def test_torchrun_two_processes_match_one(cache, tmp_path):
    """Data parallel: 2 gloo ranks (one prompt each) end with the student of 1 process with the same global batch
    and the same pairs (seeded per prompt slot); only gradient summation order differs (≤ 1e-5)."""
    flags = [*FAST, "--cache-dir", cache, "--backbone", "toy2d", "--steps", "5", "--pool-steps", "1",
             "--filter-mode", "off"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(["--backbone", "toy2d", "--steps", "5", "--pool-steps", "1", "--filter-mode", "off",
                "--out", str(one)], cache) == 0
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29517", "train.py", *flags, "--out", str(two)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    a = load_file(one / "checkpoints" / "step-0000005" / "tensors.safetensors")
    b = load_file(two / "checkpoints" / "step-0000005" / "tensors.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert diff < 1e-5
    assert any(not torch.equal(a[k], a["ema/" + k[8:]]) for k in a if k.startswith("student/"))  # it trained
    assert json.loads((two / "metrics.json").read_text())["train"]["processes"] == 2


def test_ctrl_c_saves_a_checkpoint_and_resumes(cache, tmp_path):
    """Ctrl-C: the current step finishes, a checkpoint is saved, exit 130; --resume continues from it."""
    import signal
    import time

    out = tmp_path / "run"
    run(["--backbone", "toy2d", "--steps", "1", "--out", str(tmp_path / "warm")], cache)  # teacher cached
    p = subprocess.Popen([sys.executable, "train.py", *FAST, "--cache-dir", cache, "--backbone", "toy2d",
                          "--steps", "100000", "--ckpt-every", "100000", "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "log.jsonl", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-1000:]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = json.loads((last / "state.json").read_text())["train"]["step"]
    assert step >= 3 and last.name == f"step-{step:07d}"
    assert run(["--backbone", "toy2d", "--steps", str(step + 2), "--out", str(out), "--resume"], cache) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == step + 2
