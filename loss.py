"""The continuous-time consistency loss of sCM as TBCM trains it (Eqs. 2–4, Alg. 1, Sec. 4.3).

Tangent g = cos t·df⁻/dt with r on the unstable term, from one `torch.func.jvp` of the student (or a
directional central finite difference); tangent normalisation, adaptive weighting e^{−logvar}, the r
warm-up/cool-down. t ∈ [0, π/2], t = 0 is data; F sees x_t/σ_d; f = cos t·x_t − sin t·σ_d·F.
"""

# Why an MSE has Eq. 2's gradient: with F⁻ and g held fixed (stop-gradient), ∇_θ ½‖F_θ − F⁻ − g‖²
# = (F_θ − F⁻ − g)·∇_θF_θ, and at θ = θ⁻ (F_θ = F⁻) that is −g·∇_θF_θ = −cos t·(df⁻/dt)·∇_θF_θ.
# Eq. 2's ∇_θ⟨f_θ, df⁻/dt⟩ is −σ_d sin t·(df⁻/dt)·∇_θF_θ (∇_θf_θ = −σ_d sin t·∇_θF_θ): the same
# direction per pair, up to positive per-pair factors (1/(σ_d tan t); 1/(‖g‖ + c) once g is
# normalised) that the weighting absorbs. tests/test_loss.py pins this gradient
# (test_gradient_flows_only_through_F_theta).

import math
from collections.abc import Callable

import torch
from torch import nn

from trigflow import bcast

# The student with its condition and guidance bound: F(x_t/σ_d, t) → F.
StudentF = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def r_schedule(step: int, *, H: int, S_r: int, T_r: int, r_final: float, direct: bool) -> float:
    """Alg. 1 (R adjustment): warm up 0 → 1 in H steps, from S_r fall linearly to r_final in T_r.

    r multiplies the unstable term cos t·sin t·(x_t + σ_d·dF⁻/dt) of g (`tangent_g`): it holds the
    student's own time derivative, noisy while the student is far from consistent. At r = 0, g is
    −cos²t·(σ_d F⁻ − dx_t/dt), a pull towards the teacher's velocity alone; warming r up lets the
    self-consistency term in once training is stable (sCM), and TBCM cools it to r_final (Tab. 6).
    direct: the paper's Tab. 7 alternative, warm up 0 → r_final in H steps and stay (no cool-down).
    """
    # r = min(1, Iters/H); p = clamp((Iters − S_r)/T_r, 0, 1); r ← (1 − p)·r + p·r_f
    r = min(1.0, step / H) if H > 0 else 1.0
    if direct:
        return r * r_final
    p = min(max((step - S_r) / T_r, 0.0), 1.0) if T_r > 0 else float(step >= S_r)
    return (1 - p) * r + p * r_final


def jvp_cs_dF_dt(
    F: StudentF,
    x: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    sigma_d: float,
    fd_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (3)–(4): returns (F⁻, cos t·sin t·dF⁻/dt), dF⁻/dt taken along the ODE by one JVP.

    x = x_t/σ_d. dF⁻/dt = ∂F/∂x·(dx/dt)/σ_d + ∂F/∂t is one forward-mode JVP (no gradient) with the
    tangent (dx_t/dt/σ_d, 1). The JVP is linear in its tangent, so the tangent is pre-scaled by
    cos t·sin t: the output is then cos t·sin t·dF⁻/dt, the only form g uses (Alg. 1), as in sCM's
    code. It runs under the math SDPA backend, which has forward AD. With fd_eps: a central finite
    difference along the same direction (error O(fd_eps²)), for models forward AD cannot go through
    (fused attention kernels, custom ops; FSDP2-sharded students it does pass, parallel.py).
    """
    cs = torch.cos(t) * torch.sin(t)  # [P]
    v_x, v_t = bcast(cs, x) * dxdt / sigma_d, cs
    with torch.no_grad():
        if fd_eps is None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                F_minus, cs_dF_dt = torch.func.jvp(F, (x, t), (v_x, v_t))
        else:
            F_minus = F(x, t)
            up, down = F(x + fd_eps * v_x, t + fd_eps * v_t), F(x - fd_eps * v_x, t - fd_eps * v_t)
            cs_dF_dt = (up - down) / (2 * fd_eps)
    return F_minus, cs_dF_dt


def tangent_g(
    F_minus: torch.Tensor,
    cs_dF_dt: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    sigma_d: float,
    r: float,
) -> torch.Tensor:
    """Alg. 1 / Eq. (4)·cos t: g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt).

    cs_dF_dt is cos t·sin t·dF⁻/dt (from `jvp_cs_dF_dt`). With r = 1 this is exactly cos t·df⁻/dt;
    r scales "the unstable term", cos t·sin t·(x_t + σ_d·dF⁻/dt) (Sec. 4.3, `r_schedule`).
    """
    cos_t, sin_t = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    return -(cos_t**2) * (sigma_d * F_minus - dxdt) - r * (cos_t * sin_t * x_t + sigma_d * cs_dF_dt)


def normalize_tangent(g: torch.Tensor, c: float) -> torch.Tensor:
    """Alg. 1 (tangent normalisation): g ← g/(‖g‖₂ + c), per sample over all non-batch dims."""
    # DEVIATION (a reported typo of the sCM paper: ‖g‖² + c; code of sCM and Sana-Sprint: ‖g‖ + c)
    # — see tests/test_loss.py::test_tangent_normalisation_bounds_norm
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
    return g / bcast(norm + c, g)


def prior_weight(t: torch.Tensor, sigma_d: float, t_min: float) -> torch.Tensor:
    """sCM / Sana-Sprint code: the per-sample weight 1/(σ_d·tan t), t floored at t_min (finite)."""
    # DEVIATION (paper Alg. 1: no prior weight; code of Sana-Sprint and TBCM: 1/(σ_d tan t)); the
    # floor t_min is ours: tan t → 0 at the data end would give a single pair an unbounded weight
    # — see tests/test_loss.py::test_prior_weight_and_logvar_head
    return 1.0 / (sigma_d * torch.tan(t.clamp(min=t_min)))


class LogvarHead(nn.Module):
    """Alg. 1 (adaptive weighting w_φ(t)): logvar = −w_φ(t) on Fourier features of t, zero-init."""

    def __init__(self, channels: int = 128, scale: float = 2.0):
        super().__init__()
        # DEVIATION (paper Alg. 1: w_φ(t), no architecture; code of Sana-Sprint and TBCM: a linear
        # layer on the network's time (+ guidance) embedding); ours reads fixed Fourier features of
        # t, the same for every backbone — see tests/test_loss.py::test_prior_weight_and_logvar_head
        # Fixed random frequencies, like sCM's adaptive weighting on its noise-level embedding.
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", scale * torch.randn(channels // 2, generator=gen))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight), nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * t[:, None].to(self.freqs.dtype) * self.freqs  # [P, channels/2]
        return self.linear(torch.cat([phase.cos(), phase.sin()], dim=1) * math.sqrt(2)).squeeze(1)


def scm_target(
    F_theta: StudentF,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    *,
    r: float,
    sigma_d: float,
    c: float,
    fd_eps: float | None = None,
):
    """Alg. 1 lines 13–14: the target's stop-gradient parts F⁻ and normalised tangent g, by one JVP.

    Returns (F⁻, g/(‖g‖ + c), ‖g‖ before normalisation), all without gradient.
    """
    F_minus, cs_dF_dt = jvp_cs_dF_dt(F_theta, x_t / sigma_d, t, dxdt, sigma_d, fd_eps)
    g = tangent_g(F_minus, cs_dF_dt, x_t, t, dxdt, sigma_d, r)
    g_norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
    return F_minus, normalize_tangent(g, c), g_norm


def scm_loss(
    F_theta: StudentF,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    logvar: torch.Tensor,
    *,
    r: float,
    sigma_d: float,
    c: float,
    t_min: float,
    mask: torch.Tensor | None = None,
    fd_eps: float | None = None,
    t_bins: int = 4,
    F_grad: StudentF | None = None,
    denom: torch.Tensor | None = None,
):
    """Eqs. (2) and (4), Alg. 1 lines 13–16: the student's consistency loss on (x_t, t, dx_t/dt).

    Per pair: (1/(σ_d tan t))·e^{−logvar}·‖F_θ − F⁻ − g‖²/D + logvar, g normalised; gradients
    reach θ only through F_θ (F⁻ and g are stop-gradient) and φ through logvar. mask [P]
    (brightness filter) drops pairs; the mean is over the kept pairs. Returns (loss, stats), stats
    on the device (r a float): loss per t-bin, mean ‖g‖ before normalisation, r, the kept share.
    F_grad: the same F_θ for the with-gradient pass (a DDP wrapper's); the JVP runs on F_theta.
    denom: the divisor of the kept pairs' sum (a micro-batch's: its whole step's kept count).
    """
    F_minus, g, g_norm = scm_target(F_theta, x_t, t, dxdt, r=r, sigma_d=sigma_d, c=c, fd_eps=fd_eps)
    return loss_from_target(
        F_theta if F_grad is None else F_grad,
        x_t,
        t,
        F_minus,
        g,
        logvar,
        sigma_d=sigma_d,
        t_min=t_min,
        mask=mask,
        extra={"g_norm": g_norm.mean(), "r": r},
        t_bins=t_bins,
        denom=denom,
    )


def loss_from_target(
    F_theta: StudentF,
    x_t: torch.Tensor,
    t: torch.Tensor,
    F_minus: torch.Tensor,
    g: torch.Tensor,
    logvar: torch.Tensor,
    *,
    sigma_d: float,
    t_min: float,
    mask: torch.Tensor | None,
    extra: dict,
    t_bins: int = 4,
    denom: torch.Tensor | None = None,
):
    """Alg. 1 lines 15–16 given `scm_target`'s F⁻ and g: the weighted, masked loss and its stats
    (with `denom`: the kept pairs' sum over denom instead of their mean; stats: `merge_stats`)."""
    F = F_theta(x_t / sigma_d, t)
    # mean over D of (F_θ − F⁻ − g)²: the target F⁻ + g carries no gradient
    sq = ((F - F_minus - g) ** 2).flatten(1).mean(1)  # [P]
    per_pair = prior_weight(t, sigma_d, t_min) * torch.exp(-logvar) * sq + logvar
    keep = torch.ones_like(per_pair) if mask is None else mask.to(per_pair.dtype)
    # DEVIATION (paper Alg. 1 and train_tbcm.py: mask·L, then the mean over all pairs); ours: mean
    # over the kept pairs, so filtering does not shrink the step, and all filtered gives 0, not NaN
    # — see tests/test_loss.py::test_mask_drops_pairs_and_handles_all_dropped
    loss = (keep * per_pair).sum() / (keep.sum().clamp(min=1) if denom is None else denom)
    with torch.no_grad():
        edges = torch.linspace(0, math.pi / 2, t_bins + 1, device=t.device)
        bins = torch.bucketize(t, edges[1:-1])  # [P]
        # the mean per t-bin as one masked sum over all pairs, no boolean indexing (its size
        # depends on the values: a GPU would wait for the host); an empty bin gives 0/0 = NaN
        in_bin = bins == torch.arange(t_bins, device=t.device)[:, None]  # [t_bins, P]
        by_bin = torch.where(in_bin, per_pair, 0).sum(1) / in_bin.sum(1)  # [t_bins]
    stats = {"loss": loss.detach(), "loss_by_t_bin": by_bin, **extra, "kept": keep.mean()}
    return loss, stats | {"pairs_by_t_bin": in_bin.sum(1)}  # merge_stats's weights


def merge_stats(parts: list[dict]) -> dict:
    """One optimiser step's stats from its micro-batches' (`loss_from_target` with the step's
    `denom`): the losses add up, the per-bin losses and the other means are weighted by their pair
    counts, which are then dropped. One part: its stats as they are."""
    bins = [p.pop("pairs_by_t_bin") for p in parts]
    counts = [b.sum() for b in bins]  # each pair lies in one bin
    if len(parts) == 1:
        return parts[0]
    merged = {"loss": sum(p["loss"] for p in parts)}
    pairs = zip(parts, bins, strict=True)
    by_bin = [torch.where(c > 0, p["loss_by_t_bin"], 0) * c for p, c in pairs]
    merged["loss_by_t_bin"] = sum(by_bin) / sum(bins)  # an empty bin: 0/0 = NaN, as in one part
    for k, v in parts[0].items():
        if k not in merged:  # means over pairs (g_norm, kept), weighted; r: the same in each part
            mean = sum(p[k] * n for p, n in zip(parts, counts, strict=True)) / sum(counts)
            merged[k] = mean if isinstance(v, torch.Tensor) else v
    return merged
