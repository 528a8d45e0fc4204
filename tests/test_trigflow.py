"""Tab. 1, Eqs. 5–8: time/input/output maps, the TrigFlow wrapper with CFG, x0, equivalent noise."""

import math

import pytest
import torch

from oracles import Gaussian, SmoothMLP
from trigflow import (
    HALF_PI,
    TrigFlow,
    diffuse,
    equivalent_noise,
    fm_input,
    fm_scale,
    fm_time,
    trig_time,
    x0_from_F,
)

SIGMA_D = 0.5
pytestmark = pytest.mark.usefixtures("float64")


def test_time_map_round_trip():
    """Eq. 5 and its inverse: t → s → t and s → t → s, with the end points 0 ↔ 0 and π/2 ↔ 1."""
    t = torch.linspace(0, HALF_PI, 101)
    assert torch.allclose(trig_time(fm_time(t)), t, atol=1e-14)
    s = torch.linspace(0, 1, 101)
    assert torch.allclose(fm_time(trig_time(s)), s, atol=1e-14)
    assert trig_time(torch.tensor(1.0)) == HALF_PI and fm_time(torch.tensor(0.0)) == 0


def test_fm_scale_is_one_over_sin_plus_cos():
    """Eqs. 6–7: sqrt(s² + (1 − s)²) = 1/(sin t + cos t)."""
    t = torch.linspace(0, HALF_PI, 50)
    assert torch.allclose(fm_scale(fm_time(t)), 1 / (torch.sin(t) + torch.cos(t)), atol=1e-14)


def test_input_map_gives_fm_interpolant():
    """Eq. 6: x_t/σ_d mapped to flow matching equals (1 − s)·x0 + s·ε, same x0 and ε (σ_d = 0.5)."""
    g = torch.Generator().manual_seed(0)
    x0_fm, eps = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    t = torch.rand(7, generator=g) * HALF_PI
    x_t = diffuse(SIGMA_D * x0_fm, SIGMA_D * eps, t)
    s = fm_time(t)[:, None]
    assert torch.allclose(
        fm_input(x_t / SIGMA_D, fm_time(t)), (1 - s) * x0_fm + s * eps, atol=1e-14
    )


def test_wrapper_of_gaussian_fm_velocity_is_exact_trigflow():
    """Eq. 7: wrapping the closed-form FM velocity of N(μ, S²I) gives the closed-form TrigFlow F."""
    gauss = Gaussian(torch.tensor([0.7, -1.2, 0.1]), S=0.6)
    F = TrigFlow(gauss.v)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g) * 1.3
    t = torch.rand(64, generator=g) * HALF_PI
    assert torch.allclose(F(x, t, None), gauss.F(x, t), atol=1e-12)


def _rk4(f, x, a, b, n):
    h = (b - a) / n
    for i in range(n):
        s = a + i * h
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_trigflow_ode_and_fm_ode_reach_the_same_end_point():
    """Eqs. 5–7: the TrigFlow ODE of the wrapped net and the raw FM ODE, integrated finely, agree at
    t = 0."""
    net = SmoothMLP(dim=2)
    cond = torch.tensor([0, 1, 2, 1])
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    x_fm = _rk4(lambda x, s: net(x, torch.full((4,), s), cond), eps, 1.0, 0.0, 400)
    F = TrigFlow(net)

    def dx_dt(x, t):  # the TrigFlow ODE: dx_t/dt = σ_d·F(x_t/σ_d, t)
        return SIGMA_D * F(x / SIGMA_D, torch.full((4,), t), cond)

    x_trig = _rk4(dx_dt, SIGMA_D * eps, HALF_PI, 0.0, 400)
    assert torch.allclose(x_trig / SIGMA_D, x_fm, atol=1e-7)


def test_cfg_is_velocity_extrapolation():
    """CFG in velocity space: F_w = F_u + w·(F_c − F_u) per sample (Eq. 7 is affine in v); w = 1
    gives the conditional F."""
    net = SmoothMLP(dim=2, classes=4)
    null = torch.tensor([3])
    teacher, plain = TrigFlow(net, uncond=null), TrigFlow(net)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, 2, generator=g), torch.rand(5, generator=g) * HALF_PI
    cond, w = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1.0, 4.0, 4.5, 5.0, 0.0])
    F_c, F_u = plain(x, t, cond), plain(x, t, null.expand(5))
    assert torch.allclose(teacher(x, t, cond, w), F_u + w[:, None] * (F_c - F_u), atol=1e-12)
    assert torch.allclose(teacher(x, t, cond, torch.ones(5)), F_c, atol=1e-12)


def test_student_receives_scaled_guidance():
    """Sana-Sprint: the student gets 0.1·w through its guidance input (one pass, no CFG)."""
    seen = {}

    def v(x, s, cond, guidance):
        seen["g"] = guidance
        return torch.zeros_like(x)

    TrigFlow(v, guidance_scale=0.1)(
        torch.zeros(2, 3), torch.ones(2), None, torch.tensor([4.0, 5.0])
    )
    assert torch.allclose(seen["g"], torch.tensor([0.4, 0.5]))


def test_x0_and_equivalent_noise_recover_x0_and_z():
    """x0 from F and Eq. 8: with the exact F of a point mass, x̂0 = x0 and Noise_eqv = z exactly
    (σ_d = 0.5)."""
    g = torch.Generator().manual_seed(4)
    x0, z = SIGMA_D * torch.randn(6, 4, generator=g), SIGMA_D * torch.randn(6, 4, generator=g)
    t = 0.05 + torch.rand(6, generator=g) * (HALF_PI - 0.05)
    x_t = diffuse(x0, z, t)
    # exact velocity of the straight path: dx_t/dt = −sin t·x0 + cos t·z = σ_d F
    F = (-torch.sin(t)[:, None] * x0 + torch.cos(t)[:, None] * z) / SIGMA_D
    x0_hat = x0_from_F(x_t, t, F, SIGMA_D)
    assert torch.allclose(x0_hat, x0, atol=1e-14)
    assert torch.allclose(equivalent_noise(x_t, t, x0_hat), z, atol=1e-13)
    assert not torch.allclose(x0_from_F(x_t, t, F, 1.0), x0)  # σ_d matters


def test_x0_from_F_at_pure_noise_and_data():
    """Boundary values: f(x, 0) = x; at t = π/2 the estimate is −σ_d·F."""
    x, F = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(x0_from_F(x, torch.zeros(3), F, SIGMA_D), x)
    assert torch.allclose(
        x0_from_F(x, torch.full((3,), HALF_PI), F, SIGMA_D), -SIGMA_D * F, atol=1e-15
    )
    assert math.isclose(float(fm_time(torch.tensor(HALF_PI))), 1.0, abs_tol=1e-15)
