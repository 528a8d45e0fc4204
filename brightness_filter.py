"""Brightness filter (Sec. 4.3, App. D): drop trajectories whose end point is near a black latent.

Distance = per-sample MSE between the end point x0/σ_d at t = 0 (flow-matching units, what a VAE
latent is) and the latent of a black image. Hard mode keeps mse ≥ threshold (the paper's text);
soft mode (official code) drops a sample with mse < threshold with probability 1 − mse/threshold.
"""

import torch


def black_distance(x0: torch.Tensor, black: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """App. D: per-sample MSE between x0/σ_d [B, ...] and the black latent (broadcast: [1, ...])."""
    return ((x0 / sigma_d - black) ** 2).flatten(1).mean(1)


def mask_from_distance(
    mse: torch.Tensor, *, threshold: float, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Sec. 4.3 from the distances `black_distance` [B] (what a bank stores per trajectory).

    soft: keep with probability min(1, mse/threshold) (official code, threshold 1.0: drop with
    probability 1 − mse); hard: keep iff mse ≥ threshold; off: keep all. Always draws B uniforms, so
    the generator's stream advances the same way whatever fires.
    """
    dev = generator.device if generator is not None else mse.device
    u = torch.rand(mse.shape, generator=generator, dtype=mse.dtype, device=dev).to(mse.device)
    if mode == "off":
        return torch.ones_like(mse, dtype=torch.bool)
    if mode == "hard":
        return mse >= threshold
    if mode == "soft":
        # drop with probability 1 − mse/threshold when mse < threshold
        return (mse >= threshold) | (u < mse / threshold)
    raise ValueError(f"unknown brightness filter mode {mode!r}; choose soft, hard or off")
