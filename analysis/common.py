"""Plumbing shared by the analysis scripts (Figs. 3, 7–9): flags, teacher, real data, Eq. 8, output.

The teacher comes from backbones.build (the one teacher interface) with train.py's presets; toy
backbones use their held-out split as real data, Sana (no images) the teacher's own samples. Tensors
are in TrigFlow units (x0 = σ_d × FM data, z ~ N(0, σ_d² I)); t ∈ [0, π/2], t = 0 is data.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import backbones  # noqa: E402
import report  # noqa: E402
import toy  # noqa: E402
from config import RANGES, Config, Parser, UsageError, floats, parse_args, validate  # noqa: E402
from trajectory import reference_route, rollout  # noqa: E402
from trigflow import SIGMA_D, TrigFlow  # noqa: E402

BACKBONES = ("digits", "toy2d", "sana")


def parser(description: str, sweep_w: tuple[float, ...] = ()) -> Parser:
    """The flags every analysis script shares; scripts add their own. With sweep_w, --w takes a
    comma-separated list of CFG scales and defaults to sweep_w. --resolution, --seed and
    --teacher-steps are checked with train.py's ranges (config_of), --w and --shift here."""
    p = Parser(description=description)
    p.add_argument(
        "--backbone", choices=BACKBONES, default="digits", help="the teacher (default: digits)"
    )
    p.add_argument("--pretrained", default="", help="sana: a local diffusers SanaPipeline folder")
    p.add_argument("--tiny", action="store_true", help="sana: a tiny random pipeline instead")
    p.add_argument("--prompts-file", default="", help="sana: UTF-8 text, one prompt per line")
    p.add_argument(
        "--resolution", type=int, default=64, help="sana: image side in pixels (default: 64)"
    )
    p.add_argument("--out", default="runs/analysis", help="output folder (default: runs/analysis)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the noise and data draws (default: 0)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--cache-dir",
        default="runs",
        help="toy teachers are cached in <cache-dir>/teachers (default: runs)",
    )
    p.add_argument(
        "--teacher-steps",
        type=int,
        default=0,
        help="toy teacher FM steps (default 0: toy_teacher.TEACHERS)",
    )
    if sweep_w:
        p.add_argument(
            "--w",
            type=floats,
            default=sweep_w,
            within=RANGES["eval_w"],
            help="teacher CFG scales, one set of curves each (default: "
            + ",".join(f"{w:g}" for w in sweep_w)
            + ")",
        )
    else:
        p.add_argument(
            "--w",
            type=float,
            default=None,
            within=RANGES["eval_w"],
            help="teacher CFG scale (default: train.py's --eval-w: digits 2, toy2d 1, sana 4.5)",
        )
    p.add_argument(
        "--shift",
        type=float,
        default=None,
        within=RANGES["shift"],
        help="reference-route shift (default: train.py's --shift: toy2d 1, else 2.5)",
    )
    return p


def config_of(a: argparse.Namespace) -> Config:
    """The run configuration these flags describe (train.py's presets fill the rest); checked."""
    argv = ["--backbone", a.backbone, "--resolution", str(a.resolution), "--seed", str(a.seed)]
    argv += ["--device", a.device, "--cache-dir", a.cache_dir]
    argv += ["--teacher-steps", str(a.teacher_steps), "--threads", "0"]
    argv += ["--pretrained", a.pretrained] * bool(a.pretrained) + ["--tiny"] * a.tiny
    argv += ["--prompts-file", a.prompts_file] * bool(a.prompts_file)
    cfg = parse_args(argv)
    validate(cfg, run_dir=False)
    return cfg


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check; bad input raises UsageError (nothing is loaded or written yet)."""
    a = p.parse_args(argv)
    cfg = config_of(a)
    a.w = cfg.eval_w if a.w is None else a.w
    a.shift = cfg.shift if a.shift is None else a.shift
    return a


def main(
    run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser, argv: list[str] | None
) -> int:
    """Parse, run, and turn bad input into one line `error: …` and exit status 2."""
    try:
        a = parse(p, argv)
        torch.manual_seed(a.seed)
        run(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check(ok: bool, msg: str) -> None:
    """A script's own range check: UsageError(msg) unless ok."""
    if not ok:
        raise UsageError(msg)


# ------------------------------------------------------------------------------------------ teacher
def load_teacher(a: argparse.Namespace) -> tuple[backbones.Teacher, TrigFlow]:
    """The teacher (backbones.build) and its CFG TrigFlow view F(x_t/σ_d, t, cond, w) (Eqs. 5–7)."""
    T = backbones.build(config_of(a))
    return T, TrigFlow(T.velocity, uncond=T.uncond)


def held_out(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Toy backbones' held-out split (x0 in TrigFlow units, prompts); None for Sana (no images)."""
    if a.backbone not in toy.BACKBONES:
        return None
    x, y, _ = toy.load_data(a.backbone, "test")
    return SIGMA_D * x.to(a.device), y.to(a.device)


def to_images(T: backbones.Teacher, x0: torch.Tensor) -> torch.Tensor:
    """Samples in TrigFlow units → images [B, C, H, W] in [−1, 1]."""
    return T.to_images(x0 / SIGMA_D)


def noise(n: int, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """z ~ N(0, σ_d² I), [n, *shape], drawn on the CPU from g (the same on every device)."""
    return (SIGMA_D * torch.randn((n, *shape), generator=g)).to(device)


def prompts(n: int, T: backbones.Teacher, device: str) -> torch.Tensor:
    """Prompt indices 0, 1, …, P − 1, 0, … of n samples."""
    return (torch.arange(n) % len(T.prompt_names)).to(device)


def data_x0(
    T: backbones.Teacher,
    F: TrigFlow,
    n: int,
    g: torch.Generator,
    a: argparse.Namespace,
    w: float,
    N: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples x0 (TrigFlow units) with prompts: held-out data (no replacement while it lasts);
    for image-free backbones the teacher's own samples at CFG scale w (reference route of N steps,
    fresh noise)."""
    real = held_out(a)
    if real is not None:
        x, y = real
        i = torch.cat([torch.randperm(len(x), generator=g) for _ in range(-(-n // len(x)))])[:n]
        return x[i.to(x.device)], y[i.to(y.device)]
    p, w_b = prompts(n, T, a.device), torch.full((n,), w, device=a.device)
    z = noise(n, T.data_shape, g, a.device)
    return rollout(F, z, reference_route(N, a.shift), T.cond(p), w_b, SIGMA_D).x0, p


# ------------------------------------------------------------------------------------------- output
def write(
    a: argparse.Namespace,
    name: str,
    numbers: dict,
    fig: plt.Figure,
    summary: Callable[[dict], str] | None = None,
) -> None:
    """<out>/<name>.json (with the flags) and .png; with `summary` (numbers → markdown) also .md,
    printed, and with --readme put into its page's block `<!-- name -->` (report.page)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {"args": dict(vars(a)), **numbers}
    (out / f"{name}.json").write_text(json.dumps(numbers, indent=1))
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out / name}.json and .png")
    if summary is not None:
        md = summary(numbers)
        (out / f"{name}.md").write_text(md)
        print(md)
        if getattr(a, "readme", False):
            report.replace_block(report.page(name), name, md)


def readme_flag(p: Parser) -> None:
    """--readme: the script's numbers also replace its block in docs/results.md."""
    p.add_argument(
        "--readme",
        action="store_true",
        help="also replace this script's numbers in docs/results.md (default: off)",
    )


def show(ax: plt.Axes, x: torch.Tensor, kind: str, scale: float = 1.0) -> None:
    """One image panel of a sample x [C, H, W]: kind "image" in [−1, 1]; kind "noise" (Eq. 8's
    noise, a latent) in [−scale, scale] with a diverging map, or its first 3 channels as RGB."""
    x = x.detach().float().cpu()  # matplotlib gets numpy arrays (tensors are deprecated there)
    if kind == "image":
        img = ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    elif x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
    else:
        ax.imshow((((x[:3] / scale).clamp(-1, 1) + 1).permute(1, 2, 0) / 2).numpy())
    ax.set_xticks([]), ax.set_yticks([])


def as_list(x: torch.Tensor) -> list:
    """A tensor as (nested) Python floats for JSON."""
    return x.detach().double().cpu().tolist()
