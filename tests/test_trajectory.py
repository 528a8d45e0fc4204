"""Eq. 9 and Sec. 4.2: time routes, the teacher rollout, forward-diffusion pairs."""

import math
from itertools import pairwise

import pytest
import torch

from oracles import Gaussian
from trajectory import forward_pairs, logit_normal_times, reference_route, rollout, sample_route
from trigflow import HALF_PI, diffuse

pytestmark = pytest.mark.usefixtures("float64")
SIGMA_D = 0.5
# the official route to 4 decimals: compute_refer_route(shift=2.5, num_inference_steps=16) of
# hustvl/TBCM diffusion/utils/tbcm_utils.py (route_steps 16 in configs/600M_1024px_tbcm.yaml)
REF_16 = [1.5708, 1.5423, 1.5095, 1.4714, 1.4268, 1.3741, 1.3112, 1.2356]
REF_16 += [1.1440, 1.0331, 0.8997, 0.7425, 0.5642, 0.3734, 0.1832, 0.0063]
ROUTE = dict(shift=2.5, P_mean=0.2, P_std=1.6, sigma_d=0.5)  # the official and Sana-Sprint values


def test_reference_route_matches_official_code_and_diffusers():
    """Sec. 4.2: shift 2.5, N = 16 gives the official route (1e-4) and diffusers' FlowMatchEuler
    sigmas mapped by Eq. 5⁻¹ (1e-6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = reference_route(16, 2.5)
    assert torch.allclose(ref, torch.tensor(REF_16), atol=1e-4)
    for N, shift in [(16, 2.5), (8, 3.0), (20, 1.0)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(N)
        s = sched.sigmas[:-1].double()
        assert torch.allclose(reference_route(N, shift), torch.atan2(s, 1 - s), atol=1e-6)


def test_partitioned_sampling_stays_in_intervals_and_is_reproducible():
    """Sec. 4.2: t_i ~ U[ref[i+1], ref[i]], first π/2, reproducible from a generator, fresh each
    draw."""
    ref = reference_route(16, 2.5)
    draws = [
        sample_route("reference", 16, torch.Generator().manual_seed(k), **ROUTE) for k in range(50)
    ]
    for r in draws:
        assert r[0] == HALF_PI and len(r) == 16
        assert ((r[1:] <= ref[:-1]) & (r[1:] >= ref[1:])).all()
    again = sample_route("reference", 16, torch.Generator().manual_seed(3), **ROUTE)
    assert torch.equal(draws[3], again)
    assert not torch.equal(draws[3], draws[4])


@pytest.mark.parametrize("scheme", ["random", "logit_normal", "reference"])
def test_routes_descend_from_half_pi(scheme):
    """Fig. 7: every scheme gives N times, first π/2, non-increasing, inside [0, π/2]."""
    r = sample_route(scheme, 12, torch.Generator().manual_seed(0), **ROUTE)
    assert len(r) == 12 and r[0] == HALF_PI and (r[1:] <= r[:-1]).all() and (r >= 0).all()


def test_logit_normal():
    """sCM proposal: log(σ_d tan t) ~ N(P_mean, P_std²); 5/50/95% quantiles of t are the closed
    form arctan(exp(P_mean + P_std·Φ⁻¹(q))/σ_d) = 0.17/1.18/1.54."""
    g = torch.Generator().manual_seed(0)
    t = logit_normal_times(200_000, 0.2, 1.6, SIGMA_D, g, torch.float64)
    q = torch.quantile(t[:100_000], torch.tensor([0.05, 0.5, 0.95]))
    assert torch.allclose(q, torch.tensor([0.17, 1.18, 1.54]), atol=0.01)
    z = torch.log(SIGMA_D * torch.tan(t))
    assert abs(float(z.mean()) - 0.2) < 0.02 and abs(float(z.std()) - 1.6) < 0.02


def test_rollout_is_exact_for_constant_x0_prediction():
    """Eq. 9 is exact when the teacher's x̂0 is constant: each step lands on cos t·x0 + sin t·ẑ."""
    x0 = SIGMA_D * torch.tensor([[0.3, -1.0], [2.0, 0.5]])

    def F(x, t, cond, w):  # x̂0 = cos t·x_t − sin t·σ_d F = x0
        x_t, cos_t, sin_t = SIGMA_D * x, torch.cos(t)[:, None], torch.sin(t)[:, None]
        return (cos_t * x_t - x0) / (sin_t * SIGMA_D)

    z = SIGMA_D * torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    one = rollout(F, z, torch.tensor([HALF_PI]), None, None, SIGMA_D)
    assert torch.allclose(one.x0, x0, atol=1e-14)
    route = torch.tensor([HALF_PI, 1.2, 0.7, 0.2])
    p = rollout(F, z, route, None, None, SIGMA_D, keep_first=True)
    assert torch.allclose(p.x0, x0, atol=1e-14)
    assert torch.allclose(p.x_t, diffuse(x0[p.traj], z[p.traj], p.t), atol=1e-13)


def test_rollout_converges_to_exact_ode_solution():
    """Eq. 9 with the closed-form Gaussian teacher: the end point's error halves as N doubles."""
    gauss = Gaussian(torch.tensor([1.0, -0.5]), S=0.3)
    z = SIGMA_D * torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    exact = gauss.flow(z, torch.full((256,), HALF_PI), torch.zeros(256))
    errs = []
    for N in (4, 8, 16, 32, 64):
        x0 = rollout(gauss.F, z, reference_route(N, 1.0), None, None, SIGMA_D).x0
        errs.append(float((x0 - exact).abs().max()))
    assert all(1.8 < a / b < 2.3 for a, b in pairwise(errs[1:])) and errs[-1] < 0.02


def test_rollout_pairs_layout():
    """Alg. 1: N − 1 pairs per trajectory (π/2 dropped), time-major, each with its trajectory index
    and the teacher velocity σ_d·F at its own state; the K trajectories of a condition share its
    row."""
    gauss = Gaussian(torch.zeros(3), S=0.5)
    seen = []

    def F(x, t, cond, w):
        seen.append(cond)
        return gauss.F(x, t)

    B, K, N = 2, 3, 5
    cond = torch.tensor([7, 8]).repeat_interleave(K)  # [B·K]
    z = SIGMA_D * torch.randn(B * K, 3, generator=torch.Generator().manual_seed(2))
    route = sample_route("reference", N, torch.Generator().manual_seed(0), **ROUTE)
    p = rollout(F, z, route, cond, None, SIGMA_D)
    assert p.x_t.shape == ((N - 1) * B * K, 3) and p.x0.shape == (B * K, 3)
    assert torch.equal(p.traj, torch.arange(B * K).repeat(N - 1))
    assert torch.equal(p.t, route[1:].repeat_interleave(B * K))
    assert torch.allclose(p.dxdt, SIGMA_D * gauss.F(p.x_t / SIGMA_D, p.t))
    assert all(torch.equal(c, cond) for c in seen) and len(seen) == N


def test_forward_pairs():
    """sCM baseline: x_t = cos t·x0 + sin t·z and dx_t/dt = σ_d·F_teacher(x_t/σ_d, t)."""
    gauss = Gaussian(torch.zeros(2), S=1.0)
    g = torch.Generator().manual_seed(3)
    x0, z = SIGMA_D * torch.randn(5, 2, generator=g), SIGMA_D * torch.randn(5, 2, generator=g)
    t = logit_normal_times(5, 0.2, 1.6, SIGMA_D, g, torch.float64)
    p = forward_pairs(gauss.F, x0, z, t, None, None, SIGMA_D)
    cos_t, sin_t = torch.cos(t)[:, None], torch.sin(t)[:, None]
    assert torch.allclose(p.x_t, cos_t * x0 + sin_t * z)
    # N(0, 1) data in FM units: the exact velocity is E[−sin t·x0 + cos t·z | x_t], i.e. σ_d·F
    assert torch.allclose(p.dxdt, SIGMA_D * gauss.F(p.x_t / SIGMA_D, t))
    assert math.isclose(float(torch.linalg.vector_norm(p.x0 - x0)), 0.0)
