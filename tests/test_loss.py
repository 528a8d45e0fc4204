"""Eqs. 2–4, Alg. 1: the JVP tangent, g, its normalisation, the r schedule, loss and gradient."""

import math

import pytest
import torch

from loss import (
    LogvarHead,
    jvp_cs_dF_dt,
    normalize_tangent,
    prior_weight,
    r_schedule,
    scm_loss,
    tangent_g,
)
from oracles import ConvAttn, Gaussian, SmoothMLP
from trigflow import HALF_PI, TrigFlow, x0_from_F

pytestmark = pytest.mark.usefixtures("float64")
SIGMA_D = 0.5


def _student(net, cond, w):
    F = TrigFlow(net, guidance_scale=0.1)
    return lambda x, t: F(x, t, cond, w)


def _pairs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = SIGMA_D * torch.randn(shape, generator=g)
    t = 0.05 + torch.rand(shape[0], generator=g) * (HALF_PI - 0.1)
    dxdt = SIGMA_D * torch.randn(shape, generator=g)
    return x_t, t, dxdt


def _fd(F, x, t, dxdt, eps):
    """Central finite difference of F along (cos t sin t·dx_t/dt/σ_d, cos t sin t)."""
    cs = torch.cos(t) * torch.sin(t)
    v_x = cs.reshape(-1, *[1] * (x.dim() - 1)) * dxdt / SIGMA_D
    return (F(x + eps * v_x, t + eps * cs) - F(x - eps * v_x, t - eps * cs)) / (2 * eps)


@pytest.mark.parametrize("kind", ["mlp", "conv_attention"])
def test_jvp_tangent_matches_central_difference(kind):
    """Eq. 3 via torch.func.jvp equals a central finite difference along (dx_t/dt, 1), ≤ 1e-6
    relative, σ_d = 0.5."""
    shape = (6, 3) if kind == "mlp" else (4, 2, 4, 4)
    net = SmoothMLP(dim=3) if kind == "mlp" else ConvAttn(channels=2)
    cond, w = torch.tensor([0, 1, 2, 0, 1, 2][: shape[0]]), torch.linspace(1, 5, shape[0])
    F = _student(net, cond, w)
    x_t, t, dxdt = _pairs(shape)
    F_minus, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    fd = _fd(F, x_t / SIGMA_D, t, dxdt, 1e-5)
    assert torch.allclose(F_minus, F(x_t / SIGMA_D, t))
    assert (cs_dF_dt - fd).norm() / fd.norm() < 1e-6


def test_finite_difference_fallback_is_second_order():
    """The fallback agrees with the JVP and its error falls ~4× when eps halves (central difference,
    O(eps²))."""
    F = _student(SmoothMLP(dim=3), torch.tensor([0, 1, 2, 0]), torch.ones(4))
    x_t, t, dxdt = _pairs((4, 3), seed=1)
    _, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    fds = [jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D, fd_eps=e)[1] for e in (2e-2, 1e-2)]
    errs = [(fd - cs_dF_dt).norm() / cs_dF_dt.norm() for fd in fds]
    assert errs[1] < 1e-3
    assert 3.0 < errs[0] / errs[1] < 5.0


def test_g_is_cos_t_times_total_derivative_of_f():
    """Eq. 4 · cos t: with r = 1, g = cos t·df⁻/dt, df/dt by finite differences of
    f = cos t·x_t − sin t·σ_d·F."""
    F = _student(SmoothMLP(dim=3), torch.tensor([2, 1, 0, 1, 2]), torch.full((5,), 4.5))
    x_t, t, dxdt = _pairs((5, 3), seed=2)

    def f(x_t, t):
        return x0_from_F(x_t, t, F(x_t / SIGMA_D, t), SIGMA_D)

    eps = 1e-5
    df_dt = (f(x_t + eps * dxdt, t + eps) - f(x_t - eps * dxdt, t - eps)) / (2 * eps)
    F_minus, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    g = tangent_g(F_minus, cs_dF_dt, x_t, t, dxdt, SIGMA_D, r=1.0)
    assert torch.allclose(g, torch.cos(t)[:, None] * df_dt, rtol=1e-6, atol=1e-9)


def test_g_with_r_zero_is_the_stable_term_only():
    """Alg. 1: with r = 0, g = −cos²t·(σ_d F⁻ − dx_t/dt) exactly."""
    x_t, t, dxdt = _pairs((5, 3), seed=3)
    F_minus, cs_dF_dt = torch.randn(5, 3), torch.randn(5, 3)
    g = tangent_g(F_minus, cs_dF_dt, x_t, t, dxdt, SIGMA_D, r=0.0)
    assert torch.equal(g, -(torch.cos(t)[:, None] ** 2) * (SIGMA_D * F_minus - dxdt))


def test_gaussian_oracle_exact_student_has_zero_tangent_and_gradient():
    """Closed form: the exact consistency function gives g = cos t·df/dt = 0; r = 1: no gradient."""
    gauss = Gaussian(torch.tensor([0.4, -0.8]), S=0.7)
    delta = torch.zeros((), requires_grad=True)
    direction = torch.tensor([1.0, -2.0])
    F = lambda x, t: gauss.student_F(x, t, delta, direction)  # noqa: E731
    g_ = torch.Generator().manual_seed(5)
    t = 0.1 + torch.rand(64, generator=g_) * (HALF_PI - 0.2)
    x_t = SIGMA_D * torch.randn(64, 2, generator=g_)
    dxdt = SIGMA_D * gauss.F(x_t / SIGMA_D, t)
    F_minus, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    assert tangent_g(F_minus, cs_dF_dt, x_t, t, dxdt, SIGMA_D, 1.0).abs().max() < 1e-8
    loss, _ = scm_loss(F, x_t, t, dxdt, torch.zeros(64), r=1.0, sigma_d=SIGMA_D, c=0.1, t_min=1e-3)
    (grad,) = torch.autograd.grad(loss, delta)
    assert abs(float(grad)) < 1e-8


@pytest.mark.parametrize("d0", [0.3, -0.3])
def test_gaussian_oracle_perturbed_student_gradient_points_back(d0):
    """A student f* + δ·sin t·direction has positive loss, and a descent step shrinks |δ|."""
    gauss = Gaussian(torch.tensor([0.4, -0.8]), S=0.7)
    delta = torch.tensor(d0, requires_grad=True)
    F = lambda x, t: gauss.student_F(x, t, delta, torch.tensor([1.0, -2.0]))  # noqa: E731
    g_ = torch.Generator().manual_seed(6)
    t = 0.1 + torch.rand(64, generator=g_) * (HALF_PI - 0.2)
    x_t = SIGMA_D * torch.randn(64, 2, generator=g_)
    dxdt = SIGMA_D * gauss.F(x_t / SIGMA_D, t)
    kw = dict(r=1.0, sigma_d=SIGMA_D, c=0.1, t_min=1e-3)
    loss, stats = scm_loss(F, x_t, t, dxdt, torch.zeros(64), **kw)
    (grad,) = torch.autograd.grad(loss, delta)
    assert float(loss.detach()) > 1e-3 and stats["g_norm"] > 1e-3
    assert float(grad) * d0 > 0


def test_gradient_flows_only_through_F_theta():
    """Alg. 1: ∇θ loss = ∇θ Σ w_p·e^{−logvar}·(−2 g_p·F_θ)/D / P, g and F⁻ held fixed."""
    net = SmoothMLP(dim=3)
    cond, w = torch.tensor([0, 1, 2, 0]), torch.full((4,), 4.0)
    F = _student(net, cond, w)
    x_t, t, dxdt = _pairs((4, 3), seed=7)
    logvar = torch.tensor([0.1, -0.2, 0.0, 0.3])
    loss, _ = scm_loss(F, x_t, t, dxdt, logvar, r=0.8, sigma_d=SIGMA_D, c=0.1, t_min=1e-3)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    F_minus, cs_dF_dt = jvp_cs_dF_dt(F, x_t / SIGMA_D, t, dxdt, SIGMA_D)
    g = normalize_tangent(tangent_g(F_minus, cs_dF_dt, x_t, t, dxdt, SIGMA_D, 0.8), 0.1)
    weight = prior_weight(t, SIGMA_D, 1e-3) * torch.exp(-logvar) / 3 / 4
    surrogate = (weight[:, None] * -2 * g * F(x_t / SIGMA_D, t)).sum()
    ref = torch.autograd.grad(surrogate, list(net.parameters()))
    for a, b in zip(grads, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_tangent_normalisation_bounds_norm():
    """g/(‖g‖ + c) has norm ‖g‖/(‖g‖ + c) < 1 per sample, for small and huge g."""
    g = torch.randn(8, 3, 4) * torch.logspace(-3, 3, 8)[:, None, None]
    n = torch.linalg.vector_norm(normalize_tangent(g, 0.1), dim=(1, 2))
    gn = torch.linalg.vector_norm(g, dim=(1, 2))
    assert (n < 1).all() and torch.allclose(n, gn / (gn + 0.1))


def test_r_schedule_warmup_cooldown():
    """Alg. 1: r = 0 at start, 1 at H, holds until S_r, r_final at S_r + T_r and after."""
    kw = dict(H=4000, S_r=15000, T_r=2000, r_final=0.75, direct=False)
    assert r_schedule(0, **kw) == 0.0
    assert r_schedule(2000, **kw) == 0.5
    assert r_schedule(4000, **kw) == 1.0 and r_schedule(15000, **kw) == 1.0
    assert math.isclose(r_schedule(16000, **kw), 0.875)
    assert r_schedule(17000, **kw) == 0.75 and r_schedule(10**6, **kw) == 0.75
    # a cool-down that spans the warm-up: r = (1 − p)·s/H + p·r_final with p = s/H
    assert math.isclose(
        r_schedule(2000, H=4000, S_r=0, T_r=4000, r_final=0.75, direct=False),
        0.5 * 0.5 + 0.5 * 0.75,
    )
    # Tab. 7's "warm-up to R_final": linear 0 → r_final over H, then flat (S_r, T_r ignored)
    direct = dict(kw, direct=True)
    assert r_schedule(0, **direct) == 0.0 and r_schedule(2000, **direct) == 0.375
    assert r_schedule(4000, **direct) == 0.75 and r_schedule(15000, **direct) == 0.75


def test_mask_drops_pairs_and_handles_all_dropped():
    """Sec. 4.3: masked pairs do not contribute; all masked gives zero loss instead of NaN."""
    F = _student(SmoothMLP(dim=3), torch.tensor([0, 1, 2, 0]), torch.ones(4))
    x_t, t, dxdt = _pairs((4, 3), seed=8)
    lv, kw = torch.zeros(4), dict(r=1.0, sigma_d=SIGMA_D, c=0.1, t_min=1e-3)
    full, _ = scm_loss(F, x_t, t, dxdt, lv, **kw)
    half, st = scm_loss(F, x_t, t, dxdt, lv, **kw, mask=torch.tensor([1, 1, 0, 0]))
    F_two = _student(SmoothMLP(dim=3), torch.tensor([0, 1]), torch.ones(2))
    two, _ = scm_loss(F_two, x_t[:2], t[:2], dxdt[:2], lv[:2], **kw)
    assert torch.allclose(half, two) and not torch.allclose(half, full) and st["kept"] == 0.5
    none, _ = scm_loss(F, x_t, t, dxdt, lv, **kw, mask=torch.zeros(4))
    assert float(none.detach()) == 0.0


def test_prior_weight_and_logvar_head():
    """sCM code: 1/(σ_d tan t), finite at t = 0 thanks to the floor; the logvar head starts at 0."""
    w = prior_weight(torch.tensor([0.0, 1e-3, HALF_PI / 2]), SIGMA_D, 1e-3)
    assert torch.isfinite(w).all() and w[0] == w[1]
    assert math.isclose(float(w[2]), 2.0, rel_tol=1e-12)
    head = LogvarHead()
    assert torch.equal(head(torch.rand(5)), torch.zeros(5))
