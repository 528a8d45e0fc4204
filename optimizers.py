"""The optimiser of the student and the logvar head (Alg. 1 line 17): AdamW, or CAME as the official
configs train (Sana-Sprint's and TBCM's `CAMEWrapper`), built from the run's `Config`.

CAME (Luo et al., 2023, "Confidence-guided Adaptive Memory Efficient Optimization") keeps one full
moment m and, for a matrix, factored second moments (a row and a column vector, as Adafactor) of the
squared gradient and of the update's instability: about 4 bytes per parameter against AdamW's 8.
"""

import math

import torch

from config import Config

# From the configs of TBCM (600M_1024px_tbcm.yaml) and Sana-Sprint (SanaSprint_600M_1024px_*.yaml):
CAME_BETAS = (0.9, 0.999, 0.9999)  # CAMEWrapper betas: m, the squared gradient, the instability
CAME_EPS = (1e-30, 1e-16)  # CAMEWrapper eps: added to the squared gradient and to the instability
CAME_CLIP = 1.0  # CAMEWrapper's clip_threshold (its default): the update's RMS is clipped to it


def build(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """--optimizer: AdamW (torch, weight decay 0) or CAME (`Came`, the official settings), over
    `groups` (lora.param_groups: per-group learning rates) at --lr."""
    if cfg.optimizer == "came":
        return Came(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


def factored(shape: torch.Size) -> bool:
    """Whether CAME keeps a parameter's second moments as a row and a column: a matrix (a Linear's
    weight) or a 1×1 convolution's kernel, as CAMEWrapper; anything else keeps them whole."""
    return len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def state_numel(shape: torch.Size, optimizer: str) -> int:
    """Floats of optimiser state a parameter of `shape` holds: AdamW two full moments; CAME the
    full m plus, factored, a row and a column for each of V and S (else V whole)."""
    n = math.prod(shape)
    if optimizer == "adamw":
        return 2 * n
    return n + (2 * (shape[0] + shape[1]) if factored(shape) else n)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm() / x.numel() ** 0.5


def _ratio(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1/√V̂ for the factored V̂ = row·colᵀ/mean(row) (Adafactor's rank-1 estimate), [rows, cols]."""
    return (row / row.mean()).rsqrt()[:, None] * col.rsqrt()[None, :]


class Came(torch.optim.Optimizer):
    """CAME as CAMEWrapper steps it, per parameter θ with gradient G (no bias correction):

        U = G² + ε₁;   V ← β₂V + (1 − β₂)U   (factored: its row and column means)
        u = G/√V;      u ← u / max(1, RMS(u)/d)
        m ← β₁m + (1 − β₁)u
        R = (u − m)² + ε₂;   S ← β₃S + (1 − β₃)R   (factored likewise)
        θ ← θ − lr·wd·θ − lr·m/√S   (m itself where S is not factored)

    State per parameter: m, and the row and column vectors of V and S (factored), or V whole.
    """

    def __init__(self, params, lr: float, betas=CAME_BETAS, eps=CAME_EPS, clip=CAME_CLIP, wd=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, wd=wd))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                G, st, fact = p.grad, self.state[p], factored(p.shape)
                G = G.float() if G.dtype in (torch.float16, torch.bfloat16) else G  # fp32 moments
                G2 = G.reshape(p.shape[0], p.shape[1]) if fact else G
                if not st:
                    st["exp_avg"] = torch.zeros_like(G)
                    if fact:
                        rows, cols = G2.shape
                        for k, n in (("sq_row", rows), ("sq_col", cols)):
                            st[k], st[k.replace("sq", "res")] = G.new_zeros(n), G.new_zeros(n)
                    else:
                        st["exp_avg_sq"] = torch.zeros_like(G)
                U = G2**2 + eps1
                if fact:
                    st["sq_row"].lerp_(U.mean(1), 1 - b2)
                    st["sq_col"].lerp_(U.mean(0), 1 - b2)
                    u = (_ratio(st["sq_row"], st["sq_col"]) * G2).reshape(G.shape)
                else:
                    u = st["exp_avg_sq"].lerp_(U, 1 - b2).rsqrt() * G
                u /= (_rms(u) / group["clip"]).clamp(min=1.0)
                m = st["exp_avg"].lerp_(u, 1 - b1)
                if fact:
                    R = ((u - m) ** 2 + eps2).reshape(G2.shape)
                    st["res_row"].lerp_(R.mean(1), 1 - b3)
                    st["res_col"].lerp_(R.mean(0), 1 - b3)
                    m = _ratio(st["res_row"], st["res_col"]) * m.reshape(G2.shape)
                if group["wd"]:
                    p.mul_(1 - group["lr"] * group["wd"])
                p.sub_(group["lr"] * m.reshape(p.shape).to(p.dtype))
