"""App. A, Fig. 8 (scatter plots): t-SNE of Eq. (8)'s equivalent noise, forward diffusion vs ODE.

At a few route times and per CFG scale w, a k-NN two-sample test tells the backward equivalent
noise from the forward one in both readings (analysis/readings.py: (a) true x0, whose noise is z;
(b) the teacher's x̂0), as held-out accuracy: 0.5 = same law, 1 = disjoint. All see the directions
Noise_eqv/‖Noise_eqv‖ (as Fig. 8's cosine); norms are reported beside. t-SNE embeds z, forward (b)
and backward at the paper's w.
    python analysis/tsne.py [--backbone digits|toy2d|sana] [--w 0,1,2,4.5] [--times 1.3,0.9,0.5,0.1]
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common, readings
from config import floats

FOLDS = 5  # k-NN test: instances split into 5 folds, each held out once


def knn_accuracy(a: np.ndarray, b: np.ndarray, k: int, seed: int) -> float:
    """k-NN two-sample test of paired sets a, b [n, D]: mean held-out accuracy of telling a from b.

    Row i of a and of b come from the same instance (same z, same prompt), so folds split instances:
    both points of an instance are on the same side, and a test point never meets its own twin."""
    from sklearn.model_selection import KFold
    from sklearn.neighbors import KNeighborsClassifier

    n = len(a)
    X, y = np.concatenate([a, b]), np.repeat([0, 1], n)
    acc = []
    for train, test in KFold(FOLDS, shuffle=True, random_state=seed).split(np.arange(n)):
        clf = KNeighborsClassifier(k).fit(X[np.r_[train, train + n]], y[np.r_[train, train + n]])
        acc.append(clf.score(X[np.r_[test, test + n]], y[np.r_[test, test + n]]))
    return float(np.mean(acc))


def unit(x: torch.Tensor) -> np.ndarray:
    """Rows [n, D] scaled to unit norm: a k-NN test on raw vectors is dominated by their norms (a
    spread-out set loses every test point to a compact one in high dimension, whatever the
    directions)."""
    return torch.nn.functional.normalize(x.double(), dim=1).cpu().numpy()


COMPARE = {  # k-NN two-sample tests: name → (set, set, how the README says it); "noise" is z
    "forward_known_vs_backward": ("forward_known", "backward", "forward (a) vs backward"),
    "forward_model_vs_backward": ("forward_model", "backward", "forward (b) vs backward"),
    "forward_model_vs_noise": ("forward_model", "noise", "forward (b) vs z"),
}


def summary(d: dict) -> str:
    """Markdown: the k-NN two-sample accuracy per comparison and w at the selected times."""
    head = " | ".join(f"t = {t:.2f}" for t in d["t"])
    lines = [f"| k-NN accuracy | w | {head} |", "|---|---|" + "---|" * len(d["t"])]
    for name in COMPARE:
        for entry in d["by_w"]:
            acc = " | ".join(f"{x:.2f}" for x in entry["knn_accuracy"][name])
            lines.append(f"| {COMPARE[name][2]} | {entry['w']:g} | {acc} |")
    return "\n".join(lines) + "\n"


def run(a) -> None:
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    T, F = common.load_teacher(a)
    times, z, by_w = readings.sweep(T, F, a)
    sel = list(dict.fromkeys(int((times - t).abs().argmin()) for t in a.times))
    z_np = unit(z.flatten(1))
    numbers = {"t": [float(times[i]) for i in sel], "n": a.n, "N": a.N, "k": a.k}
    numbers |= {"readings": readings.READINGS, "by_w": [], "tsne_w": readings.panel_w(a.w)}
    for w, noises in by_w.items():
        acc = {name: [] for name in COMPARE}
        ratio = {k: [] for k in readings.READINGS}  # mean ‖Noise_eqv‖/‖z‖
        for i in sel:
            sets = {k: unit(e[i].flatten(1)) for k, e in noises.items()} | {"noise": z_np}
            for name, (p, q, _) in COMPARE.items():
                acc[name].append(knn_accuracy(sets[p], sets[q], a.k, a.seed))
            for k, e in noises.items():
                r = e[i].flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
                ratio[k].append(float(r.mean()))
        numbers["by_w"].append({"w": w, "knn_accuracy": acc, "norm_ratio": ratio})

    colors = {"initial": "tab:gray", "forward_model": "tab:blue", "backward": "tab:red"}
    label = {"initial": "z = forward (a)", "forward_model": "forward (b)", "backward": "backward"}
    fig, axes = plt.subplots(1, len(sel) + 1, figsize=(3.2 * (len(sel) + 1), 3.4), squeeze=False)
    shown, numbers["tsne"] = by_w[numbers["tsne_w"]], []
    for j, (ax, i) in enumerate(zip(axes[0], sel, strict=False)):
        f, b = unit(shown["forward_model"][i].flatten(1)), unit(shown["backward"][i].flatten(1))
        # one embedding of the three sets; perplexity must stay below the number of points
        X = np.concatenate([z_np, f, b])
        perplexity = min(30.0, (len(X) - 1) / 3)
        Y = TSNE(2, perplexity=perplexity, init="pca", random_state=a.seed).fit_transform(X)
        Y_of = {"initial": Y[: a.n], "forward_model": Y[a.n : 2 * a.n], "backward": Y[2 * a.n :]}
        numbers["tsne"].append({k: np.round(Yk, 3).tolist() for k, Yk in Y_of.items()})
        for k, Yk in Y_of.items():
            ax.scatter(Yk[:, 0], Yk[:, 1], s=3, color=colors[k], alpha=0.6, label=label[k])
        entry = next(e for e in numbers["by_w"] if e["w"] == numbers["tsne_w"])
        acc_b = entry["knn_accuracy"]["forward_model_vs_backward"][j]
        ax.set_title(
            f"t={times[i]:.2f}, w={numbers['tsne_w']:g}, k-NN (b)/bwd {acc_b:.2f}", fontsize=8
        )
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, markerscale=3)
    ax = axes[0, -1]  # the k-NN accuracies against t, per w
    for s, entry in enumerate(numbers["by_w"]):
        alpha = 0.35 + 0.65 * (s + 1) / len(numbers["by_w"])
        for name, color in (
            ("forward_known_vs_backward", "black"),
            ("forward_model_vs_backward", "tab:blue"),
        ):
            short = "(a)" if "known" in name else "(b)"
            ax.plot(
                numbers["t"],
                entry["knn_accuracy"][name],
                "o-",
                color=color,
                alpha=alpha,
                label=f"{short} vs backward, w={entry['w']:g}",
            )
    ax.axhline(0.5, color="gray", lw=0.5), ax.set_xlim(max(numbers["t"]) + 0.05, 0)
    ax.set_xlabel("t"), ax.set_ylabel("k-NN accuracy (0.5: same law)"), ax.legend(fontsize=5)
    fig.suptitle(f"t-SNE of the equivalent noise (Eq. 8), {a.backbone}", fontsize=9)
    fig.tight_layout()
    common.write(a, "tsne", numbers, fig, summary)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0], sweep_w=readings.SWEEP_W)
    p.add_argument(
        "--n",
        type=int,
        default=300,
        within=f">= {2 * FOLDS}",
        help="samples (trajectories) per process (default: 300)",
    )
    readings.route_flag(p)
    p.add_argument(
        "--times",
        type=floats,
        default=(1.3, 0.9, 0.5, 0.1),
        within="[0, π/2]",
        help="t-SNE at the route times nearest to these (default: 1.3,0.9,0.5,0.1)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=5,
        within=">= 1",
        help="neighbours of the k-NN two-sample test (default: 5)",
    )
    common.readme_flag(p)
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
