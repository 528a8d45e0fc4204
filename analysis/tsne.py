"""App. A, Fig. 8 (scatter plots): t-SNE of Eq. (8)'s equivalent noise, forward diffusion vs ODE.

At a few route times, t-SNE embeds both processes' equivalent noises and the initial noise; a k-NN
two-sample test gives separability (held-out accuracy: 0.5 = same law, 1 = disjoint). Both see the
directions Noise_eqv/‖Noise_eqv‖ (as Fig. 8's cosine); norms are reported beside.
    python analysis/tsne.py [--backbone digits|toy2d|sana] [--n 300] [--times 1.3,0.9,0.5,0.1]
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common
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


def run(a) -> None:
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    ok = a.n >= 2 * FOLDS and a.N >= 2 and a.k >= 1
    common.check(ok, f"--n must be >= {2 * FOLDS}, --N >= 2 and --k >= 1")
    T, F = common.load_teacher(a)
    times, z, fwd, bwd = common.both(T, F, a, a.n, a.N)
    sel = list(dict.fromkeys(int((times - t).abs().argmin()) for t in a.times))
    z_np = unit(z.flatten(1))
    acc = {"forward_vs_backward": [], "forward_vs_noise": [], "backward_vs_noise": []}
    numbers = {"t": [], "n": a.n, "N": a.N, "k": a.k, "knn_accuracy": acc}
    numbers |= {"norm_ratio": {"forward": [], "backward": []}, "tsne": []}
    colors = {"initial": "tab:gray", "forward": "tab:blue", "backward": "tab:red"}
    fig, axes = plt.subplots(1, len(sel), figsize=(3.2 * len(sel), 3.4), squeeze=False)
    for ax, i in zip(axes[0], sel, strict=True):
        f, b = unit(fwd[i].flatten(1)), unit(bwd[i].flatten(1))  # [n, D]
        acc["forward_vs_backward"].append(knn_accuracy(f, b, a.k, a.seed))
        acc["forward_vs_noise"].append(knn_accuracy(f, z_np, a.k, a.seed))
        acc["backward_vs_noise"].append(knn_accuracy(b, z_np, a.k, a.seed))
        # one embedding of the three sets; perplexity must stay below the number of points
        X = np.concatenate([z_np, f, b])
        perplexity = min(30.0, (len(X) - 1) / 3)
        Y = TSNE(2, perplexity=perplexity, init="pca", random_state=a.seed).fit_transform(X)
        numbers["t"].append(float(times[i]))
        for k, e in (("forward", fwd), ("backward", bwd)):
            ratio = e[i].flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)  # ‖Noise_eqv‖/‖z‖
            numbers["norm_ratio"][k].append(float(ratio.mean()))
        Y_of = {"initial": Y[: a.n], "forward": Y[a.n : 2 * a.n], "backward": Y[2 * a.n :]}
        numbers["tsne"].append({k: Yk.tolist() for k, Yk in Y_of.items()})
        for k, Yk in Y_of.items():
            label = "initial noise" if k == "initial" else k
            ax.scatter(Yk[:, 0], Yk[:, 1], s=3, color=colors[k], alpha=0.6, label=label)
        title = f"t={times[i]:.2f}  k-NN acc f/b {acc['forward_vs_backward'][-1]:.2f}"
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.suptitle(f"t-SNE of the equivalent noise (Eq. 8), {a.backbone}", fontsize=9)
    common.write(a, "tsne", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument(
        "--n", type=int, default=300, help="samples (trajectories) per process (default: 300)"
    )
    p.add_argument(
        "--N", type=int, default=40, help="times on the reference route (Eq. 9 steps) (default: 40)"
    )
    p.add_argument(
        "--times",
        type=floats,
        default=(1.3, 0.9, 0.5, 0.1),
        help="t-SNE at the route times nearest to these (default: 1.3,0.9,0.5,0.1)",
    )
    p.add_argument(
        "--k", type=int, default=5, help="neighbours of the k-NN two-sample test (default: 5)"
    )
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
