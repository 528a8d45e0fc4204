"""Few-step consistency sampling (App. E; sCM's multistep sampler, diffusers' SCMScheduler).

From x_{π/2} = z ~ N(0, σ_d² I): at each time, x̂0 = cos t·x − sin t·σ_d·F(x/σ_d, t), then re-noise
to the next time, x = cos t'·x̂0 + sin t'·z', z' ~ N(0, σ_d² I). t ∈ [0, π/2], t = 0 is data; times
descend to 0.
"""

import math
from collections.abc import Callable
from itertools import pairwise

import torch

from trigflow import HALF_PI, x0_from_F


def default_times(steps: int, t_mid: float) -> list[float]:
    """App. E schedules: 1 step [π/2, 0]; 2 steps [π/2, t_mid, 0] (TBCM validated t_mid = 1.0;
    diffusers' default 1.3); otherwise SCMScheduler's default linspace(π/2, 0, steps + 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [HALF_PI, 0.0]
    if steps == 2:
        return [HALF_PI, t_mid, 0.0]
    return [HALF_PI - i * HALF_PI / steps for i in range(steps)] + [0.0]


@torch.no_grad()
def consistency_sample(
    F: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    times: list[float],
    sigma_d: float,
    generator: torch.Generator | None = None,
):
    """App. E: consistency sampling of the student F(x_t/σ_d, t) (cond, guidance bound) on `times`.

    z [B, ...] is the initial noise at times[0] (normally π/2), already scaled by σ_d; times descend
    strictly to 0. Uses len(times) − 1 evaluations of F; `generator` draws the fresh noise between
    steps.
    """
    if times[-1] != 0 or any(a <= b for a, b in pairwise(times)) or times[0] > HALF_PI + 1e-9:
        raise ValueError(f"times must descend strictly from at most π/2 to 0, got {times}")
    x = z
    for t_i, t_j in pairwise(times):
        t = torch.full((z.shape[0],), t_i, dtype=z.dtype, device=z.device)
        x0 = x0_from_F(x, t, F(x / sigma_d, t), sigma_d)
        if t_j == 0:
            return x0
        dev = generator.device if generator is not None else z.device
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=dev)
        noise = sigma_d * eps.to(z.device)
        # re-noise: x_{t'} = cos t'·x̂0 + sin t'·z'
        x = math.cos(t_j) * x0 + math.sin(t_j) * noise
    return x
