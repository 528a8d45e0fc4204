"""--student lora (lora.py): the teacher's passes through the shared module are the separate
teacher's bit for bit, before and after training; the JVP through the adapter; checkpoints of what
trains only, resume, other base weights refused; export (merged, and the adapter onto the teacher);
the bank and torchrun; on digits, toy2d and tiny Sana."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import backbones
import bank
import lora
import sana
import toy_teacher
import train
from checkpoint import seeded_or_cached
from config import parse_args
from loss import jvp_cs_dF_dt
from oracles import SmoothMLP
from trigflow import SIGMA_D, TrigFlow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--teacher-steps", "60", "--n-eval", "100", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "2", "--log-every", "1", "--eval-teacher-steps", "4"]
LORA = ["--student", "lora", "--lora-rank", "4"]
SANA = ["--backbone", "sana", "--tiny", "--N", "4", "--n-eval", "4", "--eval-teacher-steps", "4"]
SANA += ["--prompts", "2", "--K", "1", "--pool-steps", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def perturb(net: torch.nn.Module, seed: int) -> None:
    """What training does to a LoRA student: every trainable tensor moves (B leaves 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(T, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *T.data_shape), generator=g)
    s, prompt = torch.rand(n, generator=g), torch.arange(n) % len(T.prompt_names)
    return x, s, T.cond(prompt)


@pytest.mark.parametrize("backbone", ["digits", "toy2d", "sana"])
def test_teacher_view_is_the_separate_teacher_bit_for_bit(backbone, cache):
    """The shared module in teacher mode = the separate teacher copy, bit for bit, at step 0 and
    after the adapter and guidance embedding moved; the student at step 0 = the teacher too; only
    the adapter and the guidance embedding train."""
    flags = ["--backbone", backbone, "--cache-dir", cache]
    flags += ["--tiny"] if backbone == "sana" else ["--teacher-steps", "60"]
    ref, T = backbones.build(parse_args(flags)), backbones.build(parse_args([*flags, *LORA]))
    student = T.student()
    assert T.velocity is not ref.velocity
    x, s, cond = inputs(T)
    g = torch.full((3,), 0.45)  # 0.1·w at w = 4.5
    with torch.no_grad():
        want = ref.velocity(x, s, cond, None)
        assert torch.equal(T.velocity(x, s, cond, None), want)
        # B = 0 and guidance output 0; Sana's student attends by matmul (JVP-safe), the teacher
        # by SDPA: equal up to the kernels' rounding
        tol = 1e-5 if backbone == "sana" else 0.0
        assert torch.allclose(student(x, s, cond, g), want, atol=tol, rtol=0)
        perturb(student, 1)
        assert torch.equal(T.velocity(x, s, cond, None), want)
        assert not torch.allclose(student(x, s, cond, g), want, atol=1e-4)
    assert lora.trainable_names(student) and all(
        "lora_" in n or "guidance" in n for n in lora.trainable_names(student)
    )
    if backbone == "sana":  # one copy of the weights: the separate transformer was dropped
        assert T.parts.transformer is None


def test_jvp_through_a_lora_student_matches_central_difference(float64):
    """Eq. 3 by torch.func.jvp through LoRA layers (B moved) = a central difference, ≤ 1e-6."""
    net = SmoothMLP(dim=3)
    lora.add_lora(net, 2, 0.0, ())
    perturb(net, 2)
    cond, w = torch.tensor([0, 1, 2, 0]), torch.linspace(1, 5, 4)
    F_student = TrigFlow(net, guidance_scale=0.1)
    F = lambda x, t: F_student(x, t, cond, w)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    x_t, dxdt = SIGMA_D * torch.randn(4, 3, generator=g), SIGMA_D * torch.randn(4, 3, generator=g)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4])
    _, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    _, fd = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D, fd_eps=1e-5)
    assert (cs_dF_dt - fd).norm() / fd.norm() < 1e-6


def ckpt(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "tensors.safetensors")


def test_lora_run_checkpoints_resume_and_export(cache, tmp_path, capsys):
    """digits: the checkpoint holds only what trains (+ the base hash), resuming is bit-identical,
    another teacher's base is refused (exit 2); teacher@N equals the full student's run (the
    teacher passes are the teacher's after training); the exported student (merged) and the
    adapter loaded onto the teacher's net give the same 1-step output."""
    a, b, full = tmp_path / "a", tmp_path / "b", tmp_path / "full"
    common = [*FAST, "--cache-dir", cache, "--backbone", "digits", "--ckpt-every", "3"]
    assert train.main([*common, *LORA, "--steps", "7", "--out", str(a)]) == 0
    assert train.main([*common, *LORA, "--steps", "5", "--out", str(b)]) == 0
    assert train.main([*common, *LORA, "--steps", "7", "--out", str(b), "--resume"]) == 0
    ta, tb = ckpt(a, 7), ckpt(b, 7)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    kept = [k for k in ta if k.startswith(("student/", "ema/"))]
    assert kept and all("lora_" in k or "guidance" in k for k in kept)
    state = json.loads((a / "checkpoints" / "step-0000007" / "state.json").read_text())
    assert len(state["base_sha256"]) == 64
    other = [*FAST, "--cache-dir", cache, "--backbone", "digits", "--teacher-steps", "61"]
    assert train.main([*other, *LORA, "--steps", "8", "--out", str(a), "--resume"]) == 2
    assert "other base weights" in capsys.readouterr().err

    assert train.main([*common, "--steps", "7", "--out", str(full)]) == 0
    assert train.main([*common, *LORA, "--steps", "8", "--out", str(full), "--resume"]) == 2
    assert "is not of a --student lora" in capsys.readouterr().err
    ev = [json.loads((r / "metrics.json").read_text())["eval"]["teacher@N"] for r in (a, full)]
    assert ev[0]["distance"] == ev[1]["distance"]

    cfg = parse_args(["--backbone", "digits", "--teacher-steps", "60", "--cache-dir", cache])
    make = toy_teacher.make_net
    merged, _ = seeded_or_cached(make, toy_teacher.TEACHERS["digits"], a / "student", "cpu")
    onto = backbones.toy_net(cfg)  # the teacher's net, then the adapter on it
    config = json.loads((a / "student_lora" / "adapter_config.json").read_text())
    from peft import LoraConfig

    lora.load_adapter(
        onto, LoraConfig(**config), load_file(a / "student_lora" / "adapter_model.safetensors")
    )
    x, s = torch.randn(5, 1, 8, 8), torch.ones(5)
    c, g = torch.arange(5), torch.full((5,), 0.2)
    with torch.no_grad():
        assert torch.allclose(merged(x, s, c, g), onto(x, s, c, g), atol=1e-5)
        assert not torch.allclose(merged(x, s, c, g), backbones.toy_net(cfg)(x, s, c, g))


def test_lora_lr_is_the_adapters_rate_alone(cache, tmp_path):
    """--lora-lr: the adapter in its own AdamW group at that rate, the guidance embedding and the
    logvar head at --lr. Adam's first step moves a coordinate by its group's lr (g/|g|): B starts
    at 0, so after one step max|B| is --lora-lr; without the flag it is --lr, in one group."""
    common = [*FAST, "--cache-dir", cache, "--backbone", "digits", "--steps", "1", *LORA]
    common += ["--lr", "1e-5", "--ckpt-every", "1"]
    own, same = tmp_path / "own", tmp_path / "same"
    assert train.main([*common, "--lora-lr", "1e-3", "--out", str(own)]) == 0
    assert train.main([*common, "--out", str(same)]) == 0
    for run, lrs, moved in ((own, [1e-5, 1e-3], 1e-3), (same, [1e-5], 1e-5)):
        state = json.loads((run / "checkpoints" / "step-0000001" / "state.json").read_text())
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == lrs
        t = ckpt(run, 1)
        b = max(float(t[k].abs().max()) for k in t if k.startswith("student/") and "lora_B" in k)
        assert b == pytest.approx(moved, rel=1e-3)
    flags = ["--backbone", "digits", "--teacher-steps", "60", "--cache-dir", cache, *LORA]
    student, head = (
        backbones.build(parse_args(flags)).student(),
        [torch.nn.Parameter(torch.ones(2))],
    )
    groups = lora.param_groups(student, head, 1e-5, 1e-3)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all("lora_" in names[id(p)] for p in groups[1]["params"])
    assert all("lora_" not in names.get(id(p), "head") for p in groups[0]["params"])
    n = len(lora.trainable_names(student)) + len(head)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n


def test_lora_from_a_bank_is_the_online_lora_run(cache, tmp_path):
    """--bank with --student lora: the same checkpoints as the online LoRA run, bit for bit."""
    pairs = [*FAST, "--backbone", "digits", "--cache-dir", cache]
    folder = tmp_path / "bank"
    build = ["build", "--out", str(folder), "--pools", "2", "--backbone", "digits"]
    build += ["--teacher-steps", "60", "--N", "4", "--prompts", "2", "--K", "2"]
    assert bank.main([*build, "--pool-steps", "2", "--cache-dir", cache]) == 0
    online, banked = tmp_path / "online", tmp_path / "banked"
    assert train.main([*pairs, *LORA, "--steps", "4", "--out", str(online)]) == 0
    run = ["--n-eval", "100", "--log-every", "1", "--eval-teacher-steps", "4", "--pool-steps", "2"]
    args = [*run, "--cache-dir", cache, "--bank", str(folder), *LORA, "--steps", "4"]
    assert train.main([*args, "--out", str(banked)]) == 0
    a, b = ckpt(online, 4), ckpt(banked, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_torchrun(cache, tmp_path, torchrun):
    """2 gloo ranks with a LoRA student: the gradient of what trains is averaged (step 0's norm as
    one process's), and rank 0 writes an adapter-only checkpoint."""
    flags = ["--backbone", "toy2d", "--steps", "3", "--pool-steps", "1", "--filter-mode", "off"]
    flags += ["--cfg-scales", "2", *LORA, "--cache-dir", cache]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*FAST, *flags, "--out", str(one)]) == 0
    p = torchrun(["train.py", *FAST, *flags, "--out", str(two)])
    assert p.returncode == 0, p.stderr[-2000:]
    norms = [
        [json.loads(ln)["grad_norm"] for ln in (r / "log.jsonl").read_text().splitlines()]
        for r in (one, two)
    ]
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-5)
    assert ckpt(one, 3).keys() == ckpt(two, 3).keys()


def test_sana_lora_run_and_export(cache, tmp_path):
    """tiny Sana: a LoRA run trains and exports a SanaSprintPipeline folder (merged) and the
    adapter; the adapter on a Sprint student built from the teacher gives the exported student's
    1-step output."""
    from diffusers import SanaTransformer2DModel
    from peft import LoraConfig

    out = tmp_path / "run"
    assert train.main([*SANA, *LORA, "--cache-dir", cache, "--steps", "2", "--out", str(out)]) == 0
    exported = SanaTransformer2DModel.from_pretrained(out / "student" / "transformer")
    cfg = parse_args([*SANA, "--cache-dir", cache])
    T = backbones.build(cfg)
    onto = sana.SanaVelocity(sana.make_student(T.parts.transformer, 1.0), 1.0)
    config = json.loads((out / "student_lora" / "adapter_config.json").read_text())
    state = load_file(out / "student_lora" / "adapter_model.safetensors")
    lora.load_adapter(onto, LoraConfig(**config), state)
    x, s, cond = inputs(T, 2)
    g = torch.full((2,), 0.45)
    with torch.no_grad():
        want = sana.SanaVelocity(exported, 1.0)(x, s, cond, g)
        assert torch.allclose(onto(x, s, cond, g), want, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-rank", "8"], "need --student lora"),
        (["--lora-lr", "1e-4"], "need --student lora"),
        ([*LORA, "--lora-lr", "-1"], "--lora-lr must be >= 0"),
        ([*LORA, "--lora-targets", "nothing_here"], "--lora-targets"),
        (["--student", "lora", "--lora-rank", "0"], "--lora-rank must be >= 1"),
        ([*SANA, *LORA, "--frozen-precision", "bf16"], "needs --precision bf16"),
    ],
)
def test_bad_lora_flags_exit_2(args, message, cache, tmp_path, capsys):
    """One line, exit 2, no run directory (targets are matched once the teacher's net exists: the
    cached teacher is built first, so its training bar does not share stderr)."""
    backbones.build(
        parse_args(["--backbone", "digits", "--teacher-steps", "60", "--cache-dir", cache])
    )
    capsys.readouterr()
    out = tmp_path / "run"
    assert train.main([*FAST, "--cache-dir", cache, "--steps", "1", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
