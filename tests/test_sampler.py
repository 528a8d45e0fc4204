"""App. E: few-step consistency sampling with the exact Gaussian consistency function."""

import math

import pytest
import torch

from oracles import Gaussian
from sampler import consistency_sample, default_times
from trigflow import HALF_PI

pytestmark = pytest.mark.usefixtures("float64")
SIGMA_D = 0.5


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_consistency_function_samples_the_data(steps):
    """1, 2, 4 steps of the exact student give mean σ_d·μ and std σ_d·S within sampling error (20k
    samples)."""
    gauss = Gaussian(torch.tensor([1.5, -0.7]), S=0.4)
    n = 20_000
    g = torch.Generator().manual_seed(steps)
    z = SIGMA_D * torch.randn(n, 2, generator=g)
    times = default_times(steps, 1.0)
    x = consistency_sample(gauss.student_F, z, times, SIGMA_D, g)
    se_mean, se_std = SIGMA_D * 0.4 / math.sqrt(n), SIGMA_D * 0.4 / math.sqrt(2 * n)
    assert (x.mean(0) - SIGMA_D * gauss.mu).abs().max() < 5 * se_mean
    assert (x.std(0) - SIGMA_D * 0.4).abs().max() < 5 * se_std
    assert abs(float(torch.corrcoef(x.T)[0, 1])) < 5 / math.sqrt(n)


def test_schedules_and_validation():
    """App. E schedules: 1 step [π/2, 0], 2 steps through t_mid, 4 steps linspace; bad lists are
    refused."""
    assert default_times(1, 1.0) == [HALF_PI, 0.0]
    assert default_times(2, t_mid=1.3) == [HALF_PI, 1.3, 0.0]
    four = default_times(4, 1.0)
    assert len(four) == 5 and four[2] == pytest.approx(HALF_PI / 2)
    F = Gaussian(torch.zeros(1), 1.0).student_F
    for bad in ([HALF_PI, 1.0], [HALF_PI, 1.0, 1.0, 0.0], [2.0, 0.0]):
        with pytest.raises(ValueError):
            consistency_sample(F, torch.zeros(2, 1), bad, SIGMA_D)


def test_one_step_is_one_evaluation_of_the_student():
    """App. E: N steps cost N student evaluations."""
    calls = []
    gauss = Gaussian(torch.zeros(2), 1.0)

    def F(x, t):
        calls.append(float(t[0]))
        return gauss.student_F(x, t)

    consistency_sample(F, torch.randn(3, 2), default_times(4, 1.0), SIGMA_D, torch.Generator())
    assert calls == pytest.approx(default_times(4, 1.0)[:-1])
