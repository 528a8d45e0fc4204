"""TrigFlow conventions and the flow-matching → TrigFlow wrapper (Tab. 1, Eqs. 5–8).

t ∈ [0, π/2], t = 0 is data: x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d² I), σ_d = 0.5. A network sees
x_t/σ_d and returns F with σ_d·F = dx_t/dt. The flow-matching time s = sin t/(sin t + cos t) stays
continuous in [0, 1].
"""

import math
from collections.abc import Callable
from typing import Any

import torch

SIGMA_D = 0.5  # sCM / Sana-Sprint σ_d; the std of data latents in TrigFlow units
HALF_PI = math.pi / 2

# A flow-matching velocity model: v(x_FM, s, cond, guidance) → v, where `guidance` is None for a
# teacher and the student's 0.1·w guidance-embedding input otherwise.
VelocityModel = Callable[..., torch.Tensor]


def bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor [B] so that it broadcasts against x [B, ...]."""
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim()))


def diffuse(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tab. 1 (TrigFlow): x_t = cos t·x0 + sin t·z."""
    return bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), z) * z


def fm_time(t: torch.Tensor) -> torch.Tensor:
    """Eq. (5): TrigFlow time t → flow-matching time s = sin t/(sin t + cos t)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trig_time(s: torch.Tensor) -> torch.Tensor:
    """Inverse of Eq. (5): s → t = arctan(s/(1 − s)), with s = 1 ↦ π/2 exactly."""
    return torch.atan2(s, 1 - s)


def fm_scale(s: torch.Tensor) -> torch.Tensor:
    """Eqs. (6)–(7): sqrt(s² + (1 − s)²), which equals 1/(sin t + cos t)."""
    return torch.sqrt(s**2 + (1 - s) ** 2)


def fm_input(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. (6): the network input x = x_t/σ_d → x_FM = x·sqrt(s² + (1 − s)²)."""
    return x * bcast(fm_scale(s), x)


def trig_output(x_fm: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. (7): flow-matching velocity v at (x_FM, s) → TrigFlow output F."""
    s_ = bcast(s, x_fm)
    # F = [(1 − 2s)·x_FM + (1 − 2s + 2s²)·v] / sqrt(s² + (1 − s)²)
    return ((1 - 2 * s_) * x_fm + (1 - 2 * s_ + 2 * s_**2) * v) / bcast(fm_scale(s), x_fm)


def x0_from_F(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """sCM consistency parameterisation: x̂0 = f(x_t, t) = cos t·x_t − sin t·σ_d·F."""
    return bcast(torch.cos(t), x_t) * x_t - bcast(torch.sin(t), x_t) * sigma_d * F


def equivalent_noise(x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (8): Noise_eqv = (x_t − cos t·x̂0)/sin t (same units as z; undefined at t = 0)."""
    return (x_t - bcast(torch.cos(t), x_t) * x0_hat) / bcast(torch.sin(t), x_t)


def _double(a: Any, b: Any) -> Any:
    """Concatenate two conditionings (tensor or tuple of tensors) along the batch."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return type(a)(_double(u, v) for u, v in zip(a, b, strict=True))


def _expand(u: Any, n: int) -> Any:
    """Repeat a batch-1 conditioning (tensor or tuple of tensors) to batch n."""
    if isinstance(u, torch.Tensor):
        return u.expand(n, *u.shape[1:])
    return type(u)(_expand(v, n) for v in u)


class TrigFlow:
    """Eqs. (5)–(7): a flow-matching velocity model seen as a TrigFlow model F(x_t/σ_d, t, cond, w).

    Teacher (`uncond` given): classifier-free guidance v = v_u + w·(v_c − v_u) on one doubled batch.
    Since Eq. 7 is affine in v with weights summing to one over (v_u, v_c), this is the same as
    guidance on F. Student (`guidance_scale` given): one pass, the model receives guidance_scale·w
    (Sana-Sprint: 0.1·w). Otherwise: a plain conditional pass, w ignored.
    """

    def __init__(self, v: VelocityModel, uncond: Any = None, guidance_scale: float | None = None):
        if uncond is not None and guidance_scale is not None:
            raise ValueError(
                "a TrigFlow model is either a CFG teacher (uncond) or a guided student"
            )
        self.v, self.uncond, self.guidance_scale = v, uncond, guidance_scale

    def velocities(
        self, x: torch.Tensor, t: torch.Tensor, cond: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG teacher's unconditional and conditional flow-matching velocities (v_u, v_c) at
        x = x_t/σ_d, on one doubled batch (what an offline bank stores, so that the CFG scale can be
        chosen later)."""
        s = fm_time(t)
        x_fm, n = fm_input(x, s), x.shape[0]
        v_u, v_c = self.v(
            torch.cat([x_fm, x_fm]), torch.cat([s, s]), _double(_expand(self.uncond, n), cond), None
        ).chunk(2)
        return v_u, v_c

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, w: torch.Tensor | None = None):
        if self.uncond is not None and w is not None:
            return guided(x, t, *self.velocities(x, t, cond), w)
        s = fm_time(t)
        x_fm = fm_input(x, s)
        if self.guidance_scale is not None:
            v = self.v(x_fm, s, cond, None if w is None else self.guidance_scale * w)
        else:
            v = self.v(x_fm, s, cond, None)
        return trig_output(x_fm, v, s)


def guided(x: torch.Tensor, t: torch.Tensor, v_u: torch.Tensor, v_c: torch.Tensor, w: torch.Tensor):
    """Eq. (7) after CFG in velocity space, v = v_u + w·(v_c − v_u): the teacher's F at x = x_t/σ_d
    from its two velocities (bit for bit what TrigFlow.__call__ returns, so pairs rebuilt from a
    bank match online ones)."""
    s = fm_time(t)
    v = v_u + bcast(w.to(v_u.dtype), v_u) * (v_c - v_u)
    return trig_output(fm_input(x, s), v, s)
