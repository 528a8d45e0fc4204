"""Toy backbones (paper Sec. 5 at small scale): data and small class-conditional velocity nets.

Data are in flow-matching units (TrigFlow data is σ_d·x0, σ_d = 0.5, see trigflow.py). Every net is
v(x_FM, s, cond, guidance) with s ∈ [0, 1] continuous; label C is the null class for CFG. The
flow-matching teachers built from these nets are trained in toy_teacher.py.
"""

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

BACKBONES = ("toy2d", "digits", "cifar10")
CIFAR_HELP = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass --data-dir path/to/cifar-10-batches-py"
)
RING_RADIUS, RING_STD = 1.4, 0.1  # toy2d: per-dim variance r²/2 + std² ≈ 0.99, i.e. unit scale


class ToyDataError(ValueError):
    """Toy data missing or malformed; the message says how to fix it."""


# ------------------------------------------------------------------------------------------ data
def ring_centers(num_classes: int = 8) -> torch.Tensor:
    """toy2d mixture means: num_classes points on a circle of radius RING_RADIUS, [C, 2]."""
    a = 2 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
    return (RING_RADIUS * torch.stack([torch.cos(a), torch.sin(a)], 1)).float()


def _toy2d(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 8)[torch.randperm(n, generator=g)]  # balanced classes, shuffled
    return ring_centers()[y] + RING_STD * torch.randn(n, 2, generator=g), y


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # a fixed stratified 1500/297 split (seed 0); pixels 0..16 → x/8 − 1 ∈ [−1, 1], background −1
    i_train, i_test = train_test_split(
        range(len(d.target)), test_size=297, stratify=d.target, random_state=0
    )
    i = i_train if split == "train" else i_test
    x = torch.tensor(d.images[i], dtype=torch.float32)[:, None] / 8 - 1  # [N, 1, 8, 8]
    return x, torch.tensor(d.target[i], dtype=torch.long)


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise ToyDataError(f"CIFAR-10 file {path} is missing; {CIFAR_HELP}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = torch.as_tensor(d[b"data"]).reshape(-1, 3, 32, 32)  # uint8 [n, 3072], channel-major
        y = torch.as_tensor(d[b"labels"], dtype=torch.long)
        if data.dtype != torch.uint8 or len(y) != len(data) or not ((0 <= y) & (y <= 9)).all():
            raise ValueError("wrong dtype, length or label range")
    except Exception as e:  # any unreadable or wrongly shaped file gets the same readable message
        raise ToyDataError(
            f"CIFAR-10 file {path} is not a python-version CIFAR-10 batch (a dict "
            f"with b'data' uint8 [n, 3072] and b'labels'); {CIFAR_HELP}"
        ) from e
    return data.float() / 127.5 - 1, y


def load_data(
    backbone: str, split: str, data_dir: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Toy data (x, y, num_classes); split "train" or "test" (held out). toy2d: 20k / 5k points
    (seeds 0 / 1); digits: scikit-learn's 8×8 digits, 1500 / 297; cifar10: data_batch_1..5 /
    test_batch from data_dir."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if backbone == "toy2d":
        return *(_toy2d(20000, 0) if split == "train" else _toy2d(5000, 1)), 8
    if backbone == "digits":
        return *_digits(split), 10
    if backbone == "cifar10":
        if data_dir is None or not Path(data_dir).is_dir():
            raise ToyDataError(f"CIFAR-10 folder {data_dir} not found; {CIFAR_HELP}")
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        xs, ys = zip(*(_cifar_batch(Path(data_dir) / n) for n in names), strict=True)
        return torch.cat(xs), torch.cat(ys), 10
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")


# -------------------------------------------------------------------------------------- networks
class Fourier(nn.Module):
    """Sinusoidal features of a scalar in ~[0, 1]; frequencies π…32π keep d/ds moderate."""

    def __init__(self, dim: int, max_freq: float = 32.0):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.logspace(0, math.log2(max_freq), dim // 2, 2))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        a = s[:, None].to(self.freqs.dtype) * self.freqs  # [B, dim/2]
        return torch.cat([torch.sin(a), torch.cos(a)], 1)


def _embed_mlp(dim: int, n_fourier: int = 64) -> nn.Sequential:
    return nn.Sequential(
        Fourier(n_fourier), nn.Linear(n_fourier, dim), nn.SiLU(), nn.Linear(dim, dim)
    )


class CondEmbed(nn.Module):
    """c = MLP(Fourier(s)) + E[cond] (+ MLP(Fourier(g)) with a zero-initialised output layer)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.time, self.guidance = _embed_mlp(dim), _embed_mlp(dim)
        self.label = nn.Embedding(num_classes + 1, dim)  # index num_classes: the null class (CFG)
        zero_guidance(self)

    def forward(self, s: torch.Tensor, cond: torch.Tensor, guidance: torch.Tensor | None):
        c = self.time(s) + self.label(cond)
        # Sana-Sprint: the guidance embedding of 0.1·w is summed into the time embedding
        return c if guidance is None else c + self.guidance(guidance)


def zero_guidance(net: nn.Module) -> None:
    """Zero every guidance embedding's output layer: the net then ignores guidance (Sana-Sprint)."""
    for m in net.modules():
        if isinstance(m, CondEmbed):
            nn.init.zeros_(m.guidance[-1].weight), nn.init.zeros_(m.guidance[-1].bias)


class MLPBlock(nn.Module):
    """Residual block with adaLN (DiT): h + W2·SiLU(W1·(LN(h)·(1 + a) + b)), (a, b) = Linear(c)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)
        )

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a, b = self.mod(c).chunk(2, 1)
        return h + self.mlp(self.norm(h) * (1 + a) + b)


class MLP(nn.Module):
    """Velocity MLP on flattened data (toy2d, digits); (s, cond, guidance) enter by adaLN."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, width: int, depth: int):
        super().__init__()
        self.embed = CondEmbed(num_classes, width)
        dim = math.prod(data_shape)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.embed(s, cond, guidance)  # [B, width]
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).reshape(x.shape)


class ConvBlock(nn.Module):
    """Residual block: GroupNorm–SiLU–conv, scale/shift from c, GroupNorm–SiLU–conv, 1×1 skip."""

    def __init__(self, c_in: int, c_out: int, dim_c: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.mod = nn.Linear(dim_c, 2 * c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a, b = self.mod(c)[:, :, None, None].chunk(2, 1)  # [B, c_out, 1, 1] each
        u = self.conv1(nnf.silu(self.norm1(h)))
        return self.skip(h) + self.conv2(nnf.silu(self.norm2(u) * (1 + a) + b))


class UNet(nn.Module):
    """Small velocity U-Net (cifar10): a ConvBlock per level, 2× pool / upsampling."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_classes: int,
        width: int,
        channel_mult: tuple[int, ...],
    ):
        super().__init__()
        chans = [width * m for m in channel_mult]
        self.embed = CondEmbed(num_classes, 4 * width)
        self.inp = nn.Conv2d(data_shape[0], width, 3, padding=1)
        self.down = nn.ModuleList(
            ConvBlock(a, b, 4 * width) for a, b in zip([width] + chans[:-1], chans, strict=True)
        )
        self.mid = ConvBlock(chans[-1], chans[-1], 4 * width)
        # up level i: [previous output, skip i] → skip i's channels
        prev = chans[-1:] + chans[:0:-1]
        self.up = nn.ModuleList(
            ConvBlock(a + b, b, 4 * width) for a, b in zip(prev, chans[::-1], strict=True)
        )
        self.out = nn.Sequential(
            nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, data_shape[0], 3, padding=1)
        )

    def forward(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        cond: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.embed(s, cond, guidance)
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(nnf.avg_pool2d(h, 2) if i > 0 else h, c)
            skips.append(h)
        h = self.mid(h, c)
        for i, block in enumerate(self.up):
            h = nnf.interpolate(h, scale_factor=2, mode="nearest") if i > 0 else h
            h = block(torch.cat([h, skips.pop()], 1), c)
        return self.out(h)
