"""train.py end to end on the toy backbones: run directory contract, resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runtime
import train

ROOT = Path(__file__).resolve().parents[1]
# tiny, fast settings: a 60-step teacher, a handful of distillation steps
FAST = ["--teacher-steps", "60", "--n-eval", "100", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "2", "--log-every", "1", "--eval-teacher-steps", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(args, cache):
    return train.main([*FAST, "--cache-dir", cache, *args])


@pytest.mark.parametrize("backbone", ["toy2d", "digits"])
@pytest.mark.parametrize("method", ["tbcm", "scm"])
def test_run_directory_contract(backbone, method, cache, tmp_path):
    """The run directory train.py promises: config.json, checkpoints/, student/, metrics.json
    (schema), samples.png, training.png, log.jsonl."""
    out = tmp_path / "run"
    args = ["--backbone", backbone, "--method", method, "--steps", "6", "--ckpt-every", "4"]
    assert run([*args, "--out", str(out)], cache) == 0
    for name in ("config.json", "metrics.json", "samples.png", "training.png", "log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "student" / "model.safetensors").is_file()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000004", "step-0000006"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"] == backbone and m["method"] == method
    assert m["train"]["steps"] == 6 and m["train"]["nan_skipped"] == 0
    samplers = ("teacher@N", "student@1", "student@2", "student@4")
    assert set(m["eval"]) == {"distance_name", "data", *samplers}
    for k in samplers:
        v = m["eval"][k]
        assert set(v) == {"distance", "alignment", "nfe", "samples_per_s"}
        assert all(isinstance(x, (int, float)) and x == x for x in v.values())
    assert m["eval"]["student@2"]["nfe"] == 2 and m["eval"]["teacher@N"]["nfe"] == 8
    assert len((out / "log.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("ema", ["0.999", "0"])
def test_resume_is_bit_identical(ema, cache, tmp_path):
    """k steps, stop, --resume to n == n steps uninterrupted: the same student, EMA and log,
    bitwise (CPU); with --ema-decay 0 there is no EMA copy, in memory or in the checkpoint."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--backbone", "digits", "--ckpt-every", "3", "--ema-decay", ema]
    assert run([*common, "--steps", "7", "--out", str(a)], cache) == 0
    assert run([*common, "--steps", "5", "--out", str(b)], cache) == 0
    assert run([*common, "--steps", "7", "--out", str(b), "--resume"], cache) == 0
    ta = load_file(a / "checkpoints" / "step-0000007" / "tensors.safetensors")
    tb = load_file(b / "checkpoints" / "step-0000007" / "tensors.safetensors")
    assert ta.keys() == tb.keys()
    assert any(k.startswith("ema/") for k in ta) == (ema != "0")
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ

    def log_without_wall_time(run_dir):
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k != "wall_s"} for ln in lines]

    assert log_without_wall_time(a) == log_without_wall_time(b)


@pytest.mark.parametrize(
    "args",
    [
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
        ["--vae-batch", "0", "--backbone", "sana", "--tiny"],
        ["--frozen-precision", "bf16"],
        ["--plain-prompts"],
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, tmp_path, cache):
    """train.py's bad-input contract: exit 2, one line `error: …`, no run directory."""
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "train.py", *args, "--out", str(out), "--cache-dir", cache],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not out.exists()


def test_existing_run_needs_resume_or_overwrite(cache, tmp_path):
    """A finished run is never silently replaced."""
    out = tmp_path / "run"
    args = ["--backbone", "toy2d", "--steps", "2", "--out", str(out)]
    assert run(args, cache) == 0
    assert run(args, cache) == 2
    assert run([*args, "--overwrite"], cache) == 0


def test_nan_steps_are_skipped_then_stop(cache, tmp_path, monkeypatch):
    """NaN guard: NaN losses are skipped and counted; max_bad_steps in a row stop it (exit 1)."""
    import loss as loss_mod

    real = loss_mod.scm_loss
    monkeypatch.setattr(
        train, "scm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1])
    )
    out = tmp_path / "run"
    args = ["--backbone", "toy2d", "--steps", "10", "--max-bad-steps", "3", "--ckpt-every", "1"]
    assert run([*args, "--out", str(out)], cache) == 1
    assert not (out / "metrics.json").exists()


def logged(run: Path, key: str) -> list[float]:
    return [json.loads(ln)[key] for ln in (run / "log.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one(cache, tmp_path, torchrun):
    """Data parallel: 2 gloo ranks (one prompt slot each) draw the pairs one process draws and
    average the same gradient. What must be equal is compared: step 0's gradient norm (same weights,
    same pairs: only summation order differs), later steps' too, and the weights after 5 AdamW
    steps to within half a learning rate (Adam divides each coordinate by its own gradient's size,
    so coordinates with a near-zero gradient move by up to lr on rounding noise). CFG w = 2 keeps
    the loss away from zero from step 0: with w = 1 and r = 0 the student equals its target there
    and its whole gradient is rounding noise (rank 0 logs its own half's loss)."""
    flags = ["--backbone", "toy2d", "--steps", "5", "--pool-steps", "1", "--filter-mode", "off"]
    flags += ["--cfg-scales", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run([*flags, "--out", str(one)], cache) == 0
    p = torchrun(["train.py", *FAST, "--cache-dir", cache, *flags, "--out", str(two)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert min(logged(one, "loss")) > 0.1  # a real gradient at every step
    g1, g2 = logged(one, "grad_norm"), logged(two, "grad_norm")
    assert g1[0] == pytest.approx(g2[0], rel=1e-6) and g1 == pytest.approx(g2, rel=1e-4)
    a = load_file(one / "checkpoints" / "step-0000005" / "tensors.safetensors")
    b = load_file(two / "checkpoints" / "step-0000005" / "tensors.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert diff < 0.5 * 2e-4  # the toy2d preset's lr
    # it trained
    assert any(not torch.equal(a[k], a["ema/" + k[8:]]) for k in a if k.startswith("student/"))
    assert json.loads((two / "metrics.json").read_text())["train"]["processes"] == 2


def test_ctrl_c_saves_a_checkpoint_and_resumes(cache, tmp_path):
    """Ctrl-C: the step in progress finishes, a checkpoint is saved, exit 130; --resume goes on."""
    import signal
    import time

    out = tmp_path / "run"
    run(["--backbone", "toy2d", "--steps", "1", "--out", str(tmp_path / "warm")], cache)  # cache
    args = ["--backbone", "toy2d", "--steps", "100000", "--ckpt-every", "100000", "--out", str(out)]
    p = subprocess.Popen(
        [sys.executable, "train.py", *FAST, "--cache-dir", cache, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, deadline = out / "log.jsonl", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-1000:]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = json.loads((last / "state.json").read_text())["train"]["step"]
    assert step >= 3 and last.name == f"step-{step:07d}"
    resume = ["--backbone", "toy2d", "--steps", str(step + 2), "--out", str(out), "--resume"]
    assert run(resume, cache) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == step + 2


def test_no_ema_copy_at_decay_0():
    """runtime.ema_of: decay 0 evaluates the raw student itself (no second copy of its weights);
    ema_update on it is a no-op, not an in-place write to leaves that require grad."""
    net = torch.nn.Linear(3, 2)
    assert runtime.ema_of(net, 0.0) is net
    before = [p.detach().clone() for p in net.parameters()]
    runtime.ema_update(net, net, 0.0, 7)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    ema = runtime.ema_of(net, 0.9)
    assert ema is not net and not any(p.requires_grad for p in ema.parameters())
    runtime.ema_update(ema, torch.nn.Linear(3, 2), 0.9, 0)  # β = 0.1: moves towards the model
    assert not torch.equal(ema.weight, net.weight)
    assert ema.weight.grad_fn is None and not ema.weight.requires_grad  # no graph kept
