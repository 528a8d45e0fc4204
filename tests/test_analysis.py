"""analysis/: Eq. (8) against closed forms, the k-NN two-sample test, each script's JSON (tiny)."""

import json
import math

import numpy as np
import pytest
import torch

import config
from analysis import equivalent_noise, predicted_x0, sampling_schemes, tsne
from analysis.common import backward_noise, cosine, forward_noise
from oracles import Gaussian
from trajectory import reference_route, rollout

SIGMA_D = 0.5
TIMES = torch.tensor([math.pi / 2, 1.2, 0.7, 0.3, 0.05], dtype=torch.float64)  # descending, > 0


def x0_oracle(x0):
    """A teacher whose x̂0 = cos t·x_t − sin t·σ_d·F is exactly x0:
    F = (cos t·x_t − x0)/(sin t·σ_d)."""

    def F(x, t, cond=None, w=None):
        cos_t, sin_t = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return (cos_t * SIGMA_D * x - x0) / (sin_t * SIGMA_D)

    return F


def test_eq8_true_x0_gives_z(float64):
    """Eq. 8 with the true x0 along forward diffusion returns z exactly; along an ODE whose x̂0
    stays constant (the Eq. 9 step is exact then) it returns z_T at every step."""
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(16, 3, generator=g), SIGMA_D * torch.randn(16, 3, generator=g)
    fwd = forward_noise(x0_oracle(x0), x0, z, TIMES, None, None, SIGMA_D)
    assert torch.allclose(fwd, z.expand(len(TIMES), -1, -1), atol=1e-12, rtol=0)
    bwd = backward_noise(x0_oracle(x0), z, TIMES, None, None, SIGMA_D)
    assert torch.allclose(bwd, z.expand(len(TIMES), -1, -1), atol=1e-12, rtol=0)
    assert torch.allclose(cosine(bwd, z), torch.ones(len(TIMES), 16, dtype=torch.float64))


def test_eq8_gaussian_posterior_mean_gives_E_z(float64):
    """Gaussian data N(μ, S²): the exact teacher's x̂0 = E[x0 | x_t] makes Eq. 8 return E[z | x_t] =
    σ_d·sin t·(x_t/σ_d − cos t·μ)/(cos²t·S² + sin²t), forward and along the rollout's own states."""
    G = Gaussian(torch.tensor([0.3, -0.6, 0.1]), S=0.7, sigma_d=SIGMA_D)
    g = torch.Generator().manual_seed(1)
    x0 = SIGMA_D * (G.mu + G.S * torch.randn(32, 3, generator=g))
    z = SIGMA_D * torch.randn(32, 3, generator=g)

    def E_z(x_t, t):
        cos_t, sin_t = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return SIGMA_D * sin_t * (x_t / SIGMA_D - cos_t * G.mu) / (cos_t**2 * G.S**2 + sin_t**2)

    fwd = forward_noise(G.F, x0, z, TIMES, None, None, SIGMA_D)
    for i, t in enumerate(TIMES):
        t_ = t.expand(32)
        x_t = torch.cos(t) * x0 + torch.sin(t) * z
        assert torch.allclose(fwd[i], E_z(x_t, t_), atol=1e-12, rtol=0)
    p = rollout(G.F, z, TIMES, None, None, SIGMA_D, keep_first=True)
    bwd = backward_noise(G.F, z, TIMES, None, None, SIGMA_D)
    assert torch.allclose(bwd.flatten(0, 1), E_z(p.x_t, p.t), atol=1e-12, rtol=0)


def test_gaussian_backward_stays_parallel_to_z_T(float64):
    """Isotropic Gaussian data: the exact ODE keeps x_t/σ_d − cos t·μ ∝ z_T, so Eq. 8's noise stays
    parallel to z_T (cos → 1 on a fine route), while forward diffusion shrinks E[z | x_t] towards
    the data (cos < 1)."""
    G = Gaussian(torch.tensor([0.5, -0.5, 0.2, 0.0]), S=0.8, sigma_d=SIGMA_D)
    g = torch.Generator().manual_seed(2)
    x0 = SIGMA_D * (G.mu + G.S * torch.randn(256, 4, generator=g))
    z = SIGMA_D * torch.randn(256, 4, generator=g)
    times = reference_route(400, 1.0)
    bwd = cosine(backward_noise(G.F, z, times, None, None, SIGMA_D), z)
    fwd = cosine(forward_noise(G.F, x0, z, times, None, None, SIGMA_D), z)
    assert bwd.min() > 1 - 1e-4
    assert fwd[-1].mean() < 0.5 < fwd[len(times) // 2].mean()


def test_knn_two_sample_test():
    """0.5 for two samples of one distribution, 1 for disjoint ones."""
    r = np.random.default_rng(0)
    a, b = r.normal(size=(200, 8)), r.normal(size=(200, 8))
    assert abs(tsne.knn_accuracy(a, b, 5, 0) - 0.5) < 0.1
    assert tsne.knn_accuracy(a, b + 10, 5, 0) == 1.0


# ------------------------------------------------------------------------------------ the scripts
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(script, tmp_path, cache, backbone, *flags):
    """One script in-process on a toy teacher of 50 FM steps; returns its JSON."""
    out = tmp_path / backbone
    argv = ["--backbone", backbone, "--teacher-steps", "50", "--cache-dir", str(cache)]
    argv += ["--out", str(out)]
    assert script.main([*argv, *flags]) == 0
    name = script.__name__.split(".")[-1]
    assert (out / f"{name}.png").stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("backbone", ["toy2d", "digits"])
def test_equivalent_noise_script(tmp_path, cache, backbone):
    d = run(equivalent_noise, tmp_path, cache, backbone, "--n", "16", "--N", "6")
    assert len(d["t"]) == 6 and all(0 < t <= math.pi / 2 for t in d["t"])
    for k in ("forward", "backward"):
        assert len(d[k]["cos_mean"]) == len(d[k]["cos_std"]) == 6
        assert all(-1 <= c <= 1 + 1e-6 for c in d[k]["cos_mean"])
        assert d[k]["cos_mean"][0] == pytest.approx(1, abs=1e-5)  # t = π/2: Noise_eqv = x_t = z


def test_equivalent_noise_is_deterministic(tmp_path, cache):
    a = run(equivalent_noise, tmp_path / "a", cache, "toy2d", "--n", "8", "--N", "4", "--seed", "3")
    b = run(equivalent_noise, tmp_path / "b", cache, "toy2d", "--n", "8", "--N", "4", "--seed", "3")
    assert a["forward"] == b["forward"] and a["backward"] == b["backward"]


def test_tsne_script(tmp_path, cache):
    d = run(tsne, tmp_path, cache, "toy2d", "--n", "20", "--N", "6", "--times", "1.2,0.2")
    assert len(d["t"]) == 2 and len(d["tsne"]) == 2
    for v in d["knn_accuracy"].values():
        assert len(v) == 2 and all(0 <= x <= 1 for x in v)
    sets = [e[k] for e in d["tsne"] for k in ("initial", "forward", "backward")]
    assert all(len(points) == 20 and len(points[0]) == 2 for points in sets)


def test_sampling_schemes_script(tmp_path, cache):
    d = run(sampling_schemes, tmp_path, cache, "digits", "--N", "6", "--draws", "200")
    width = d["bin_edges"][1] - d["bin_edges"][0]
    assert set(d["schemes"]) == {"random", "logit_normal", "reference"}
    for s in d["schemes"].values():
        assert len(s["instances"]) == 5
        assert all(len(r) == 6 and r[0] == math.pi / 2 for r in s["instances"])
        assert all(r == sorted(r, reverse=True) for r in s["instances"])
        assert sum(s["density"]) * width == pytest.approx(1)


@pytest.mark.parametrize("backbone", ["toy2d", "digits"])
def test_predicted_x0_script(tmp_path, cache, backbone):
    flags = ["--n", "4", "--routes", "2", "--N", "5", "--steps", "3,4", "--ref-N", "8"]
    d = run(predicted_x0, tmp_path, cache, backbone, *flags)
    assert [p["scheme"] for p in d["schemes"]] == ["random", "logit_normal", "reference"]
    assert [p["N"] for p in d["steps"]] == [3, 4]
    for p in d["schemes"] + d["steps"]:
        lengths = [len(p[k]) for k in ("mse_to_ode", "mse_to_ode_at_t", "mse_to_own_final")]
        assert lengths == [p["N"]] * 3
        assert p["mse_to_ode_at_t"][0] < 1e-10  # at π/2 both start from the same z
        assert p["mse_to_own_final"][-1] < 1e-8  # the end point is the last x̂0
        assert p["final_nn_mse_to_data"] >= 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--backbone", "nope"],
        ["--backbone", "sana"],
        ["--tiny"],
        ["--backbone", "sana", "--pretrained", "/nowhere/sana"],
        ["--n", "1"],
        ["--teacher-steps", "-1"],
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv):
    assert equivalent_noise.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sana_tiny(tmp_path, cache):
    """--backbone sana --tiny: teacher samples stand in for data; a latent [4, 8, 8]."""
    out = tmp_path / "sana"
    flags = ["--backbone", "sana", "--tiny", "--cache-dir", str(cache), "--out", str(out)]
    assert equivalent_noise.main([*flags, "--n", "4", "--N", "4"]) == 0
    d = json.loads((out / "equivalent_noise.json").read_text())
    assert len(d["backward"]["cos_mean"]) == 4
    assert d["args"]["w"] == config.PRESETS["sana"]["eval_w"][0]  # train.py's evaluation CFG scale
