"""Closed forms for Gaussian data and small smooth networks, used as test oracles.

Data x0/σ_d ~ N(μ, S² I) in flow-matching units (TrigFlow x0 = σ_d·that). Every quantity of the
probability-flow ODE is then known exactly: the FM velocity, the TrigFlow F, the consistency
function f, the ODE flow map.
"""

import math

import torch
from torch import nn


class Gaussian:
    """Flow-matching data N(μ, S²) per dim: x_t/σ_d = cos t·x0 + sin t·ε, V = cos²t·S² + sin²t."""

    def __init__(self, mu: torch.Tensor, S: float, sigma_d: float = 0.5):
        self.mu, self.S, self.sigma_d = mu, S, sigma_d

    def _b(self, a, x):
        return a.reshape(a.shape + (1,) * (x.dim() - a.dim()))

    def v(self, x_fm, s, cond=None, guidance=None):
        """E[ε − x0 | x_s] for x_s = (1 − s)·x0 + s·ε."""
        s = self._b(s, x_fm)
        V = (1 - s) ** 2 * self.S**2 + s**2
        r = x_fm - (1 - s) * self.mu
        return s / V * r - (self.mu + (1 - s) * self.S**2 / V * r)

    def F(self, x, t, cond=None, w=None):
        """E[−sin t·x0 + cos t·ε | x], x = x_t/σ_d: the exact TrigFlow output (σ_d F = dx_t/dt)."""
        cos_t, sin_t = self._b(torch.cos(t), x), self._b(torch.sin(t), x)
        V = cos_t**2 * self.S**2 + sin_t**2
        r = x - cos_t * self.mu
        return -sin_t * (self.mu + cos_t * self.S**2 / V * r) + cos_t * (sin_t / V * r)

    def f(self, x_t, t):
        """The consistency function: the ODE's end point at t = 0 from (x_t, t), TrigFlow units."""
        cos_t, sin_t = self._b(torch.cos(t), x_t), self._b(torch.sin(t), x_t)
        std = torch.sqrt(cos_t**2 * self.S**2 + sin_t**2)  # of x_t/σ_d
        u = (x_t / self.sigma_d - cos_t * self.mu) / std
        return self.sigma_d * (self.mu + self.S * u)

    def flow(self, x_t, t, t_new):
        """The exact ODE map x_t ↦ x_{t_new} (quantiles are preserved)."""
        cos_t, sin_t = self._b(torch.cos(t), x_t), self._b(torch.sin(t), x_t)
        u = (x_t / self.sigma_d - cos_t * self.mu) / torch.sqrt(cos_t**2 * self.S**2 + sin_t**2)
        cos_new, sin_new = self._b(torch.cos(t_new), x_t), self._b(torch.sin(t_new), x_t)
        std_new = torch.sqrt(cos_new**2 * self.S**2 + sin_new**2)
        return self.sigma_d * (cos_new * self.mu + std_new * u)

    def student_F(self, x, t, delta=0.0, direction=None):
        """A student whose consistency function is f* + δ·sin t·direction (δ = 0: exact):
        F = (cos t·x_t − f)/(sin t·σ_d)."""
        x_t = self.sigma_d * x
        f = self.f(x_t, t)
        if direction is not None:
            f = f + delta * self._b(torch.sin(t), x_t) * direction
        return (self._b(torch.cos(t), x_t) * x_t - f) / (self._b(torch.sin(t), x_t) * self.sigma_d)


class SmoothMLP(nn.Module):
    """A small conditional velocity MLP v(x_FM, s, cond, guidance); smooth activations, float64."""

    def __init__(self, dim: int, hidden: int = 32, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(classes, hidden)
        self.t_in = nn.Linear(2, hidden)
        self.g_in = nn.Linear(1, hidden)
        self.net = nn.Sequential(
            nn.Linear(dim + hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x, s, cond, guidance=None):
        h = self.t_in(torch.stack([torch.sin(3 * s), torch.cos(2 * s)], 1)) + self.emb(cond)
        if guidance is not None:
            h = h + self.g_in(guidance[:, None])
        return self.net(torch.cat([x.flatten(1), h], 1)).reshape(x.shape)


class ConvAttn(nn.Module):
    """A small conv net with a plain softmax self-attention block, v(x_FM, s, cond, guidance):
    x_FM [B, C, H, W]."""

    def __init__(self, channels: int = 2, width: int = 8, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Embedding(classes, width)
        self.t_in = nn.Linear(2, width)
        self.g_in = nn.Linear(1, width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, s, cond, guidance=None):
        h = self.t_in(torch.stack([torch.sin(3 * s), torch.cos(2 * s)], 1)) + self.emb(cond)
        if guidance is not None:
            h = h + self.g_in(guidance[:, None])
        y = nn.functional.silu(self.inp(x) + h[:, :, None, None])
        q, k, v = self.qkv(y).flatten(2).chunk(3, dim=1)  # [B, width, HW] each
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        y = y + a.transpose(1, 2).reshape(y.shape) / math.sqrt(y.shape[1])
        return self.out(y)
