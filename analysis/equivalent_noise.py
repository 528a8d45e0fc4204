"""Finding 2, Eq. (8), Figs. 3 and 8 (curves): the equivalent noise along forward diffusion vs the teacher ODE.

Forward: x_t = cos t·x0 + sin t·z with real x0 and a fixed z, x̂0 = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t).
Backward: the teacher ODE from z_T along a fine reference route (Eq. 9), x̂0 = cos t·x_t − sin t·dx_t/dt.
Per route time: cosine similarity of Noise_eqv = (x_t − cos t·x̂0)/sin t with z (resp. z_T), mean and std.
    python analysis/equivalent_noise.py [--backbone digits|toy2d|sana] [--n 512] [--N 40]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common
from trajectory import TrigFlowModel, reference_route, rollout
from trigflow import diffuse, equivalent_noise, x0_from_F

PANEL_TIMES = (1.4, 1.1, 0.8, 0.5, 0.25, 0.05)  # Fig. 3: the route times nearest to these are shown


@torch.no_grad()
def forward_noise(F: TrigFlowModel, x0: torch.Tensor, z: torch.Tensor, times: torch.Tensor, cond,
                  w: torch.Tensor | None, sigma_d: float) -> torch.Tensor:
    """Eq. (8) along forward diffusion at each time: [T, B, ...] (equals z when x̂0 = x0)."""
    out = []
    for t_i in times:
        t = t_i.to(z.dtype).expand(len(z))
        x_t = diffuse(x0, z, t)
        # x̂0 = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t, cond, w)
        x0_hat = x0_from_F(x_t, t, F(x_t / sigma_d, t, cond, w), sigma_d)
        out.append(equivalent_noise(x_t, t, x0_hat))
    return torch.stack(out)


@torch.no_grad()
def backward_noise(F: TrigFlowModel, z: torch.Tensor, times: torch.Tensor, cond, w: torch.Tensor | None,
                   sigma_d: float) -> torch.Tensor:
    """Eq. (8) along the teacher ODE from z_T = z (Eq. 9 on `times`, descending from π/2): [T, B, ...]."""
    p = rollout(F, z, times, cond, w, sigma_d, keep_first=True)  # time-major: [T·B, ...]
    # x̂0 = cos t·x_t − sin t·dx_t/dt  (σ_d·F = dx_t/dt)
    x0_hat = x0_from_F(p.x_t, p.t, p.dxdt / sigma_d, sigma_d)
    return equivalent_noise(p.x_t, p.t, x0_hat).reshape(len(times), *z.shape)


def cosine(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of equivalent noises [T, B, ...] with the initial noise z [B, ...]: [T, B]."""
    return torch.nn.functional.cosine_similarity(noise.flatten(2), z.flatten(1)[None], dim=-1)


def both(T: common.Teacher, a, n: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """The route times [N] (π/2 … > 0), z [n, ...], forward and backward equivalent noise [N, n, ...].

    Both processes share z and the prompts: forward diffuses real x0 (independent of z) with z, backward starts
    the teacher ODE at z_T = z."""
    g = torch.Generator().manual_seed(a.seed)
    x0, prompt = common.data_x0(T, n, g, a)
    z = common.noise(n, T.data_shape, g, a.device)
    cond, w = T.cond(prompt), torch.full((n,), a.w, device=a.device)
    times = reference_route(N, a.shift)  # descending, last > 0: Eq. 8 is undefined at t = 0
    fwd = forward_noise(T.F, x0, z, times, cond, w, T.sigma_d)
    bwd = backward_noise(T.F, z, times, cond, w, T.sigma_d)
    return times, z, fwd, bwd


def run(a) -> None:
    import matplotlib.pyplot as plt

    common.check(a.n >= 2 and a.N >= 2, "--n and --N must be >= 2")
    T = common.load_teacher(a)
    times, z, fwd, bwd = both(T, a, a.n, a.N)
    cos = {"forward": cosine(fwd, z), "backward": cosine(bwd, z)}  # [N, n] each
    numbers = {"t": common.as_list(times), "n": a.n, "N": a.N}
    for k, c in cos.items():
        numbers[k] = {"cos_mean": common.as_list(c.mean(1)), "cos_std": common.as_list(c.std(1))}
    panel = list(dict.fromkeys(int((times - t).abs().argmin()) for t in PANEL_TIMES))  # short routes: once
    numbers["panel_t"] = [float(times[i]) for i in panel]

    K = len(panel) + 1  # the initial noise, then the panel times
    fig = plt.figure(figsize=(4.2 + 1.3 * K, 3.2))
    grid = fig.add_gridspec(2, K + 3, width_ratios=[1, 1, 0.25] + [0.75] * K)
    ax = fig.add_subplot(grid[:, :2])
    color_of = {"forward": "tab:blue", "backward": "tab:red"}
    t_np = times.numpy()
    for k, c in cos.items():
        m, s = c.mean(1).cpu().numpy(), c.std(1).cpu().numpy()
        ax.plot(t_np, m, color=color_of[k], label=f"{k} (mean ± std)")
        ax.fill_between(t_np, m - s, m + s, color=color_of[k], alpha=0.2)
    ax.set_xlabel("t  (π/2 = noise, 0 = data)"), ax.set_ylabel("cos(Noise_eqv, initial noise)")
    ax.set_xlim(t_np.max(), 0), ax.legend(fontsize=7), ax.set_title(f"Eq. 8 on {a.backbone}", fontsize=9)
    for r, (k, e) in enumerate((("forward", fwd), ("backward", bwd))):
        for j, (x, title) in enumerate([(z, "z" if r == 0 else "z_T")]
                                       + [(e[i], f"t={times[i]:.2f}") for i in panel]):
            axi = fig.add_subplot(grid[r, 3 + j])
            if len(T.data_shape) == 1:  # toy2d: the equivalent noise of all samples as points
                axi.scatter(*x[:, :2].T.cpu().numpy(), s=1, color="tab:gray" if j == 0 else color_of[k])
                axi.set_xlim(-2, 2), axi.set_ylim(-2, 2), axi.set_xticks([]), axi.set_yticks([])
            else:  # Fig. 3: one instance
                common.show(axi, x[0], "noise", scale=3 * T.sigma_d)
            axi.set_title(title, fontsize=8)
            if j == 0:
                axi.set_ylabel(k, fontsize=8)
    common.write(a, "equivalent_noise", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="samples (trajectories)")
    p.add_argument("--N", type=int, default=40, help="times on the reference route (Eq. 9 steps)")
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
