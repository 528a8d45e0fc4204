"""Sources of training pairs (x_t, t, dx_t/dt): time routes, the teacher rollout, forward diffusion.

TBCM (Eq. 9, Sec. 4.2, Alg. 1): roll the teacher's probability-flow ODE out from noise along a route
and keep every state with its velocity. sCM baseline: noise real data at logit-normal times.
t ∈ [0, π/2], t = 0 is data; x_{π/2} = z ~ N(0, σ_d² I); the teacher sees x_t/σ_d, σ_d·F = dx_t/dt.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trigflow import HALF_PI, diffuse, trig_time

# A TrigFlow model F(x_t/σ_d, t, cond, w) → F, e.g. trigflow.TrigFlow around a teacher.
TrigFlowModel = Callable[..., torch.Tensor]


def logit_normal_times(
    n: int, P_mean: float, P_std: float, sigma_d: float, generator=None, dtype=torch.float32
) -> torch.Tensor:
    """Sec. 4.2 (sCM's logit-normal proposal): σ = exp(P_mean + P_std·ε), t = arctan(σ/σ_d)."""
    # DEVIATION (paper Sec. 4.2: e^{σ_d tan t} ~ N(P_mean, P_std²); code of sCM and Sana-Sprint:
    # log(σ_d tan t) ~ N(P_mean, P_std²)) — see tests/test_trajectory.py::test_logit_normal
    eps = torch.randn(n, generator=generator, dtype=dtype)
    return torch.atan(torch.exp(P_mean + P_std * eps) / sigma_d)


def reference_route(N: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sec. 4.2, Reference Route: the Flow-Euler schedule with shift, mapped by Eq. 5⁻¹, first π/2.

    Mirrors diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N): N flow times from 1
    down to the shifted 1/num_train_timesteps, each shifted s ↦ shift·s/(1 + (shift − 1)·s).
    Returns N descending times [N].
    """

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = shifted(torch.linspace(1.0, float(s_min), N, dtype=torch.float64))
    t = trig_time(s)
    t[0] = HALF_PI
    return t


def sample_route(
    scheme: str,
    N: int,
    generator: torch.Generator | None,
    *,
    shift: float,
    P_mean: float,
    P_std: float,
    sigma_d: float,
) -> torch.Tensor:
    """Sec. 4.2 / Fig. 7: one denoising route of N descending times, the first π/2 (pure noise).

    random: N − 1 uniform times on [0, π/2]; logit_normal: N − 1 logit-normal times (P_mean, P_std);
    reference: the reference route of N points, each later time drawn uniformly inside its interval
    (partitioned sampling, U[ref[i+1], ref[i]] for i = 0..N−2). The rollout then steps on to 0.
    """
    if N < 2:
        raise ValueError(f"a route needs N >= 2 times, got {N}")
    if scheme == "random":
        rest = torch.rand(N - 1, generator=generator, dtype=torch.float64) * HALF_PI
    elif scheme == "logit_normal":
        rest = logit_normal_times(N - 1, P_mean, P_std, sigma_d, generator, torch.float64)
    elif scheme == "reference":
        ref = reference_route(N, shift)
        u = torch.rand(N - 1, generator=generator, dtype=torch.float64)
        # t_i ~ U[ref[i+1], ref[i]]
        rest = ref[1:] + u * (ref[:-1] - ref[1:])
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose random, logit_normal or reference")
    rest = torch.sort(rest, descending=True).values
    return torch.cat([torch.tensor([HALF_PI], dtype=torch.float64), rest])


@dataclass
class Pairs:
    """Training pairs: states x_t [P, ...], times t [P], teacher velocities dxdt [P, ...], per pair
    the index traj [P] of its trajectory (a row of the rollout's z, cond, w), and the trajectories'
    end points x0 [T, ...]."""

    x_t: torch.Tensor
    t: torch.Tensor
    dxdt: torch.Tensor
    traj: torch.Tensor
    x0: torch.Tensor


@torch.no_grad()
def rollout(
    F_teacher: TrigFlowModel,
    z: torch.Tensor,
    route: torch.Tensor,
    cond: Any,
    w: torch.Tensor | None,
    sigma_d: float,
    keep_first: bool = False,
) -> Pairs:
    """Eq. (9) / Alg. 1: integrate the teacher ODE from x_{π/2} = z along `route` (descending) to 0.

    At each t_i: dx_t/dt = σ_d·F(x_t/σ_d, t_i, cond, w), record (x_t, t_i, dx_t/dt), then step
    x ← cos(t_i − t_{i+1})·x − sin(t_i − t_{i+1})·dx_t/dt (exact when the teacher's x̂0 is constant).
    σ_d sits where Alg. 1 puts it, in dx_t/dt; Eq. 9 writes dx_t/dt = F and puts σ_d in the step.
    Both give x ← cos Δ·x − sin Δ·σ_d·F; this form records the velocity the loss needs (Alg. 1).
    z [T, ...] holds T = B·K noises; cond and w have batch T. The state at π/2 is dropped unless
    keep_first. Returns pairs ordered time-major (all trajectories at t_0, then at t_1, ...) and the
    end points x0.
    """
    x, T = z, z.shape[0]
    route = route.to(z.device)
    t_next = torch.cat([route[1:], route.new_zeros(1)])
    xs, ts, vs = [], [], []
    for t_i, t_j in zip(route, t_next, strict=True):
        t = t_i.to(z.dtype).expand(T)
        dxdt = sigma_d * F_teacher(x / sigma_d, t, cond, w)
        xs.append(x), ts.append(t), vs.append(dxdt)
        # Eq. 9: x_{t−Δ} = cos Δ·x_t − sin Δ·dx_t/dt, Δ = t_i − t_{i+1}
        delta = (t_i - t_j).to(z.dtype)
        x = torch.cos(delta) * x - torch.sin(delta) * dxdt
    # DEVIATION (paper Alg. 1: every state of the route is a pair; official train_tbcm.py: the π/2
    # state is dropped, N − 1 pairs per route, as cos t = 0 there makes g and prior weight vanish)
    # — see tests/test_trajectory.py::test_rollout_pairs_layout
    first = 0 if keep_first else 1
    traj = torch.arange(T, device=z.device).repeat(len(route) - first)
    xs, ts, vs = xs[first:] or [z[:0]], ts[first:] or [z.new_zeros(0)], vs[first:] or [z[:0]]
    return Pairs(torch.cat(xs), torch.cat(ts), torch.cat(vs), traj, x)


@torch.no_grad()
def forward_pairs(
    F_teacher: TrigFlowModel,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    w: torch.Tensor | None,
    sigma_d: float,
) -> Pairs:
    """sCM baseline (Sec. 4.2): x_t = cos t·x0 + sin t·z, dx_t/dt = σ_d·F_teacher(x_t/σ_d, t).

    Pairs in diffusion space: x0 are real data in TrigFlow units (σ_d × the flow-matching data),
    z ~ N(0, σ_d² I), t [B] e.g. logit-normal.
    """
    x_t = diffuse(x0, z, t)
    dxdt = sigma_d * F_teacher(x_t / sigma_d, t, cond, w)
    return Pairs(x_t, t, dxdt, torch.arange(x0.shape[0], device=x0.device), x0)
