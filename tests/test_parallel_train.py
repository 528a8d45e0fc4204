"""train.py on PyTorch's own engines: --accum-steps (micro-batches adding up to the whole step's
gradient, in one process and under torchrun's DDP), --shard fsdp (FSDP2 on the tiny Sana pipeline:
the same training as DDP, an exported SanaSprintPipeline that loads, a bit-identical resume), and
the refusals of what the processes, devices and flags cannot do together."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import backbones
import config
import train
from pairs import TBCMPairs

FAST = ["--teacher-steps", "60", "--n-eval", "100", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "2", "--log-every", "1", "--eval-teacher-steps", "4"]
SANA = ["--backbone", "sana", "--tiny", "--N", "4", "--n-eval", "4", "--eval-batch", "4"]
SANA += ["--eval-teacher-steps", "4", "--log-every", "1", "--filter-mode", "off"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def gradients(flags: list[str], cache: str, tmp_path: Path, monkeypatch) -> list[torch.Tensor]:
    """The gradient of train.train's first optimiser step (as clipping sees it), with its stats
    line: one step of digits TBCM whose brightness filter drops 7 of 24 pairs (the kept count
    matters)."""
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm):
        seen.append([p.grad.detach().clone() for p in params])
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    run = tmp_path / "_".join(flags or ["whole"])
    args = [*FAST, "--prompts", "4", "--steps", "1", "--cache-dir", cache, "--out", str(run)]
    cfg = config.parse_args([*args, "--filter-mode", "hard", "--filter-threshold", "1", *flags])
    teacher = backbones.build(cfg)
    run.mkdir()
    train.train(cfg, teacher.student(), TBCMPairs(cfg, teacher), run)
    log = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    return seen[0], log


def test_accumulation_adds_up_to_the_whole_step(cache, tmp_path, monkeypatch):
    """--accum-steps A splits a step's 24 pairs into A micro-batches (3 of 8; 5 of 5 or 4): each
    micro-batch's kept pairs divided by the whole step's kept count, so the gradients add up to the
    whole batch's (fp32, ‖Δ‖ ≤ 1e-5‖g‖ per tensor: only the summation order differs), and the
    logged statistics (loss, per-bin losses, ‖g‖, kept share) are the whole batch's."""
    whole, log = gradients([], cache, tmp_path, monkeypatch)
    assert 0 < log["kept"] < 1  # the filter dropped some pairs: the divisor is the step's
    for A in ("3", "5"):
        parts, log_a = gradients(["--accum-steps", A], cache, tmp_path, monkeypatch)
        for g, g_a in zip(whole, parts, strict=True):
            assert float((g_a - g).norm()) <= 1e-5 * float(g.norm())
        for k in ("loss", "g_norm", "kept", "grad_norm"):
            assert log_a[k] == pytest.approx(log[k], rel=1e-5), k
        assert log_a["loss_by_t_bin"] == pytest.approx(log["loss_by_t_bin"], rel=1e-5, nan_ok=True)
    # a planted divisor of each micro-batch's own kept count would scale them: not the whole's
    assert sum(float(g.norm()) for g in whole) > 0


def logged(run: Path, key: str) -> list[float]:
    return [json.loads(ln)[key] for ln in (run / "log.jsonl").read_text().splitlines()]


def tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "tensors.safetensors")


def test_accumulation_under_torchrun_matches_one_process(cache, tmp_path, torchrun):
    """2 gloo ranks (DDP) with --accum-steps 2 (no_sync on the first micro-batch) train as one
    process on the whole batch: step 0's gradient norm to rel 1e-6, later steps' to 1e-4, the
    weights after 4 AdamW steps within half a learning rate (see test_train's torchrun test)."""
    flags = ["--backbone", "toy2d", "--steps", "4", "--pool-steps", "1", "--filter-mode", "off"]
    flags += ["--cfg-scales", "2", "--cache-dir", cache]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*FAST, *flags, "--out", str(one)]) == 0
    p = torchrun(["train.py", *FAST, *flags, "--accum-steps", "2", "--out", str(two)])
    assert p.returncode == 0, p.stderr[-2000:]
    g1, g2 = logged(one, "grad_norm"), logged(two, "grad_norm")
    assert g1[0] == pytest.approx(g2[0], rel=1e-6) and g1 == pytest.approx(g2, rel=1e-4)
    a, b = tensors(one, 4), tensors(two, 4)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert diff < 0.5 * 2e-4  # the toy2d preset's lr
    assert json.loads((two / "config.json").read_text())["accum_steps"] == 2


def test_fsdp_trains_as_ddp_exports_and_resumes_bit_identically(cache, tmp_path, torchrun):
    """--shard fsdp on the tiny Sana pipeline, 2 gloo ranks: (1) the same training as DDP without
    sharding (step 0's gradient norm to rel 1e-6, the weights after 4 steps within half the lr);
    (2) checkpoints hold the whole tensors under the names of an unsharded run; (3) stopped after
    2 steps and resumed to 4 it ends bit for bit where the uninterrupted run does; (4) its student
    folder loads as a SanaSprintPipeline and samples."""
    from diffusers import SanaSprintPipeline

    base = [*SANA, "--cache-dir", cache, "--prompts", "2", "--ckpt-every", "2"]
    base += ["--optimizer", "adamw"]  # FSDP2's (the sana preset's CAME is not sharded) on both
    ddp, fsdp, cut = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "cut"
    for out, extra in ((ddp, []), (fsdp, ["--shard", "fsdp"])):
        p = torchrun(["train.py", *base, *extra, "--steps", "4", "--out", str(out)], timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    shutil.copytree(fsdp, cut)  # the run as a kill after step 2 leaves it
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    resume = ["--shard", "fsdp", "--steps", "4", "--resume", "--out", str(cut)]
    p = torchrun(["train.py", *base, *resume], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    g_ddp, g_fsdp = logged(ddp, "grad_norm"), logged(fsdp, "grad_norm")
    assert g_ddp[0] == pytest.approx(g_fsdp[0], rel=1e-6)
    assert g_ddp == pytest.approx(g_fsdp, rel=1e-4)
    a, b, c = tensors(ddp, 4), tensors(fsdp, 4), tensors(cut, 4)
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # whole, same names
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert 0 < diff < 0.5 * 1e-5  # the sana preset's lr; sharded sums differ in their last bits
    assert set(b) == set(c) and all(torch.equal(b[k], c[k]) for k in b)  # resume: bit for bit
    assert logged(cut, "loss") == logged(fsdp, "loss")
    pipe = SanaSprintPipeline.from_pretrained(fsdp / "student")
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=64, use_resolution_binning=False, max_sequence_length=16)
    image = pipe(
        prompt="a red cube",
        num_inference_steps=1,
        intermediate_timesteps=None,
        complex_human_instruction=None,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **size,
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_fsdp_with_an_ema_matches_ddp(cache, tmp_path, torchrun):
    """--shard fsdp on toy2d with an EMA (decay 0.9, sharded as the student): after 4 steps the
    student and its EMA match the DDP run's within half the learning rate, and the EMA, gathered
    whole on rank 0, is the evaluated and exported student (metrics.json written)."""
    flags = ["--backbone", "toy2d", "--steps", "4", "--pool-steps", "1", "--filter-mode", "off"]
    flags += ["--cfg-scales", "2", "--ema-decay", "0.9", "--cache-dir", cache]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, extra in ((ddp, []), (fsdp, ["--shard", "fsdp"])):
        p = torchrun(["train.py", *FAST, *flags, *extra, "--out", str(out)])
        assert p.returncode == 0, p.stderr[-2000:]
    a, b = tensors(ddp, 4), tensors(fsdp, 4)
    assert set(a) == set(b) and any(k.startswith("ema/") for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.5 * 2e-4  # toy2d's lr
    ev_a, ev_b = (json.loads((d / "metrics.json").read_text())["eval"] for d in (ddp, fsdp))
    assert ev_a["student@1"]["distance"] == pytest.approx(ev_b["student@1"]["distance"], rel=1e-2)


@pytest.mark.parametrize(
    "flags, world, says",
    [
        (["--shard", "fsdp"], 1, "--shard fsdp shards over processes"),
        (["--shard", "fsdp", "--student", "lora"], 2, "--shard fsdp shards a full student"),
        (["--shard", "fsdp", "--sample-every", "5"], 2, "--sample-every draws on rank 0 alone"),
        (["--shard", "fsdp", "--optimizer", "came"], 2, "--optimizer came keeps whole-matrix"),
        (["--accum-steps", "7"], 1, "--accum-steps 7 exceeds the 6 pairs per process"),
        (["--prompts", "3"], 2, "--prompts 3 must be a multiple of the 2 processes"),
    ],
)
def test_refused_in_one_line(flags, world, says, tmp_path, monkeypatch, capsys):
    """What the processes (torchrun's WORLD_SIZE) and the flags cannot do together: exit 2, one
    line naming the flags, nothing written."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    out = tmp_path / "run"
    args = ["--backbone", "toy2d", "--N", "4", "--prompts", "2", "--K", "1", *flags]
    assert train.main([*args, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), lines
    assert not out.exists() and not (tmp_path / "c").exists()
