"""optimizers.py: CAME as the official configs step it, against a transcription of its update rule
(float64) and against the reference implementation (came-pytorch) where their factorisations
agree; its factored state's size; --optimizer came training, checkpointing and resuming bit for
bit, and the sana preset's official optimiser."""

import json

import pytest
import torch
from safetensors.torch import load_file

import config
import optimizers
import train

FAST = ["--backbone", "toy2d", "--teacher-steps", "60", "--n-eval", "100", "--N", "4"]
FAST += ["--prompts", "2", "--K", "2", "--pool-steps", "2", "--log-every", "1"]
FAST += ["--eval-teacher-steps", "4"]


def came_rule(theta, grads, lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), d=1.0):
    """CAME (Luo et al., 2023, Alg. 1) on one matrix θ [n, k], transcribed: r, c the row and column
    means of the squared gradient's EMA, V = r cᵀ/mean(r) its rank-1 estimate (Adafactor), u = G/√V
    clipped to RMS d, m its EMA; the instability (u − m)² factored the same way (S) scales m.
    Returns θ after each gradient of `grads`."""
    b1, b2, b3 = betas
    n, k = theta.shape
    r, c, R, C = (torch.zeros(n), torch.zeros(k), torch.zeros(n), torch.zeros(k))
    r, c, R, C = (x.double() for x in (r, c, R, C))
    m = torch.zeros_like(theta)
    out = []
    for G in grads:
        U = G * G + eps[0]
        r = b2 * r + (1 - b2) * U.mean(1)
        c = b2 * c + (1 - b2) * U.mean(0)
        V = torch.outer(r, c) / r.mean()  # rank-1 estimate of the squared gradient's EMA
        u = G / V.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
        m = b1 * m + (1 - b1) * u
        res = (u - m) ** 2 + eps[1]
        R = b3 * R + (1 - b3) * res.mean(1)
        C = b3 * C + (1 - b3) * res.mean(0)
        S = torch.outer(R, C) / R.mean()
        theta = theta - lr * m / S.sqrt()
        out.append(theta.clone())
    return out


def steps(param: torch.Tensor, grads: list[torch.Tensor], opt_cls, **kw) -> list[torch.Tensor]:
    p = torch.nn.Parameter(param.clone())
    opt = opt_cls([p], **kw)
    out = []
    for G in grads:
        p.grad = G.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt


def test_came_step_is_its_update_rule():
    """Three steps on a 3×4 matrix in float64 (gradients of different scales, one large enough to
    be clipped) equal the transcribed rule to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [s * torch.randn(3, 4, generator=gen, dtype=torch.float64) for s in (1.0, 1e-3, 5.0)]
    ours, _ = steps(theta, grads, optimizers.Came, lr=1e-2)
    want = came_rule(theta, grads, lr=1e-2)
    for a, b in zip(ours, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours[0], theta)  # it moved


@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_came_matches_the_reference_implementation(shape):
    """A matrix (factored) and a vector (whole second moments): the same steps as came-pytorch's
    CAME with the same betas and eps (float64, 1e-12), whose factorisation agrees with
    CAMEWrapper's on these shapes."""
    came_pytorch = pytest.importorskip("came_pytorch")
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    kw = dict(betas=optimizers.CAME_BETAS, eps=optimizers.CAME_EPS)
    ours, _ = steps(theta, grads, optimizers.Came, lr=1e-3, **kw)
    ref, _ = steps(theta, grads, came_pytorch.CAME, lr=1e-3, weight_decay=0.0, **kw)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_came_state_is_factored_for_matrices_and_1x1_convolutions():
    """CAMEWrapper's choice: a Linear's weight and a 1×1 convolution's kernel keep a row and a
    column per second moment (n + k floats each), a 3×3 kernel and a bias whole; a 1×1 kernel
    steps exactly as its matrix."""
    gen = torch.Generator().manual_seed(2)
    shapes = {"linear": (8, 6), "conv1x1": (8, 6, 1, 1), "conv3x3": (8, 1, 3, 3), "bias": (8,)}
    sizes = {}
    for name, shape in shapes.items():
        _, opt = steps(torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen)],
                       optimizers.Came, lr=1e-3)  # fmt: skip
        (st,) = opt.state.values()
        sizes[name] = {k: v.numel() for k, v in st.items()}
    for name, shape in shapes.items():  # the count the memory table uses (optimizer_state.py)
        assert optimizers.state_numel(torch.Size(shape), "came") == sum(sizes[name].values())
        assert optimizers.state_numel(torch.Size(shape), "adamw") == 2 * torch.Size(shape).numel()
    assert sizes["linear"] == dict(exp_avg=48, sq_row=8, sq_col=6, res_row=8, res_col=6)
    assert sizes["conv1x1"] == sizes["linear"]
    assert sizes["conv3x3"] == dict(exp_avg=72, exp_avg_sq=72)
    assert sizes["bias"] == dict(exp_avg=8, exp_avg_sq=8)
    theta, G = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    (a,), _ = steps(theta, [G], optimizers.Came, lr=1e-3)
    (b,), _ = steps(theta[..., None, None], [G[..., None, None]], optimizers.Came, lr=1e-3)
    assert torch.equal(a, b[..., 0, 0])


def test_optimizer_flag_and_presets():
    """--optimizer picks the optimiser; AdamW on the toy backbones, CAME in the sana preset (the
    official configs), both at --lr with the LoRA groups' own rates."""
    toy = config.parse_args(["--backbone", "toy2d"])
    sana = config.parse_args(["--backbone", "sana"])
    assert (toy.optimizer, sana.optimizer) == ("adamw", "came")
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": 5e-4}]
    came = config.parse_args(["--backbone", "toy2d", "--optimizer", "came"])
    opt = optimizers.build(groups, came)
    assert isinstance(opt, optimizers.Came) and opt.param_groups[0]["lr"] == 5e-4
    assert isinstance(optimizers.build(groups, toy), torch.optim.AdamW)


def test_came_run_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """--optimizer came on toy2d: 4 steps straight, or 2 then --resume to 4, end bit for bit equal
    (weights, EMA, CAME's state), and the checkpoint holds CAME's factored and whole moments."""
    cache = str(tmp_path / "cache")
    args = [*FAST, "--optimizer", "came", "--ckpt-every", "2", "--cache-dir", cache]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*args, "--steps", "4", "--out", str(one)]) == 0
    assert train.main([*args, "--steps", "2", "--out", str(two)]) == 0
    assert train.main([*args, "--steps", "4", "--out", str(two), "--resume"]) == 0
    a, b = (load_file(d / "checkpoints/step-0000004/tensors.safetensors") for d in (one, two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("/sq_row") for k in a) and any(k.endswith("/exp_avg_sq") for k in a)
    state = json.loads((one / "checkpoints/step-0000004/state.json").read_text())
    assert state["config"]["optimizer"] == "came"


def test_optimizer_state_table(tmp_path):
    """bench/optimizer_state.py: the students' parameter counts (meta device) and CAME's state at
    about half AdamW's (its m whole, the rest factored), as JSON and markdown."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import optimizer_state

    assert optimizer_state.main(["--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "optimizer_state.json").read_text())
    assert 0.55e9 < res["0.6B"]["params"] < 0.65e9 and 1.55e9 < res["1.6B"]["params"] < 1.65e9
    for r in res.values():
        assert r["adamw_gb"] == pytest.approx(8 * r["params"] / 2**30)
        assert 0.5 < r["came_gb"] / r["adamw_gb"] < 0.51
