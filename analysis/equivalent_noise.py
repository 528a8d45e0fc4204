"""Finding 2, Eq. (8), Figs. 3 and 8 (curves): equivalent noise, forward diffusion vs teacher ODE.

Per CFG scale w and route time t, the cosine of Noise_eqv = (x_t − cos t·x̂0)/sin t with the initial
noise, in three readings (analysis/readings.py): forward with the true x0 (a), forward with the
teacher's x̂0 (b), backward along the teacher's ODE from z_T = z. Also the energy mean‖Noise_eqv‖²
and the projection mean⟨Noise_eqv, z⟩, over mean‖z‖²: under (b) an exact teacher keeps the energy
≤ 1 and equal to the projection. Panels (Fig. 3): one instance at the paper's w.
    python analysis/equivalent_noise.py [--backbone digits|toy2d|sana] [--w 0,1,2,4.5] [--n 512]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common, readings
from trigflow import SIGMA_D

PANEL_TIMES = (1.4, 1.1, 0.8, 0.5, 0.25, 0.05)  # Fig. 3: the route times nearest to these are shown
COLOR = {"forward_known": "black", "forward_model": "tab:blue", "backward": "tab:red"}
LABEL = {"forward_known": "forward (a)", "forward_model": "forward (b)", "backward": "backward"}


def numbers_of(times, z, by_w: dict) -> dict:
    """The JSON: per w and reading, cos_mean, cos_std, energy_ratio and projection_ratio over the
    route times `t`."""
    out = {"t": common.as_list(times), "readings": readings.READINGS, "by_w": []}
    for w, noises in by_w.items():
        entry = {"w": w}
        for k, e in noises.items():
            cos = readings.cosine(e, z)  # [N, n]
            entry[k] = {
                "cos_mean": common.as_list(cos.mean(1)),
                "cos_std": common.as_list(cos.std(1)),
                "energy_ratio": common.as_list(readings.energy_ratio(e, z)),
                "projection_ratio": common.as_list(readings.projection_ratio(e, z)),
            }
        out["by_w"].append(entry)
    return out


def summary(d: dict) -> str:
    """Markdown: mean cosine per reading and w at the panel times, the smallest, and the energy and
    projection ratios at the last route time."""
    t = d["t"]
    cols = [min(range(len(t)), key=lambda i: abs(t[i] - p)) for p in d["panel_t"]]
    head = " | ".join(f"t = {t[i]:.2f}" for i in cols)
    lines = [
        f"| reading | w | {head} | smallest (at t) | energy, projection at t = {t[-1]:.3f} |",
        "|---|---|" + "---|" * (len(cols) + 2),
    ]
    for entry in d["by_w"]:
        for k in readings.READINGS:
            c = entry[k]["cos_mean"]
            i = min(range(len(c)), key=c.__getitem__)
            at = " | ".join(f"{c[j]:.3f}" for j in cols)
            where = "every t" if max(c) - c[i] < 1e-6 else f"{t[i]:.3f}"
            row = f"| {LABEL[k]} | {entry['w']:g} | {at} | {c[i]:.3f} ({where}) |"
            energy, proj = entry[k]["energy_ratio"][-1], entry[k]["projection_ratio"][-1]
            lines.append(f"{row} {energy:.2f}, {proj:.2f} |")
    return "\n".join(lines) + "\n"


def run(a) -> None:
    import matplotlib.pyplot as plt

    T, F = common.load_teacher(a)
    times, z, by_w = readings.sweep(T, F, a)
    numbers = {"n": a.n, "N": a.N, **numbers_of(times, z, by_w)}
    # the route times nearest to PANEL_TIMES, each once (a short route has fewer)
    panel = list(dict.fromkeys(int((times - t).abs().argmin()) for t in PANEL_TIMES))
    numbers["panel_t"], numbers["panel_w"] = [float(times[i]) for i in panel], readings.panel_w(a.w)

    K = len(panel) + 1  # the initial noise, then the panel times
    fig = plt.figure(figsize=(5.2 + 1.3 * K, 4.4))
    grid = fig.add_gridspec(3, K + 3, width_ratios=[1, 1, 0.3] + [0.75] * K)
    ax, ax_e = fig.add_subplot(grid[:2, :2]), fig.add_subplot(grid[2, :2])
    t_np, shades = times.numpy(), len(a.w)
    for s, entry in enumerate(numbers["by_w"]):
        alpha = 0.35 + 0.65 * (s + 1) / shades  # darker for larger w
        for k in readings.READINGS:
            if k == "forward_known" and s:  # z at every t and w: drawn once
                continue
            mean, std = (np.array(entry[k][q]) for q in ("cos_mean", "cos_std"))
            known = k == "forward_known"
            style = dict(color=COLOR[k], alpha=1 if known else alpha, ls="--" if known else "-")
            w_label = "every w" if known else f"w={entry['w']:g}"
            ax.plot(t_np, mean, label=f"{LABEL[k]}, {w_label}", **style)
            ax_e.plot(t_np, entry[k]["energy_ratio"], **style)
            if entry["w"] == numbers["panel_w"]:
                ax.fill_between(t_np, mean - std, mean + std, color=COLOR[k], alpha=0.12)
    ax.set_ylabel("cos(Noise_eqv, initial noise)"), ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"Eq. 8 on {a.backbone}: (a) true x0, (b) teacher's x̂0", fontsize=9)
    ax_e.set_ylabel("‖Noise_eqv‖² / ‖z‖²", fontsize=8)
    ax_e.set_xlabel("t  (π/2 = noise, 0 = data)")
    for axis in (ax, ax_e):
        axis.set_xlim(t_np.max(), 0)
    shown = by_w[numbers["panel_w"]]
    for r, k in enumerate(readings.READINGS):
        row = [(z, "z" if k != "backward" else "z_T")]
        row += [(shown[k][i], f"t={times[i]:.2f}") for i in panel]
        for j, (x, title) in enumerate(row):
            axi = fig.add_subplot(grid[r, 3 + j])
            if len(T.data_shape) == 1:  # toy2d: the equivalent noise of all samples as points
                color = "tab:gray" if j == 0 else COLOR[k]
                axi.scatter(*x[:, :2].T.cpu().numpy(), s=1, color=color)
                axi.set_xlim(-2, 2), axi.set_ylim(-2, 2), axi.set_xticks([]), axi.set_yticks([])
            else:  # Fig. 3: one instance
                common.show(axi, x[0], "noise", scale=3 * SIGMA_D)
            axi.set_title(title, fontsize=7)
            if j == 0:
                axi.set_ylabel(f"{LABEL[k]}\nw={numbers['panel_w']:g}", fontsize=7)
    common.write(a, "equivalent_noise", numbers, fig, summary)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0], sweep_w=readings.SWEEP_W)
    p.add_argument(
        "--n", type=int, default=512, within=">= 2", help="samples (trajectories) (default: 512)"
    )
    readings.route_flag(p)
    common.readme_flag(p)
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
