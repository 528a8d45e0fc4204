"""App. B, Fig. 9: the teacher's x̂0 along routes of (a) the three schemes and (b) N = 8…20 steps.

On routes from fixed noise and prompt (Eq. 9) the teacher predicts x̂0 = cos t·x_t − sin t·dx_t/dt.
Per panel, over route draws × trajectories, mean squared distances (FM units) of x̂0 to the ODE's
x̂0 at the same t (fine route through the route's times), the ODE solution (fine Flow-Euler route)
and the trajectory's end; and of the end to its nearest held-out datum.
    python analysis/predicted_x0.py [--N 16] [--steps 8,12,16,20] [--n 64] [--routes 8]
"""

import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python analysis/<name>.py`
import backbones
from analysis import common
from config import RANGES, Config, ints
from trajectory import TrigFlowModel, reference_route, rollout, sample_route
from trigflow import SIGMA_D, TrigFlow, x0_from_F

SCHEMES = ("random", "logit_normal", "reference")  # Fig. 9a, top to bottom


@torch.no_grad()
def predicted_x0(
    F: TrigFlowModel,
    z: torch.Tensor,
    route: torch.Tensor,
    cond,
    w: torch.Tensor | None,
    sigma_d: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 at each state of the rollout from z along route [N, B, ...], end points [B, ...]."""
    p = rollout(F, z, route, cond, w, sigma_d, keep_first=True)  # time-major
    # x̂0 = cos t·x_t − sin t·dx_t/dt  (σ_d·F = dx_t/dt)
    x0_hat = x0_from_F(p.x_t, p.t, p.dxdt / sigma_d, sigma_d)
    return x0_hat.reshape(len(route), *z.shape), p.x0


def msd(x: torch.Tensor, y: torch.Tensor, sigma_d: float, lead: int = 1) -> torch.Tensor:
    """Mean squared distance in FM units of TrigFlow samples, over all but `lead` leading dims."""
    return ((x - y) / sigma_d).pow(2).flatten(lead).mean(-1)


def nn_msd(x: torch.Tensor, data: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """Mean squared distance (FM units) of each sample [B, ...] to its nearest datum [M, ...]."""
    d2 = torch.cdist(x.flatten(1).double(), data.flatten(1).double()) ** 2 / x[0].numel()
    return d2.min(1).values / sigma_d**2


def panel(F: TrigFlow, real, a, scheme: str, N: int, z, cond, w, x_ode, key: int) -> dict:
    """One panel: `--routes` route draws of a scheme, same noises; per-step and summary numbers."""
    g = torch.Generator().manual_seed(a.seed * 1000 + key)
    route_kw = dict(shift=a.shift, P_mean=Config.P_mean, P_std=Config.P_std, sigma_d=SIGMA_D)
    at_t, to_ode, to_final, final_ode, final_nn, times, shown = [], [], [], [], [], [], None
    for r in range(a.routes):
        route = sample_route(scheme, N, g, **route_kw)
        x0_hat, x_end = predicted_x0(F, z, route, cond, w, SIGMA_D)  # [N, n, ...], [n, ...]
        # the ODE's own x̂0 at the route's times: a fine route (Flow-Euler ∪ this route), descending
        fine = torch.cat([reference_route(a.ref_N, a.shift), route]).unique().flip(0)
        x0_fine = predicted_x0(F, z, fine, cond, w, SIGMA_D)[0][torch.searchsorted(-fine, -route)]
        at_t.append(msd(x0_hat, x0_fine, SIGMA_D, 2).mean(1))  # [N]
        to_ode.append(msd(x0_hat, x_ode, SIGMA_D, 2).mean(1))
        to_final.append(msd(x0_hat, x_end, SIGMA_D, 2).mean(1))
        final_ode.append(msd(x_end, x_ode, SIGMA_D).mean())
        if real is not None:
            final_nn.append(nn_msd(x_end, real[0], SIGMA_D).mean())
        times.append(route)
        shown = (x0_hat[:, a.prompt].cpu(), route) if r == 0 else shown  # the figure's trajectory
    at_t, to_ode = torch.stack(at_t).mean(0), torch.stack(to_ode).mean(0)  # [N] each
    to_final = torch.stack(to_final).mean(0)
    return {
        "scheme": scheme,
        "N": N,
        "t_mean": common.as_list(torch.stack(times).mean(0)),
        "mse_to_ode_at_t": common.as_list(at_t),
        "mse_to_ode": common.as_list(to_ode),
        "mse_to_own_final": common.as_list(to_final),
        "mean_mse_to_ode_at_t": float(at_t.mean()),
        "mean_mse_to_ode": float(to_ode.mean()),
        "mean_mse_to_own_final": float(to_final.mean()),
        "final_mse_to_ode": float(torch.stack(final_ode).mean()),
        "final_nn_mse_to_data": float(torch.stack(final_nn).mean()) if final_nn else None,
        "shown_t": common.as_list(shown[1]),
        "_shown": shown[0],
    }


def run(a) -> None:
    import matplotlib.pyplot as plt

    T, F = common.load_teacher(a)
    real = common.held_out(a)
    n_prompts = min(a.n, len(T.prompt_names))
    common.check(0 <= a.prompt < n_prompts, f"--prompt must be in [0, {n_prompts - 1}]")
    g = torch.Generator().manual_seed(a.seed)
    z = common.noise(a.n, T.data_shape, g, a.device)
    prompt = common.prompts(a.n, T, a.device)
    cond, w = T.cond(prompt), torch.full((a.n,), a.w, device=a.device)
    # the teacher ODE's solution from the same noise: the Flow-Euler (reference) route, ref_N steps
    x_ode = rollout(F, z, reference_route(a.ref_N, a.shift), cond, w, SIGMA_D).x0
    jobs = [("schemes", s, a.N) for s in SCHEMES] + [("steps", "reference", N) for N in a.steps]
    numbers = {"n": a.n, "routes": a.routes, "ref_N": a.ref_N, "schemes": [], "steps": []}
    ode_nn = None if real is None else float(nn_msd(x_ode, real[0], SIGMA_D).mean())
    numbers["ode_nn_mse_to_data"] = ode_nn
    for key, (part, scheme, N) in enumerate(tqdm(jobs, desc="predicted x0", disable=None)):
        numbers[part].append(panel(F, real, a, scheme, N, z, cond, w, x_ode, key))
    shown = {part: [p.pop("_shown") for p in numbers[part]] for part in ("schemes", "steps")}
    figure(T, a, numbers, shown, x_ode[a.prompt].cpu(), plt)


def figure(T: backbones.Teacher, a, numbers: dict, shown: dict, ode, plt) -> None:
    """Fig. 9: rows = scheme (a) or N (b), columns = route steps then the ODE solution; or, for 2-D
    data, one panel per row with the x̂0 of the shown trajectory."""
    rows = numbers["schemes"] + numbers["steps"]
    x0s = shown["schemes"] + shown["steps"]
    labels = [
        f"{p['scheme'] if i < len(SCHEMES) else 'N = ' + str(p['N'])}\n"
        f"x̂0 vs ODE@t {p['mean_mse_to_ode_at_t']:.2g}\nend vs ODE {p['final_mse_to_ode']:.2g}"
        for i, p in enumerate(rows)
    ]
    if len(T.data_shape) == 1:  # 2-D: the path of x̂0 over the steps
        fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows), 2.8), squeeze=False)
        for ax, x0, label in zip(axes[0], x0s, labels, strict=True):
            x0 = (x0 / SIGMA_D).numpy()
            ax.plot(x0[:, 0], x0[:, 1], "-o", ms=2, lw=0.8)
            ax.plot(*(ode / SIGMA_D).tolist(), "k*", ms=8, label="ODE")
            ax.set_title(label, fontsize=7), ax.set_xlim(-2, 2), ax.set_ylim(-2, 2)
        axes[0, 0].legend(fontsize=7)
    else:
        cols = max(len(x) for x in x0s) + 1
        images = [common.to_images(T, x).cpu() for x in x0s]  # [N, C, H, W] per row
        ode_image = common.to_images(T, ode[None])[0].cpu()
        fig, axes = plt.subplots(
            len(rows), cols, figsize=(0.55 * cols + 1.2, 0.75 * len(rows)), squeeze=False
        )
        label_kw = dict(ha="right", va="center", fontsize=6)
        for i, (img, label, p) in enumerate(zip(images, labels, rows, strict=True)):
            for j, ax in enumerate(axes[i]):
                ax.axis("off")
                if j < len(img):  # the route time above each step
                    common.show(ax, img[j], "image")
                    ax.set_title(f"{p['shown_t'][j]:.2f}", fontsize=5, pad=1)
            common.show(axes[i, -1], ode_image, "image")
            axes[i, 0].text(-0.15, 0.5, label, transform=axes[i, 0].transAxes, **label_kw)
        axes[0, -1].set_title("ODE", fontsize=6, pad=1)
    fig.suptitle(
        f"Teacher x̂0 along routes ({a.backbone}); left: mean squared distance of x̂0 to the ODE's "
        "x̂0 at the same t, and of the route's end to the ODE solution",
        fontsize=8,
    )
    common.write(a, "predicted_x0", numbers, fig)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument(
        "--N",
        type=int,
        default=16,
        within=RANGES["N"],
        help="route length of the scheme comparison (Fig. 9a) (default: 16)",
    )
    p.add_argument(
        "--steps",
        type=ints,
        default=(8, 12, 16, 20),
        within=RANGES["N"],
        help="route lengths of the reference route (Fig. 9b, Tab. 5; default: 8,12,16,20)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=64,
        within=">= 1",
        help="trajectories per route draw (same noises throughout) (default: 64)",
    )
    p.add_argument(
        "--routes", type=int, default=8, within=">= 1", help="route draws per panel (default: 8)"
    )
    p.add_argument(
        "--ref-N",
        type=int,
        default=64,
        within=RANGES["N"],
        help="steps of the Flow-Euler route giving the ODE solution (default: 64)",
    )
    p.add_argument(
        "--prompt",
        type=int,
        default=0,
        within=">= 0",
        help="the trajectory shown is the one of this prompt (default: 0)",
    )
    return common.main(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
