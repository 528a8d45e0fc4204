"""analysis/: Eq. (8) against closed forms, the k-NN two-sample test, each script's JSON (tiny)."""

import json
import math

import numpy as np
import pytest
import torch

import report
from analysis import equivalent_noise, pair_sources, predicted_x0, sampling_schemes, tsne
from analysis.readings import (
    backward_noise,
    cosine,
    curves,
    energy_ratio,
    forward_noise,
    projection_ratio,
)
from oracles import Gaussian
from trajectory import reference_route, rollout
from trigflow import TrigFlow

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


class GaussianClasses:
    """An exact flow-matching teacher: class c ~ N(μ_c, S² I), class K the unconditional one,
    N(μ_K, S² I). Its CFG TrigFlow view at scale w is exactly the Gaussian teacher with mean
    μ_w = μ_K + w·(μ_c − μ_K) (Eq. 7 and the velocity are affine in μ, with equal S)."""

    def __init__(self, mu: torch.Tensor, S):
        self.mu, self.S = mu, S  # [K + 1, D]

    def __call__(self, x_fm, s, cond, guidance=None):
        return Gaussian(self.mu[cond], self.S, SIGMA_D).v(x_fm, s)

    def mu_w(self, c: torch.Tensor, w: float) -> torch.Tensor:
        return self.mu[-1] + w * (self.mu[c] - self.mu[-1])


def cfg_gaussian(D: int, S, n: int, seed: int):
    """The teacher, its CFG TrigFlow view, class labels, data x0 of those classes and noise z."""
    g = torch.Generator().manual_seed(seed)
    V = GaussianClasses(0.6 * torch.randn(4, D, generator=g), S)
    c = torch.arange(n) % 3
    x0 = SIGMA_D * (V.mu[c] + V.S * torch.randn(n, D, generator=g))
    z = SIGMA_D * torch.randn(n, D, generator=g)
    return V, TrigFlow(V, uncond=torch.tensor(3)), c, x0, z


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_three_readings_against_the_exact_gaussian_teacher(float64, w):
    """Each curve of readings.curves against its closed form, through the CFG teacher at w:
    (a) is z, so its cosine is 1 at every t; (b) is E_w[z | x_t] ∝ x_t/σ_d − cos t·μ_w, so its
    cosine is cos(cos t·x0/σ_d + sin t·z/σ_d − cos t·μ_w, z) per sample; backward is parallel to
    z_T at every t on any route (the exact Eq. 9 step keeps x_t/σ_d − cos t·μ_w ∝ z_T: a ray)."""
    V, F, c, x0, z = cfg_gaussian(5, 0.7, 64, seed=3)
    for N in (6, 40):
        times = reference_route(N, 2.5)
        e = curves(F, x0, z, times, c, torch.full((64,), w), SIGMA_D)
        ones = torch.ones(N, 64)
        assert torch.allclose(cosine(e["forward_known"], z), ones, atol=1e-12, rtol=0)
        t = times[:, None, None]
        r = torch.cos(t) * x0 / SIGMA_D + torch.sin(t) * z / SIGMA_D - torch.cos(t) * V.mu_w(c, w)
        assert torch.allclose(cosine(e["forward_model"], z), cosine(r, z), atol=1e-10, rtol=0)
        assert torch.allclose(cosine(e["backward"], z), ones, atol=1e-10, rtol=0)
    # an exact posterior mean has at most z's energy, E‖E[z | x_t]‖²/E‖z‖² = sin²t/V (per dim),
    # and as much projection on z: E⟨E[z | x_t], z⟩ = E‖E[z | x_t]‖²
    V, F, c, x0, z = cfg_gaussian(4, 0.7, 8192, seed=4)
    times = reference_route(6, 2.5)
    noise = forward_noise(F, x0, z, times, c, torch.ones(8192), SIGMA_D)
    closed = torch.sin(times) ** 2 / (torch.cos(times) ** 2 * 0.7**2 + torch.sin(times) ** 2)
    assert torch.allclose(energy_ratio(noise, z), closed, rtol=0.03, atol=0)
    assert torch.allclose(projection_ratio(noise, z), closed, rtol=0.03, atol=0.005)
    assert (closed <= 1).all()


def test_reading_b_keeps_the_noise_off_the_data(float64):
    """The data's dimension in reading (b): data spread over d of D dims (S = 0 on the rest). As
    t → 0 an exact teacher knows the other D − d components of z exactly and none of the d, so
    cos(E[z | x_t], z) → ‖z_normal‖/‖z‖ ≈ √((D − d)/D), not 0: low-dimensional data keeps (b) up."""
    S = torch.tensor([0.8, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    V, F, c, x0, z = cfg_gaussian(8, S, 256, seed=5)
    t = torch.tensor([1e-4])
    cos = cosine(forward_noise(F, x0, z, t, c, torch.ones(256), SIGMA_D), z)[0]
    normal = z[:, 2:].norm(dim=1) / z.norm(dim=1)
    assert torch.allclose(cos, normal, atol=1e-3, rtol=0)
    assert abs(cos.mean() - math.sqrt(6 / 8)) < 0.05


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
    d = run(equivalent_noise, tmp_path, cache, backbone, "--n", "16", "--N", "6", "--w", "0,2")
    assert len(d["t"]) == 6 and all(0 < t <= math.pi / 2 for t in d["t"])
    assert [e["w"] for e in d["by_w"]] == [0.0, 2.0] and d["panel_w"] == 2.0
    assert set(d["readings"]) == {"forward_known", "forward_model", "backward"}
    for e in d["by_w"]:
        for k in d["readings"]:
            keys = ("cos_mean", "cos_std", "energy_ratio", "projection_ratio")
            assert [len(e[k][q]) for q in keys] == [6] * 4
            assert all(-1 <= c <= 1 + 1e-6 for c in e[k]["cos_mean"])
            assert e[k]["cos_mean"][0] == pytest.approx(1, abs=1e-5)  # t = π/2: x_t = z
        assert e["forward_known"]["cos_mean"] == pytest.approx([1] * 6, abs=1e-5)
    # the w = 0 and w = 2 teachers differ, the known noise does not
    assert d["by_w"][0]["backward"] != d["by_w"][1]["backward"]
    assert d["by_w"][0]["forward_known"] == d["by_w"][1]["forward_known"]
    md = (tmp_path / backbone / "equivalent_noise.md").read_text()
    assert md == equivalent_noise.summary(d) and md.count("\n") == 2 + 3 * 2


def test_equivalent_noise_is_deterministic(tmp_path, cache):
    flags = ["--n", "8", "--N", "4", "--seed", "3", "--w", "1"]
    a = run(equivalent_noise, tmp_path / "a", cache, "toy2d", *flags)
    b = run(equivalent_noise, tmp_path / "b", cache, "toy2d", *flags)
    assert a["by_w"] == b["by_w"]


def test_replace_block(tmp_path):
    p = tmp_path / "R.md"
    p.write_text("a\n<!-- x -->\nold\nlines\n<!-- /x -->\nb\n")
    report.replace_block(p, "x", "new\n")
    assert p.read_text() == "a\n<!-- x -->\nnew\n<!-- /x -->\nb\n"
    assert report.block(p, "x") == "new"
    with pytest.raises(ValueError, match="no block"):
        report.block(p, "y")


def test_tsne_script(tmp_path, cache):
    flags = ["--n", "20", "--N", "6", "--times", "1.2,0.2", "--w", "1,4.5"]
    d = run(tsne, tmp_path, cache, "toy2d", *flags)
    assert len(d["t"]) == 2 and len(d["tsne"]) == 2 and d["tsne_w"] == 4.5
    assert [e["w"] for e in d["by_w"]] == [1.0, 4.5]
    for e in d["by_w"]:
        assert set(e["knn_accuracy"]) == set(tsne.COMPARE)
        for v in e["knn_accuracy"].values():
            assert len(v) == 2 and all(0 <= x <= 1 for x in v)
        assert e["norm_ratio"]["forward_known"] == pytest.approx([1, 1], abs=1e-5)  # it is z
    sets = [e[k] for e in d["tsne"] for k in ("initial", "forward_model", "backward")]
    assert all(len(points) == 20 and len(points[0]) == 2 for points in sets)
    assert (tmp_path / "toy2d" / "tsne.md").read_text() == tsne.summary(d)


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
        ["--backbone", "sana", "--resolution", "48"],
        ["--tiny"],
        ["--backbone", "sana", "--pretrained", "/nowhere/sana"],
        ["--n", "1"],
        ["--teacher-steps", "-1"],
        ["--w", "two"],
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv):
    assert equivalent_noise.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sana_tiny(tmp_path, cache):
    """--backbone sana --tiny: teacher samples at each w stand in for data; a latent [4, 8, 8]."""
    out = tmp_path / "sana"
    flags = ["--backbone", "sana", "--tiny", "--cache-dir", str(cache), "--out", str(out)]
    assert equivalent_noise.main([*flags, "--n", "4", "--N", "4", "--w", "1,4.5"]) == 0
    d = json.loads((out / "equivalent_noise.json").read_text())
    assert [len(e["backward"]["cos_mean"]) for e in d["by_w"]] == [4, 4]
    assert d["by_w"][0]["forward_model"] != d["by_w"][1]["forward_model"]


def test_pair_sources_script(tmp_path, cache):
    """TBCM's pairs: at the route's partitioned times (Sec. 4.2), each the Eq. 9 step of the one
    before on its trajectory; sCM's: x_t = cos t·x0 + sin t·z; both sets equally large."""
    flags = ["--trajectories", "3", "--N", "4", "--draws", "50"]
    d = run(pair_sources, tmp_path, cache, "toy2d", *flags)
    tb = {k: torch.tensor(v) for k, v in d["tbcm"].items() if isinstance(v, list)}
    sc = {k: torch.tensor(v) for k, v in d["scm"].items() if isinstance(v, list)}
    assert d["tbcm"]["pairs"] == d["scm"]["pairs"] == 3 * 3
    ref, route = reference_route(4, d["shift"]), tb["route"]
    assert route[0] == math.pi / 2 and ((ref[1:] <= route[1:]) & (route[1:] <= ref[:-1])).all()
    assert torch.equal(tb["traj"], torch.arange(3).repeat(3))  # time-major
    assert torch.allclose(tb["t"], route[1:].repeat_interleave(3))
    # Eq. 9: x_{t−Δ} = cos Δ·x_t − sin Δ·dx_t/dt, pair to pair along each trajectory, then to x0
    delta = (route[1:] - torch.cat([route[2:], route.new_zeros(1)])).repeat_interleave(3)[:, None]
    step = torch.cos(delta) * tb["x_t"] - torch.sin(delta) * tb["dxdt"]
    assert torch.allclose(step, torch.cat([tb["x_t"][3:], tb["x0"]]), atol=1e-5)
    t = sc["t"][:, None]
    assert torch.allclose(sc["x_t"], torch.cos(t) * sc["x0"] + torch.sin(t) * sc["z"], atol=1e-6)
    assert not torch.allclose(sc["x_t"], sc["x0"], atol=1e-2)
    width = d["bin_edges"][1] - d["bin_edges"][0]
    assert [sum(v) * width for v in d["density"].values()] == pytest.approx([1, 1])
