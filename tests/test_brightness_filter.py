"""Sec. 4.3 / App. D: the brightness filter on the trajectory end point."""

import torch

from brightness_filter import black_distance, mask_from_distance

SIGMA_D = 0.5


def brightness_mask(x0, black, sigma_d, threshold, mode, generator=None):
    """Sec. 4.3 on end points: the distance to black, then the keep-mask."""
    mse = black_distance(x0, black, sigma_d)
    return mask_from_distance(mse, threshold=threshold, mode=mode, generator=generator)


def test_black_distance_hand_computed():
    """MSE of x0/σ_d against the black latent: x0 = σ_d·(black + 1) → 1; x0 = σ_d·black → 0;
    x0 = σ_d·[−1, 1] → 2."""
    black = -torch.ones(1, 2)
    x0 = SIGMA_D * torch.tensor([[0.0, 0.0], [-1.0, -1.0], [-1.0, 1.0]])
    assert torch.allclose(black_distance(x0, black, SIGMA_D), torch.tensor([1.0, 0.0, 2.0]))


def test_hard_mode_thresholds():
    """Paper text: keep iff mse ≥ threshold."""
    black = torch.zeros(1, 1)
    x0 = SIGMA_D * torch.tensor([[0.5], [1.0], [2.0]])  # mse 0.25, 1, 4
    keep = brightness_mask(x0, black, SIGMA_D, 1.0, "hard")
    assert torch.equal(keep, torch.tensor([False, True, True]))
    assert brightness_mask(x0, black, SIGMA_D, 1.0, "off").all()


def test_soft_mode_drop_probability_and_determinism():
    """Official code: below the threshold, drop with probability 1 − mse/threshold; reproducible
    from a generator."""
    black = torch.zeros(1, 1)
    x0 = SIGMA_D * torch.tensor([[0.5]]).expand(40_000, 1)  # mse 0.25: keep with prob. 0.25/0.5
    keep = brightness_mask(x0, black, SIGMA_D, 0.5, "soft", torch.Generator().manual_seed(0))
    assert abs(float(keep.double().mean()) - 0.5) < 0.015
    again = brightness_mask(x0, black, SIGMA_D, 0.5, "soft", torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    far = SIGMA_D * torch.tensor([[3.0]]).expand(100, 1)
    assert brightness_mask(far, black, SIGMA_D, 0.5, "soft", torch.Generator().manual_seed(1)).all()
    exact_black = torch.zeros(100, 1)
    assert not brightness_mask(exact_black, black, SIGMA_D, 0.5, "soft", torch.Generator()).any()
