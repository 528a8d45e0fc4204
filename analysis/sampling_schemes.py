"""Sec. 4.2, Fig. 7: the routes of the three sampling schemes, instances and density of their times.

For random, logit-normal (P_mean, P_std) and the reference route (shift; partitioned sampling), five
route instances of N times (vertical lines) over the density of the times of many draws (shaded).
The first time of every route is π/2 (pure noise), left out of the density. No teacher is needed.
    python analysis/sampling_schemes.py [--N 16] [--draws 20000]
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
from analysis import common
from config import RANGES
from trajectory import reference_route, sample_route
from trigflow import SIGMA_D

SCHEMES = ("random", "logit_normal", "reference")  # Fig. 7, top to bottom
INSTANCES = 5  # Fig. 7: five random sampling instances per strategy
BINS = 60  # histogram bins on [0, π/2]


def draw(scheme: str, n: int, a, g: torch.Generator) -> torch.Tensor:
    """n routes of one scheme, [n, N] (descending, first π/2)."""
    route_kw = dict(shift=a.shift, P_mean=a.P_mean, P_std=a.P_std, sigma_d=SIGMA_D)
    return torch.stack([sample_route(scheme, a.N, g, **route_kw) for _ in range(n)])


def run(a) -> None:
    import matplotlib.pyplot as plt

    edges = torch.linspace(0, math.pi / 2, BINS + 1, dtype=torch.float64)
    numbers = {
        "N": a.N,
        "shift": a.shift,
        "P_mean": a.P_mean,
        "P_std": a.P_std,
        "draws": a.draws,
        "reference_route": common.as_list(reference_route(a.N, a.shift)),
        "bin_edges": common.as_list(edges),
        "schemes": {},
    }
    fig, axes = plt.subplots(len(SCHEMES), 1, figsize=(7, 1.6 * len(SCHEMES)), sharex=True)
    for ax, scheme in zip(axes, SCHEMES, strict=True):
        g = torch.Generator().manual_seed(a.seed)
        inst, routes = draw(scheme, INSTANCES, a, g), draw(scheme, a.draws, a, g)
        t = routes[:, 1:].flatten()  # the sampled times; every route starts at π/2
        hist = torch.histc(t, BINS, 0, math.pi / 2)
        density = hist / (hist.sum() * (edges[1] - edges[0]))
        # a route's largest gap, its last step to t = 0 included: how much of [0, π/2] it leaves out
        gaps = torch.cat([routes, routes.new_zeros(len(routes), 1)], 1).diff(dim=1).neg()
        numbers["schemes"][scheme] = {
            "instances": common.as_list(inst),
            "density": common.as_list(density),
            "max_gap_mean": float(gaps.max(1).values.mean()),
        }
        ax.stairs(
            density.numpy(),
            edges.numpy(),
            fill=True,
            alpha=0.3,
            color="tab:blue",
            label="density of sampled t",
        )
        for j, r in enumerate(inst):  # instance j: ticks in its own band of the panel's height
            lo = j / INSTANCES
            band = (lo + 0.02, lo + 1 / INSTANCES - 0.02)
            ax.vlines(
                r.numpy(), *band, transform=ax.get_xaxis_transform(), color=f"C{j + 1}", lw=1.0
            )
        ax.set_ylabel("density"), ax.set_title(f"{scheme} (N = {a.N})", fontsize=9, loc="left")
    axes[-1].set_xlabel("t  (0 = data, π/2 = noise)"), axes[-1].set_xlim(0, math.pi / 2)
    axes[0].legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    common.write(a, "sampling_schemes", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument(
        "--N",
        type=int,
        default=16,
        within=RANGES["N"],
        help="times per route (paper Tab. 5; official code 16) (default: 16)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=20000,
        within=">= 1",
        help="routes per scheme for the density (default: 20000)",
    )
    p.add_argument(
        "--P-mean",
        type=float,
        default=0.2,
        within=RANGES["P_mean"],
        help="logit-normal (Sana-Sprint; paper Sec. 5.2) (default: 0.2)",
    )
    p.add_argument(
        "--P-std", type=float, default=1.6, within=RANGES["P_std"], help="idem (default: 1.6)"
    )
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
