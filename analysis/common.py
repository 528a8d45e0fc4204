"""Shared plumbing of the analysis scripts (Figs. 3, 7, 8, 9): flags, the CFG teacher, real data, output.

Toy backbones: the cached flow-matching teacher of toy.train_teacher, the held-out split as real data. Sana
(--pretrained DIR or --tiny): the SanaPipeline transformer; it has no images, so teacher samples stand in for
data. Tensors are in TrigFlow units (x0 = σ_d × FM data, z ~ N(0, σ_d² I)); t ∈ [0, π/2], t = 0 is data.
"""

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import toy
from trajectory import reference_route, rollout
from trigflow import SIGMA_D, TrigFlow

BACKBONES = ("digits", "toy2d", "sana")
# CFG scale w and reference-route shift: what train.py evaluates with (PRESETS, Config.eval_w).
DEFAULTS = {"digits": {"w": 2.0, "shift": 2.5}, "toy2d": {"w": 1.0, "shift": 1.0},
            "sana": {"w": 4.5, "shift": 2.5}}


class UsageError(Exception):
    """Bad input: printed as one line `error: …`, exit status 2."""


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every analysis script shares; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backbone", choices=BACKBONES, default="digits")
    p.add_argument("--pretrained", default="", help="sana: a local diffusers SanaPipeline folder")
    p.add_argument("--tiny", action="store_true", help="sana: a tiny random pipeline instead")
    p.add_argument("--prompts-file", default="", help="sana: UTF-8 text, one prompt per line")
    p.add_argument("--resolution", type=int, default=64, help="sana: image side in pixels")
    p.add_argument("--out", default="runs/analysis")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default="runs", help="toy teachers are cached in <cache-dir>/teachers")
    p.add_argument("--teacher-steps", type=int, default=0, help="toy teacher FM steps (0: toy.TEACHERS)")
    p.add_argument("--w", type=float, default=None, help="teacher CFG scale (digits 2, toy2d 1, sana 4.5)")
    p.add_argument("--shift", type=float, default=None, help="reference-route shift (toy2d 1, else 2.5)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate; any bad input raises UsageError (nothing is loaded or written yet)."""
    def error(msg: str):
        raise UsageError(msg)

    p.error = error
    a = p.parse_args(argv)
    if a.backbone == "sana":
        if bool(a.pretrained) == a.tiny:
            raise UsageError("--backbone sana needs exactly one of --pretrained DIR (a local SanaPipeline "
                             "folder) or --tiny (a tiny random pipeline)")
        if a.pretrained:
            import sana

            try:
                sana.check_folder(a.pretrained)
            except sana.SanaFolderError as e:
                raise UsageError(f"--pretrained {e}") from e
        if a.resolution <= 0 or a.resolution % 32:
            raise UsageError(f"--resolution {a.resolution}: must be a positive multiple of 32")
    elif a.pretrained or a.tiny or a.prompts_file:
        raise UsageError("--pretrained, --tiny and --prompts-file are for --backbone sana")
    if a.teacher_steps < 0:
        raise UsageError("--teacher-steps must be >= 0 (0: the default of toy.TEACHERS)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device} but CUDA is not available; use --device cpu")
    for k, v in DEFAULTS[a.backbone].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    return a


def main(run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser,
         argv: list[str] | None) -> int:
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


def floats(s: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (an argparse type)."""
    return tuple(float(v) for v in s.split(","))


# ------------------------------------------------------------------------------------------ teacher
@dataclass
class Teacher:
    """A CFG teacher F(x_t/σ_d, t, cond, w) with its prompts, real data and image decoding."""

    F: TrigFlow
    data_shape: tuple[int, ...]
    prompt_names: list[str]
    cond: Callable[[torch.Tensor], Any]  # prompt indices [B] → the teacher's conditioning
    real: tuple[torch.Tensor, torch.Tensor] | None  # held-out (x0 [M, ...] TrigFlow units, prompts [M])
    to_images: Callable[[torch.Tensor], torch.Tensor] | None  # x0 (TrigFlow) → [B, C, H, W] in [−1, 1]
    sigma_d: float = SIGMA_D


def load_teacher(a: argparse.Namespace) -> Teacher:
    """toy: toy.train_teacher (cached under --cache-dir/teachers) + held-out split; sana: the pipeline."""
    if a.backbone == "sana":
        return _sana_teacher(a)
    net = toy.train_teacher(a.backbone, device=a.device, cache_root=f"{a.cache_dir}/teachers",
                            steps=a.teacher_steps or None, progress=sys.stderr.isatty())
    x, y, C = toy.load_data(a.backbone, "test")
    F = TrigFlow(net, uncond=torch.tensor([C], device=a.device))  # class C = the null class
    # TrigFlow data = σ_d × FM data
    real = (SIGMA_D * x.to(a.device), y.to(a.device))
    to_images = (lambda x0: x0 / SIGMA_D) if x.dim() == 4 else None
    return Teacher(F, tuple(x.shape[1:]), [str(c) for c in range(C)], lambda p: p, real, to_images)


def _sana_teacher(a: argparse.Namespace) -> Teacher:
    """Sana (Sec. 5): CFG against "", prompts encoded once; no real images (--tiny: under --cache-dir)."""
    import sana

    try:  # every loading failure of sana.py is a ValueError (SanaFolderError included)
        prompts = sana.read_prompts(a.prompts_file) if a.prompts_file else list(sana.TINY_PROMPTS)
        with sana.quiet_loading():
            folder = sana.tiny_folder(a.cache_dir) if a.tiny else a.pretrained  # tiny: built once, cached
            parts = sana.load_sana(folder, a.device, torch.float32)
    except ValueError as e:
        raise UsageError(str(e)) from e
    L = sana.TINY_MAX_SEQUENCE_LENGTH if a.tiny else sana.MAX_SEQUENCE_LENGTH
    tr, f = parts.transformer, parts.vae_scale_factor
    if a.resolution % (f * tr.config.patch_size):
        raise UsageError(f"--resolution {a.resolution}: must be a multiple of {f * tr.config.patch_size}")
    F = TrigFlow(sana.velocity(tr, parts.timestep_scale), uncond=sana.empty_prompt(parts, L))
    embeds, mask = sana.encode_prompts(parts, prompts, L)  # [P, L, D], [P, L]

    def to_images(x0: torch.Tensor) -> torch.Tensor:
        return 2 * sana.decode(parts, x0 / SIGMA_D) - 1

    shape = (tr.config.in_channels, a.resolution // f, a.resolution // f)
    return Teacher(F, shape, prompts, lambda p: (embeds[p], mask[p]), None, to_images)


def noise(n: int, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """z ~ N(0, σ_d² I), [n, *shape], drawn on the CPU from g (the same on every device)."""
    return (SIGMA_D * torch.randn((n, *shape), generator=g)).to(device)


def prompts(n: int, T: Teacher, device: str) -> torch.Tensor:
    """Prompt indices 0, 1, …, P − 1, 0, … of n samples."""
    return (torch.arange(n) % len(T.prompt_names)).to(device)


def data_x0(T: Teacher, n: int, g: torch.Generator, a: argparse.Namespace,
            N: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples x0 (TrigFlow units) with their prompts: held-out data, without replacement while it lasts;
    for image-free backbones the teacher's own samples (reference route of N steps, fresh noise)."""
    if T.real is not None:
        x, y = T.real
        i = torch.cat([torch.randperm(len(x), generator=g) for _ in range(-(-n // len(x)))])[:n]
        return x[i.to(x.device)], y[i.to(y.device)]
    p = prompts(n, T, a.device)
    w = torch.full((n,), a.w, device=a.device)
    z = noise(n, T.data_shape, g, a.device)
    return rollout(T.F, z, reference_route(N, a.shift), T.cond(p), w, T.sigma_d).x0, p


# ------------------------------------------------------------------------------------------- output
def write(a: argparse.Namespace, name: str, numbers: dict, fig: plt.Figure) -> None:
    """<out>/<name>.json (with the flags) and <out>/<name>.png."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {"args": {k: v for k, v in vars(a).items()}, **numbers}
    (out / f"{name}.json").write_text(json.dumps(numbers, indent=1))
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out / name}.json and .png")


def show(ax: plt.Axes, x: torch.Tensor, kind: str, scale: float = 1.0) -> None:
    """One image panel of a sample x [C, H, W]: kind "image" in [−1, 1]; kind "noise" (Eq. 8's noise, a
    latent) shown in [−scale, scale] with a diverging map, or its first 3 channels as RGB."""
    x = x.detach().float().cpu()
    if kind == "image":
        img = ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    elif x.shape[0] == 1:
        ax.imshow(x[0], cmap="RdBu_r", vmin=-scale, vmax=scale)
    else:
        ax.imshow(((x[:3] / scale).clamp(-1, 1) + 1).permute(1, 2, 0) / 2)
    ax.set_xticks([]), ax.set_yticks([])


def as_list(x: torch.Tensor) -> list:
    """A tensor as (nested) Python floats for JSON."""
    return x.detach().double().cpu().tolist()
