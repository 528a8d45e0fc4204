"""Distances, the cached metric classifier and the evaluator (metrics.py)."""

import numpy as np
import pytest
import torch

from metrics import Evaluator, frechet_distance, sliced_wasserstein, train_classifier
from toy import load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_moments(n: int, mu: np.ndarray, sd: np.ndarray, seed: int) -> np.ndarray:
    """n points whose sample mean is exactly mu and sample covariance exactly diag(sd²)."""
    a = np.random.default_rng(seed).standard_normal((n, len(mu)))
    a -= a.mean(0)
    a = a @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T  # whitened: cov = I
    return a * sd + mu


def test_frechet_distance_identical_sets_and_closed_form():
    a = _with_moments(400, np.zeros(6), np.ones(6), 0)
    assert abs(frechet_distance(a, a)) < 1e-8
    mu_a, mu_b = np.array([0.0, 1, 2, 0, 0, 0]), np.array([1.0, 1, 0, 0, 0, 3])
    sd_a, sd_b = np.array([1.0, 2, 1, 1, 0.5, 1]), np.array([2.0, 2, 1, 3, 0.5, 1])
    a, b = _with_moments(400, mu_a, sd_a, 1), _with_moments(300, mu_b, sd_b, 2)
    # diagonal covariances: ‖μ_a − μ_b‖² + Σ_i (σ_a,i − σ_b,i)²
    expected = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.tensor(b), torch.tensor(a)) == pytest.approx(expected, rel=1e-6)


def test_sliced_wasserstein_of_a_shift_and_of_equal_laws():
    """Shift δ in 2-D: W1(θ·a, θ·(a + δ)) = |θ·δ|, so SW1 = E_θ |cos ∠(θ, δ)|·|δ| = (2/π)·|δ|."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    delta = torch.tensor([0.6, -0.8])
    sw = sliced_wasserstein(a, a + delta, n_proj=4000, generator=torch.Generator().manual_seed(1))
    assert sw == pytest.approx(2 / np.pi, rel=0.02)
    assert sliced_wasserstein(a, a, generator=g) == pytest.approx(0, abs=1e-12)
    # unequal sizes go through quantile functions: a repeated 3× is the same empirical law
    assert sliced_wasserstein(a, a.repeat(3, 1), generator=g) < 2e-3
    b = torch.randn(6000, 2, generator=g)  # same law, other draws
    assert sliced_wasserstein(a, b, generator=g) < 0.25 * sliced_wasserstein(a, b + delta / 2)


def test_toy2d_evaluator_floor_noise_shift_and_alignment():
    ev = Evaluator("toy2d")
    x, y, _ = load_data("toy2d", "test")
    noise = ev(torch.randn(5000, 2), y)
    assert ev.floor(5000)["distance"] < 0.1 * noise["distance"]
    assert ev(x[:2000] + 0.3, y[:2000])["distance"] > 3 * ev.floor(2000)["distance"]
    assert ev(x, y)["alignment"] > 0.99 and noise["alignment"] < 0.3
    assert ev.floor(1000) == Evaluator("toy2d").floor(1000)  # deterministic


@pytest.fixture(scope="module")
def digits_eval(tmp_path_factory):
    return Evaluator("digits", cache_root=str(tmp_path_factory.mktemp("classifiers")))


def test_digits_classifier_is_cached(digits_eval, tmp_path_factory):
    root = digits_eval.classifier  # trained by the fixture; loading must give the same weights
    cache = next(p for p in tmp_path_factory.getbasetemp().glob("classifiers*"))
    again = train_classifier("digits", cache_root=str(cache))
    for k, v in root.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_digits_evaluator_floor_noise_shift_and_alignment(digits_eval):
    x, y, _ = load_data("digits", "test")
    x_train, y_train, _ = load_data("digits", "train")
    floor = digits_eval.floor(297)["distance"]
    noise = digits_eval(torch.rand(297, 1, 8, 8) * 2 - 1, y)
    assert floor < 0.1 * noise["distance"]
    real = digits_eval(x_train[:297], y_train[:297])
    shifted = digits_eval(x_train[:297] + 0.5, y_train[:297])
    assert shifted["distance"] > 2 * real["distance"]
    assert digits_eval(x, y)["alignment"] >= 0.9 and noise["alignment"] < 0.3
    assert digits_eval(x, y)["distance"] == pytest.approx(0, abs=1e-6)  # the held-out set itself


def test_floor_is_a_fixed_training_subset_against_held_out(digits_eval):
    """floor(n): n training points (a seeded subset, the same on every call) scored like samples."""
    x_train, y_train, _ = load_data("digits", "train")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:500]
    assert (
        digits_eval.floor(500)["distance"] == digits_eval(x_train[perm], y_train[perm])["distance"]
    )
    assert digits_eval.floor(500) == digits_eval.floor(500)
