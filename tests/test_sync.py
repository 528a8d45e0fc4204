"""Host syncs in the training step: bench/sync.HostReads counts the reads of tensor values that make
a GPU wait for the host; train.train's step makes one, its log line included (train.host); the
statistics of loss.py stay on the device, the loss per t-bin a mean per bin (NaN when empty)."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sync

import backbones
import train
from config import parse_args
from loss import loss_from_target, prior_weight, scm_loss
from pairs import TBCMPairs

FAST = ["--backbone", "digits", "--teacher-steps", "60", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--n-eval", "100"]


def test_host_reads_counts_what_waits_for_a_gpu():
    """float(), bool(), .item(), .tolist(), .cpu(), x[mask], nonzero: one read each, filed under
    their line and step; arithmetic, integer indexing, backward and AdamW's step counter: none."""
    x, net = torch.randn(5), torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters())
    with sync.HostReads() as reads:
        y = (x * 2).sum() + x[torch.tensor([0, 2])].mean()
        net(torch.randn(3, 2)).sum().backward()
        opt.step()  # Adam's step counter: a host tensor, read by .item()
        opt.zero_grad()  # a step begins
        float(y), bool(y > 0), y.item(), x.tolist(), x.cpu(), x[x > 0], torch.nonzero(x)
    assert reads.setup.total() == 0 and reads.per_step == [7]
    assert all(site.startswith("tests/test_sync.py:") for site in reads.steps[0])


def test_host_is_one_exact_read():
    """train.host: the tensors of a dict in one read, each value exact (float32 → float,
    NaN kept), 0-dim tensors as floats, others as lists, non-tensors as they are."""
    v = torch.tensor([1 / 3, float("nan"), 2.5], dtype=torch.float32)
    with sync.HostReads() as reads:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)]).zero_grad()
        got = train.host({"a": v[0], "flag": v[2] > 1, "bins": v, "r": 0.25})
    assert reads.per_step == [1]
    assert got["a"] == float(v[0]) and got["flag"] == 1.0 and got["r"] == 0.25
    assert got["bins"][0] == float(v[0]) and math.isnan(got["bins"][1]) and got["bins"][2] == 2.5


def test_loss_stats_stay_on_the_device_per_bin_means():
    """loss.py's stats are tensors (no read); loss per t-bin is each bin's mean of the per-pair
    loss (1/(σ_d tan t))·e^{−logvar}·‖F − F⁻ − g‖²/D + logvar, NaN for an empty bin."""
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([0.1, 0.2, 0.5, 0.7, 1.3, 1.5], dtype=torch.float64)  # bin 2 empty
    F_minus, g = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.zeros(6, 3).double()
    F, logvar = (lambda x, t: torch.zeros_like(x)), torch.linspace(-0.2, 0.3, 6).double()
    kw = dict(sigma_d=0.5, t_min=1e-3, mask=None, extra={})
    with sync.HostReads() as reads:  # F_θ = 0: ‖F − F⁻ − g‖² = ‖F⁻‖²
        loss, stats = loss_from_target(F, F_minus, t, F_minus, g, logvar, **kw)
    assert reads.setup.total() == 0 and all(isinstance(v, torch.Tensor) for v in stats.values())
    per_pair = prior_weight(t, 0.5, 1e-3) * torch.exp(-logvar) * (F_minus**2).mean(1) + logvar
    bins = [per_pair[:2], per_pair[2:4], None, per_pair[4:]]
    for k, want in enumerate(bins):
        got = float(stats["loss_by_t_bin"][k])
        assert math.isnan(got) if want is None else got == pytest.approx(float(want.mean()))
    assert float(stats["loss"]) == pytest.approx(float(per_pair.mean())) and stats["kept"] == 1


def test_scm_loss_reads_nothing():
    """scm_loss (the JVP, the loss, its stats): no host read at all."""
    net = torch.nn.Linear(3, 3)
    F = lambda x, t: net(x) * torch.cos(t)[:, None]  # noqa: E731
    x_t, t, dxdt = torch.randn(4, 3), torch.rand(4), torch.randn(4, 3)
    with sync.HostReads() as reads:
        scm_loss(F, x_t, t, dxdt, torch.zeros(4), r=0.5, sigma_d=0.5, c=0.1, t_min=1e-3)
    assert reads.setup.total() == 0


def test_train_step_reads_the_host_once(tmp_path):
    """train.train on digits: each step reads the host once, at one line of train.py, with or
    without a log line (steps 1–4; step 0 draws the pool, the last step's bucket holds the final
    checkpoint)."""
    run = tmp_path / "run"
    flags = ["--steps", "6", "--log-every", "2", "--pool-steps", "8", "--out", str(run)]
    cfg = parse_args([*FAST, *flags, "--cache-dir", str(tmp_path / "cache")])
    teacher = backbones.build(cfg)
    student, source = teacher.student(), TBCMPairs(cfg, teacher)
    run.mkdir()
    with sync.HostReads() as reads:
        train.train(cfg, student, source, run)
    assert len(reads.steps) == 6 and reads.per_step[1:5] == [1, 1, 1, 1]
    (site,) = {s for c in reads.steps[1:5] for s in c}
    assert site.startswith("train.py:")
