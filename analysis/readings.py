"""Finding 2, Eq. (8): the equivalent noise along both processes, in both readings of the paper.

Noise_eqv = (x_t − cos t·x̂0)/sin t. The paper compares it along forward diffusion and along the
teacher's ODE (Figs. 3 and 8) without saying which x̂0 its forward branch uses, so it draws both:
- forward_known, reading (a): x̂0 = the true x0 that forward diffusion built x_t = cos t·x0 + sin t·z
  from. Noise_eqv = z at every t, by construction: the noise a forward training pair carries.
- forward_model, reading (b): x̂0 = the teacher's estimate cos t·x_t − sin t·σ_d·F(x_t/σ_d, t) (the
  sCM parameterisation). Noise_eqv is then the teacher's E[z | x_t], which an exact teacher shrinks
  towards the data near t = 0.
- backward: the teacher's ODE from z_T = z on the reference route (Eq. 9), x̂0 from its own dx_t/dt.
Each at every CFG scale w of a sweep; tensors in TrigFlow units, t ∈ (0, π/2].
"""

import argparse

import torch

import backbones
from analysis import common
from config import RANGES, Parser
from trajectory import TrigFlowModel, reference_route, rollout
from trigflow import SIGMA_D, TrigFlow, diffuse, equivalent_noise, x0_from_F

READINGS = {
    "forward_known": "(a) forward diffusion, Eq. 8 with the true x0 (the noise the pair carries)",
    "forward_model": "(b) forward diffusion, Eq. 8 with the teacher's x̂0 at this CFG scale",
    "backward": "teacher ODE from z_T = z on the reference route, Eq. 8 with its own x̂0",
}
SWEEP_W = (0.0, 1.0, 2.0, 4.5)  # the default --w sweep of equivalent_noise.py and tsne.py
PAPER_W = 4.5  # Sana-Sprint's CFG scale: the panel images and t-SNE are drawn at it


@torch.no_grad()
def known_noise(x0: torch.Tensor, z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Reading (a): Eq. (8) with the true x0 along forward diffusion, [T, B, ...] (equals z)."""
    out = []
    for t_i in times:
        t = t_i.to(z.dtype).expand(len(z))
        out.append(equivalent_noise(diffuse(x0, z, t), t, x0))
    return torch.stack(out)


@torch.no_grad()
def forward_noise(
    F: TrigFlowModel,
    x0: torch.Tensor,
    z: torch.Tensor,
    times: torch.Tensor,
    cond,
    w: torch.Tensor | None,
    sigma_d: float,
) -> torch.Tensor:
    """Reading (b): Eq. (8) with the teacher's x̂0 along forward diffusion, [T, B, ...]."""
    out = []
    for t_i in times:
        t = t_i.to(z.dtype).expand(len(z))
        x_t = diffuse(x0, z, t)
        # x̂0 = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t, cond, w)
        x0_hat = x0_from_F(x_t, t, F(x_t / sigma_d, t, cond, w), sigma_d)
        out.append(equivalent_noise(x_t, t, x0_hat))
    return torch.stack(out)


@torch.no_grad()
def backward_noise(
    F: TrigFlowModel,
    z: torch.Tensor,
    times: torch.Tensor,
    cond,
    w: torch.Tensor | None,
    sigma_d: float,
) -> torch.Tensor:
    """Eq. (8) along the teacher ODE from z_T = z (Eq. 9 on `times`, first π/2): [T, B, ...]."""
    p = rollout(F, z, times, cond, w, sigma_d, keep_first=True)  # time-major: [T·B, ...]
    # x̂0 = cos t·x_t − sin t·dx_t/dt  (σ_d·F = dx_t/dt)
    x0_hat = x0_from_F(p.x_t, p.t, p.dxdt / sigma_d, sigma_d)
    return equivalent_noise(p.x_t, p.t, x0_hat).reshape(len(times), *z.shape)


def curves(
    F: TrigFlowModel,
    x0: torch.Tensor,
    z: torch.Tensor,
    times: torch.Tensor,
    cond,
    w: torch.Tensor | None,
    sigma_d: float,
) -> dict[str, torch.Tensor]:
    """The three readings (READINGS' keys) of Eq. 8 at `times`, [T, B, ...] each. Forward diffuses
    x0 with z; backward starts the teacher's ODE at z_T = z with the same prompts and w."""
    return {
        "forward_known": known_noise(x0, z, times),
        "forward_model": forward_noise(F, x0, z, times, cond, w, sigma_d),
        "backward": backward_noise(F, z, times, cond, w, sigma_d),
    }


def cosine(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of equivalent noises [T, B, ...] with z [B, ...]: [T, B]."""
    return torch.nn.functional.cosine_similarity(noise.flatten(2), z.flatten(1)[None], dim=-1)


def energy_ratio(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean ‖Noise_eqv‖² / mean ‖z‖² per time, [T]. For an exact teacher, reading (b) is E[z | x_t]
    and E‖E[z | x_t]‖² ≤ E‖z‖² (a conditional mean has less energy), so a value above 1 is the
    teacher's error, amplified by 1/sin t in Eq. 8."""
    return noise.flatten(2).square().sum(-1).mean(-1) / z.flatten(1).square().sum(-1).mean()


def projection_ratio(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean ⟨Noise_eqv, z⟩ / mean ‖z‖² per time, [T]. For an exact teacher's E[z | x_t] it equals
    energy_ratio (E⟨E[z | x_t], z⟩ = E‖E[z | x_t]‖²); the gap bounds the error e = Noise_eqv −
    E[z | x_t] from below: E‖e‖²/E‖z‖² ≥ (energy − projection)²/energy (Cauchy–Schwarz)."""
    dot = (noise.flatten(2) * z.flatten(1)[None]).sum(-1).mean(-1)
    return dot / z.flatten(1).square().sum(-1).mean()


def sweep(
    T: backbones.Teacher, F: TrigFlow, a: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, dict[float, dict[str, torch.Tensor]]]:
    """Route times [N] (π/2 … > 0), z [n, ...] and, per CFG scale in a.w, the three curves.

    One z and one set of prompts for every w. Real x0 (toy backbones) is independent of z and of w;
    image-free backbones use the teacher's own samples at each w, from the same noise."""
    g = torch.Generator().manual_seed(a.seed)
    state, x0_of = g.get_state(), {}
    for w in a.w:
        g.set_state(state)
        x0_of[w], prompt = common.data_x0(T, F, a.n, g, a, w)
    z = common.noise(a.n, T.data_shape, g, a.device)
    times = reference_route(a.N, a.shift)  # descending, last > 0: Eq. 8 is undefined at t = 0
    cond, out = T.cond(prompt), {}
    for w in a.w:
        w_b = torch.full((a.n,), w, device=a.device)
        out[w] = curves(F, x0_of[w], z, times, cond, w_b, SIGMA_D)
    return times, z, out


def route_flag(p: Parser) -> None:
    """--N of `sweep`: the times on the reference route."""
    p.add_argument(
        "--N",
        type=int,
        default=40,
        within=RANGES["N"],
        help="times on the reference route (Eq. 9 steps) (default: 40)",
    )


def panel_w(ws: tuple[float, ...]) -> float:
    """The CFG scale the images are drawn at: the paper's if swept, else the last one."""
    return PAPER_W if PAPER_W in ws else ws[-1]
