"""Toy teachers (paper Sec. 5 at small scale): flow-matching pre-training, the student's init.

Teachers are trained like Sana (x_s = (1 − s)·x0 + s·ε, v = ε − x0, s ∈ [0, 1], FM units; label C
is the null class for CFG); their EMA weights are cached in <cache_root>/<backbone>-<config_hash>/
(model.safetensors + config.json, checkpoint.py). The student starts as the teacher (Sana-Sprint).
"""

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn
from tqdm import tqdm

from checkpoint import config_hash, save_module, seeded_or_cached
from runtime import ema_update
from toy import MLP, UNet, load_data, zero_guidance


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A flow-matching teacher: architecture and training (its JSON hash is the cache key)."""

    backbone: str
    data_shape: tuple[int, ...]  # one sample, FM units
    num_classes: int  # labels 0..C−1; C is the null class
    arch: str  # "mlp" or "unet"
    width: int  # MLP hidden width / U-Net base channels
    depth: int = 3  # MLP blocks (unused by the U-Net)
    channel_mult: tuple[int, ...] = (1, 2)  # U-Net levels (unused by the MLP)
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3  # AdamW, constant; the usual rate for small diffusion nets
    weight_decay: float = 0.0  # Sana trains with AdamW; decay is not needed at this scale
    ema_decay: float = 0.999  # the teacher is the EMA of the weights (standard for diffusion)
    label_dropout: float = 0.1  # CFG training: 10% of labels → null class (Sana: empty prompt)
    time_sampling: str = "logit_normal"  # SD3 / Sana: s = σ(N(0, 1)); or "uniform"
    seed: int = 0


# Measured on 2 idle CPU cores: toy2d 12 s, digits 135 s. digits uses the MLP: a U-Net (width 32)
# reached a slightly lower FD in the same time but costs ~6× more per JVP during distillation.
TEACHERS = {
    "toy2d": TeacherConfig("toy2d", (2,), 8, "mlp", width=128, depth=3, steps=1500),
    "digits": TeacherConfig("digits", (1, 8, 8), 10, "mlp", width=256, depth=4, steps=6000),
    "cifar10": TeacherConfig(
        "cifar10",
        (3, 32, 32),
        10,
        "unet",
        width=32,
        channel_mult=(1, 2, 2),
        steps=1000,
        batch_size=32,
        lr=2e-4,
    ),  # runs; not trained to quality
}


def make_net(cfg: TeacherConfig) -> nn.Module:
    """A freshly initialised velocity net v(x_FM, s, cond, guidance) for a teacher config."""
    if cfg.arch == "mlp":
        return MLP(cfg.data_shape, cfg.num_classes, cfg.width, cfg.depth)
    if cfg.arch == "unet":
        return UNet(cfg.data_shape, cfg.num_classes, cfg.width, cfg.channel_mult)
    raise ValueError(f"unknown arch {cfg.arch!r}; choose 'mlp' or 'unet'")


def sample_s(n: int, how: str, g: torch.Generator) -> torch.Tensor:
    """Flow-matching training times s ∈ (0, 1): uniform, or logit-normal σ(N(0, 1)) (SD3, Sana)."""
    if how == "uniform":
        return torch.rand(n, generator=g)
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=g))
    raise ValueError(f"unknown time_sampling {how!r}")


def fm_loss(
    net: nn.Module, x0: torch.Tensor, y: torch.Tensor, cfg: TeacherConfig, g: torch.Generator
) -> torch.Tensor:
    """Flow matching (Sana): mean ‖v(x_s, s, cond) − (ε − x0)‖², with some labels → null class."""
    eps = torch.randn(x0.shape, generator=g).to(x0)
    s = sample_s(len(x0), cfg.time_sampling, g).to(x0)
    drop = torch.rand(len(y), generator=g).to(y.device) < cfg.label_dropout
    cond = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
    s_ = s.reshape(-1, *[1] * (x0.dim() - 1))
    # x_s = (1 − s)·x0 + s·ε, target v = ε − x0
    return nnf.mse_loss(net((1 - s_) * x0 + s_ * eps, s, cond), eps - x0)


@torch.enable_grad()  # trains even when called under torch.no_grad()
def train_teacher(
    backbone: str,
    data_dir: str | None = None,
    device: str = "cpu",
    cache_root: str = "runs/teachers",
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    cfg: TeacherConfig | None = None,
) -> nn.Module:
    """Flow-matching pre-training as in Sana; returns the EMA net, cached under
    cache_root/<backbone>-<hash>/ and loaded from there on later calls. Default cfg: TEACHERS."""
    cfg = cfg or TEACHERS[backbone]
    cfg = dataclasses.replace(cfg, seed=seed, steps=steps or cfg.steps)
    folder = Path(cache_root) / f"{backbone}-{config_hash(cfg)}"
    net, cached = seeded_or_cached(make_net, cfg, folder, device)
    if cached:
        return net

    x, y, _ = load_data(backbone, "train", data_dir)
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bar = tqdm(range(cfg.steps), desc=f"teacher {backbone}", disable=not progress)
    for k in bar:
        i = torch.randint(len(x), (cfg.batch_size,), generator=g).to(device)
        loss = fm_loss(net, x[i], y[i], cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # EMA with warm-up: β_k = min(ema_decay, (1 + k)/(10 + k))
        ema_update(ema, net, cfg.ema_decay, k)
        if k % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    save_module(ema, cfg, folder)
    return ema.eval()


def student_from_teacher(teacher: nn.Module) -> nn.Module:
    """Sana-Sprint init: a trainable copy of the teacher whose guidance embedding outputs zero."""
    student = copy.deepcopy(teacher)
    zero_guidance(student)
    return student.train().requires_grad_(True)
