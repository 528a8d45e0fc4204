"""Where training pairs come from, on the 2-D ring: TBCM's teacher trajectories (Eq. 9) vs sCM.

TBCM: pairs (x_t, t, dx_t/dt) on the teacher's ODE from noise, one training step's reference route
with partitioned sampling (Sec. 4.2); sCM: x_t = cos t·x0 + sin t·z from real x0 at logit-normal
t, the teacher's velocity there. Equally many pairs; JSON in TrigFlow units, the plots in x/σ_d.
    python analysis/pair_sources.py [--trajectories 8] [--N 8] [--arrows 3]
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common
from config import RANGES
from pairs import rollout_inputs
from trajectory import (
    Pairs,
    forward_pairs,
    logit_normal_times,
    reference_route,
    rollout,
    sample_route,
)
from trigflow import HALF_PI, SIGMA_D

FINE_N = 200  # steps of the fine reference route the trajectories are drawn on
BINS = 30  # histogram bins on [0, π/2]
LIM = 2.5  # half-width of the 2-D panels, data units: the ring (radius 1.4) and most of N(0, I)
ARROW = 0.25  # an arrow is −dx_t/dt·ARROW: the teacher's step towards t = 0 over Δt = ARROW
TITLES = (
    "TBCM: pairs on the teacher's trajectories (no data)",
    "sCM: pairs by forward diffusion of data",
)
DOTS = dict(cmap="viridis", vmin=0, vmax=HALF_PI, s=18, edgecolors="k", linewidths=0.3, zorder=3)


def to_data(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Distance (data units) of points [P, 2] to their nearest held-out datum (TrigFlow units)."""
    return torch.cdist(x.double(), real.double()).min(1).values / SIGMA_D


def pair_set(p: Pairs, real: torch.Tensor, z: torch.Tensor) -> dict:
    """A pair set's JSON: its arrays (TrigFlow units) and summary numbers."""
    return {
        "pairs": len(p.t),
        "t_mean": float(p.t.mean()),
        "t_median": float(p.t.median()),
        "mean_distance_to_data": float(to_data(p.x_t, real).mean()),
        **{k: common.as_list(v) for k, v in (("t", p.t), ("x_t", p.x_t), ("dxdt", p.dxdt))},
        "x0": common.as_list(p.x0),  # TBCM: the trajectories' ends; sCM: the real data
        "z": common.as_list(z),
        "traj": p.traj.tolist(),
    }


def run(a) -> None:
    import matplotlib.pyplot as plt

    cfg = common.config_of(a)  # train.py's presets fill the flags left unset
    for k in ("N", "P_mean", "P_std"):
        setattr(a, k, getattr(cfg, k) if getattr(a, k) is None else getattr(a, k))
    T, F = common.load_teacher(a)
    real = common.held_out(a)[0]
    hp = dict(N=a.N, shift=a.shift, P_mean=a.P_mean, P_std=a.P_std, cfg_scales=(a.w,))
    cfg = dataclasses.replace(cfg, K=1, **hp)  # one trajectory per prompt slot
    # TBCM (Alg. 1 lines 4–9): one step's route, prompts, CFG scales, noises; the rollout (Eq. 9)
    slots, n_prompts = range(a.trajectories), len(T.prompt_names)
    route, prompt, w, z, _ = rollout_inputs(cfg, n_prompts, T.data_shape, (a.seed, 0, 0), slots)
    tbcm = rollout(F, z, route, T.cond(prompt), w, SIGMA_D)  # pair k is trajectory k % n
    # the same ODE on a fine route through the route's times: the line drawn, its states at t
    fine = torch.cat([reference_route(FINE_N, a.shift), route]).unique().flip(0)
    ode = rollout(F, z, fine, T.cond(prompt), w, SIGMA_D, keep_first=True)
    path = torch.cat([ode.x_t.reshape(len(fine), *z.shape), ode.x0[None]])  # [L, n, 2]
    at_t = path[torch.searchsorted(-fine, -route[1:])].flatten(0, 1)  # [P, 2], as tbcm.x_t
    # sCM (Sec. 4.2): as many pairs from training data x0, logit-normal t, noise z
    g, P = torch.Generator().manual_seed(a.seed), len(tbcm.t)
    x0, p_scm = T.real_data(P, g)
    t = logit_normal_times(P, a.P_mean, a.P_std, SIGMA_D, g).to(a.device)
    z_scm = common.noise(P, T.data_shape, g, a.device)
    w_scm = torch.full((P,), a.w, device=a.device)
    scm = forward_pairs(F, SIGMA_D * x0, z_scm, t, T.cond(p_scm), w_scm, SIGMA_D)
    # the pairs' times over many training steps (a route's first time, π/2, gives no pair)
    kw = dict(shift=a.shift, P_mean=a.P_mean, P_std=a.P_std, sigma_d=SIGMA_D)
    t_routes = torch.cat([sample_route(cfg.scheme, a.N, g, **kw)[1:] for _ in range(a.draws)])
    t_logit = logit_normal_times(len(t_routes), a.P_mean, a.P_std, SIGMA_D, g, torch.float64)
    times = {"tbcm": t_routes, "scm": t_logit}
    edges = torch.linspace(0, HALF_PI, BINS + 1, dtype=torch.float64)
    width = float(edges[1] - edges[0])
    density = {k: torch.histc(v, BINS, 0, HALF_PI) / (len(v) * width) for k, v in times.items()}
    numbers = {
        "units": "TrigFlow (x = σ_d × data); distances in data units (x/σ_d)",
        **dict(N=a.N, shift=a.shift, P_mean=a.P_mean, P_std=a.P_std, scheme=cfg.scheme),
        "tbcm": {
            **pair_set(tbcm, real, z),
            "route": common.as_list(route),
            "end_mean_distance_to_data": float(to_data(tbcm.x0, real).mean()),
            "mean_distance_to_fine_ode": float((tbcm.x_t - at_t).norm(dim=1).mean() / SIGMA_D),
        },
        "scm": pair_set(scm, real, z_scm),
        "bin_edges": common.as_list(edges),
        "density": {k: common.as_list(v) for k, v in density.items()},
    }
    figure(a, numbers, real, path, tbcm, scm, edges, density, plt)


def figure(a, numbers, real, path, tbcm, scm, edges, density, plt) -> None:
    """Left TBCM, middle sCM (data in grey, pair states coloured by t), right the densities of t."""
    fig, ax = plt.subplots(1, 3, figsize=(11, 4.3), gridspec_kw=dict(width_ratios=(1, 1, 0.85)))
    path = (path / SIGMA_D).cpu().numpy()  # data units, [L, n, 2]

    def u(x: torch.Tensor):  # TrigFlow units [P, 2] → data units, x and y
        return (x / SIGMA_D).cpu().T.numpy()

    for axis, used in zip(ax[:2], ("shown, not used", "used"), strict=True):
        axis.scatter(*u(real[:1500]), s=1, c="0.8", zorder=0, label=f"data ({used})")
        axis.set(xlim=(-LIM, LIM), ylim=(-LIM, LIM), aspect="equal", xticks=[], yticks=[])
    lines = ax[0].plot(path[..., 0], path[..., 1], c="0.45", lw=0.8, zorder=1)  # one per column
    lines[0].set_label("teacher ODE, noise → data")
    ax[0].scatter(*path[0].T, s=50, fc="none", ec="0.3", lw=0.8, label="its start z (t = π/2)")
    ax[0].scatter(*u(tbcm.x0), marker="x", s=20, c="k", lw=0.9, label="its end x0 (t = 0)")
    (x0, y0), (xt, yt) = u(scm.x0), u(scm.x_t)
    ax[1].plot([x0, xt], [y0, yt], c="0.6", lw=0.5, zorder=1)[0].set_label("x0 → x_t")
    ax[1].scatter(x0, y0, marker="x", s=20, c="k", lw=0.9, label="real x0 (t = 0)")
    # arrows on the pairs of --arrows trajectories, and on as many sCM pairs
    arrows = (tbcm.traj < a.arrows, torch.arange(len(scm.t)) < a.arrows * (a.N - 1))
    for axis, p, on, title in zip(ax[:2], (tbcm, scm), arrows, TITLES, strict=True):
        dots = dict(c=p.t.cpu().numpy(), label="pair state x_t (colour: t)", **DOTS)
        sc = axis.scatter(*u(p.x_t), **dots)
        at, step = u(p.x_t[on]), u(-ARROW * p.dxdt[on])
        axis.quiver(*at, *step, angles="xy", scale_units="xy", scale=1, width=0.005,
                    color="tab:red", zorder=4, label="its −dx_t/dt (teacher)")  # fmt: skip
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2)
    for k, label in (("tbcm", "TBCM: reference route"), ("scm", "sCM: logit-normal")):
        ax[2].stairs(density[k].numpy(), edges.numpy(), label=label, lw=1.8)
    ax[2].set(xlim=(0, HALF_PI), ylabel="density of t")
    ax[2].set_title("t of the pairs (many training steps)", fontsize=10)
    ax[2].legend(fontsize=8)
    bar = fig.colorbar(sc, ax=ax[2], orientation="horizontal", pad=0.12, fraction=0.06)
    bar.set_label("t, the colour of the pair states  (0 = data, π/2 = noise)", fontsize=9)
    fig.tight_layout()
    common.write(a, "pair_sources", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    # 2-D data only: the picture draws states in the plane
    backbone = next(x for x in p._actions if x.dest == "backbone")
    backbone.choices, backbone.default, backbone.help = ("toy2d",), "toy2d", "the teacher (toy2d)"
    ranges = {"--N": RANGES["N"], "--P-mean": RANGES["P_mean"], "--P-std": RANGES["P_std"]}
    ranges |= {"--trajectories": ">= 1", "--arrows": ">= 0", "--draws": ">= 1"}
    for flag, kind, default, what in (
        ("--trajectories", int, 8, "TBCM trajectories, N − 1 pairs each (default: 8)"),
        ("--N", int, None, "route length (default: train.py's --N, toy2d 8)"),
        ("--P-mean", float, None, "sCM's logit-normal times (default: train.py's, toy2d -0.4)"),
        ("--P-std", float, None, "idem (default: train.py's --P-std, 1.6)"),
        ("--arrows", int, 3, "teacher-velocity arrows on this many trajectories (default: 3)"),
        ("--draws", int, 20000, "training steps' routes for the t densities (default: 20000)"),
    ):
        p.add_argument(flag, type=kind, default=default, within=ranges[flag], help=what)
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
