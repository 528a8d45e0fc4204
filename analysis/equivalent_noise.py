"""Finding 2, Eq. (8), Figs. 3 and 8 (curves): equivalent noise, forward diffusion vs teacher ODE.

Forward: x_t = cos t·x0 + sin t·z, real x0 and a fixed z, x̂0 = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t).
Backward: teacher ODE from z_T on a fine reference route (Eq. 9), x̂0 = cos t·x_t − sin t·dx_t/dt.
Per route time: cosine of Noise_eqv = (x_t − cos t·x̂0)/sin t with z (resp. z_T), mean and std.
    python analysis/equivalent_noise.py [--backbone digits|toy2d|sana] [--n 512] [--N 40]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common
from trigflow import SIGMA_D

PANEL_TIMES = (1.4, 1.1, 0.8, 0.5, 0.25, 0.05)  # Fig. 3: the route times nearest to these are shown


def run(a) -> None:
    import matplotlib.pyplot as plt

    common.check(a.n >= 2 and a.N >= 2, "--n and --N must be >= 2")
    T, F = common.load_teacher(a)
    times, z, fwd, bwd = common.both(T, F, a, a.n, a.N)
    cos = {"forward": common.cosine(fwd, z), "backward": common.cosine(bwd, z)}  # [N, n] each
    numbers = {"t": common.as_list(times), "n": a.n, "N": a.N}
    for k, sim in cos.items():
        mean, std = sim.mean(1), sim.std(1)
        numbers[k] = {"cos_mean": common.as_list(mean), "cos_std": common.as_list(std)}
    # the route times nearest to PANEL_TIMES, each once (a short route has fewer)
    panel = list(dict.fromkeys(int((times - t).abs().argmin()) for t in PANEL_TIMES))
    numbers["panel_t"] = [float(times[i]) for i in panel]

    K = len(panel) + 1  # the initial noise, then the panel times
    fig = plt.figure(figsize=(4.2 + 1.3 * K, 3.2))
    grid = fig.add_gridspec(2, K + 3, width_ratios=[1, 1, 0.25] + [0.75] * K)
    ax = fig.add_subplot(grid[:, :2])
    color_of = {"forward": "tab:blue", "backward": "tab:red"}
    t_np = times.numpy()
    for k, sim in cos.items():
        mean, std = sim.mean(1).cpu().numpy(), sim.std(1).cpu().numpy()
        ax.plot(t_np, mean, color=color_of[k], label=f"{k} (mean ± std)")
        ax.fill_between(t_np, mean - std, mean + std, color=color_of[k], alpha=0.2)
    ax.set_xlabel("t  (π/2 = noise, 0 = data)"), ax.set_ylabel("cos(Noise_eqv, initial noise)")
    ax.set_xlim(t_np.max(), 0), ax.legend(fontsize=7)
    ax.set_title(f"Eq. 8 on {a.backbone}", fontsize=9)
    for r, (k, e) in enumerate((("forward", fwd), ("backward", bwd))):
        row = [(z, "z" if r == 0 else "z_T")] + [(e[i], f"t={times[i]:.2f}") for i in panel]
        for j, (x, title) in enumerate(row):
            axi = fig.add_subplot(grid[r, 3 + j])
            if len(T.data_shape) == 1:  # toy2d: the equivalent noise of all samples as points
                color = "tab:gray" if j == 0 else color_of[k]
                axi.scatter(*x[:, :2].T.cpu().numpy(), s=1, color=color)
                axi.set_xlim(-2, 2), axi.set_ylim(-2, 2), axi.set_xticks([]), axi.set_yticks([])
            else:  # Fig. 3: one instance
                common.show(axi, x[0], "noise", scale=3 * SIGMA_D)
            axi.set_title(title, fontsize=8)
            if j == 0:
                axi.set_ylabel(k, fontsize=8)
    common.write(a, "equivalent_noise", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="samples (trajectories) (default: 512)")
    p.add_argument(
        "--N", type=int, default=40, help="times on the reference route (Eq. 9 steps) (default: 40)"
    )
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
