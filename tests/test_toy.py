"""Toy data, velocity nets (toy.py) and the cached flow-matching teacher (toy_teacher.py)."""

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoint import config_hash
from toy import ToyDataError, load_data, ring_centers
from toy_teacher import TEACHERS, make_net, student_from_teacher, train_teacher
from trigflow import SIGMA_D, TrigFlow

pytestmark = pytest.mark.usefixtures("one_thread")


def test_toy2d_data_is_unit_scale_and_deterministic():
    x, y, C = load_data("toy2d", "train")
    assert x.shape == (20000, 2) and C == 8 and set(y.tolist()) == set(range(8))
    assert torch.allclose(x.std(0), torch.ones(2), atol=0.03)  # FM units: per-dim std ≈ 1
    assert torch.equal(x, load_data("toy2d", "train")[0])
    x_test = load_data("toy2d", "test")[0]
    assert x_test.shape == (5000, 2) and not torch.equal(x[:5000], x_test)
    # every point lies near its own class mean
    assert (x - ring_centers()[y]).norm(dim=1).max() < 0.7


def test_digits_split_shapes_range_and_determinism():
    x, y, C = load_data("digits", "train")
    x_test, y_test, _ = load_data("digits", "test")
    assert x.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8) and C == 10
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert (x == -1).float().mean() > 0.4  # background is −1
    assert torch.bincount(y_test, minlength=10).min() >= 28  # stratified
    x2, y2, _ = load_data("digits", "train")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def _write_cifar(folder, n: int = 3) -> np.ndarray:
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8)
    data[0, 0], data[0, 1024] = 0, 255  # pixel (0, 0) of the red and green planes
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)
    return data


def test_cifar_reader_on_a_fake_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    data = _write_cifar(folder)
    x, y, C = load_data("cifar10", "train", str(folder))
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [0, 1, 2] * 5 and C == 10
    assert x[0, 0, 0, 0] == -1 and x[0, 1, 0, 0] == 1  # channel-major rows, uint8 → [−1, 1]
    assert torch.allclose(x[1].flatten(), torch.tensor(data[1], dtype=torch.float32) / 127.5 - 1)
    assert load_data("cifar10", "test", str(folder))[0].shape == (3, 3, 32, 32)


def test_cifar_missing_or_malformed_gives_a_readable_error(tmp_path):
    with pytest.raises(ToyDataError, match="cifar-10-python.tar.gz"):
        load_data("cifar10", "train", str(tmp_path / "nowhere"))
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="--data-dir"):
        load_data("cifar10", "train", str(folder))


def _small(backbone: str):
    cfg = TEACHERS[backbone]
    if backbone == "cifar10":
        cfg = dataclasses.replace(cfg, width=16, channel_mult=(1, 2))
    torch.manual_seed(0)
    return cfg, make_net(cfg).double()


@pytest.mark.parametrize("backbone", ["toy2d", "digits", "cifar10"])
def test_net_float64_and_jvp_matches_central_differences(backbone):
    """torch.func.jvp of v along (u, ds) equals a central difference: s is continuous and smooth."""
    cfg, net = _small(backbone)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.data_shape, generator=g, dtype=torch.float64)
    u = torch.randn(x.shape, generator=g, dtype=torch.float64)
    s, ds = torch.tensor([0.3, 0.8]).double(), torch.tensor([1.0, -0.5]).double()
    cond, guidance = torch.tensor([1, cfg.num_classes]), torch.tensor([0.1, 0.3]).double()

    def v(x, s):
        return net(x, s, cond, guidance)

    out, tangent = torch.func.jvp(v, (x, s), (u, ds))
    assert out.shape == x.shape and out.dtype == torch.float64
    eps = 1e-6
    fd = (v(x + eps * u, s + eps * ds) - v(x - eps * u, s - eps * ds)) / (2 * eps)
    _, dv_ds = torch.func.jvp(v, (x, s), (torch.zeros_like(u), ds))
    assert dv_ds.abs().min() > 0 and dv_ds.abs().max() > 1e-3  # time enters continuously
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backbone", ["toy2d", "digits", "cifar10"])
def test_student_starts_as_the_teacher_for_any_guidance(backbone):
    cfg, teacher = _small(backbone)
    x = torch.randn(3, *cfg.data_shape, dtype=torch.float64)
    s, cond = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.tensor([0, 1, 2])
    g = torch.tensor([0.0, 0.15, 0.7], dtype=torch.float64)
    v_teacher = teacher(x, s, cond)
    assert torch.equal(teacher(x, s, cond, g), v_teacher)  # fresh net: guidance output is zero
    with torch.no_grad():  # a teacher whose guidance embedding is not zero (e.g. a trained student)
        for p in teacher.embed.guidance.parameters():
            p.add_(0.1)
    assert not torch.allclose(teacher(x, s, cond, g), v_teacher)
    student = student_from_teacher(teacher)
    assert torch.equal(student(x, s, cond, g), v_teacher)
    assert all(p.requires_grad for p in student.parameters())


def test_teacher_cache_reloads_without_training(tmp_path):
    cfg = dataclasses.replace(TEACHERS["toy2d"], width=16, depth=1, batch_size=32)
    trained = train_teacher("toy2d", cache_root=str(tmp_path), steps=5, progress=False, cfg=cfg)
    folder = tmp_path / f"toy2d-{config_hash(dataclasses.replace(cfg, steps=5))}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["steps"] == 5
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    loaded = train_teacher("toy2d", cache_root=str(tmp_path), steps=5, progress=False, cfg=cfg)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # not trained and saved again
    assert loaded is not trained
    on_disk = load_file(folder / "model.safetensors")
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and torch.equal(on_disk[k], v)
    other = train_teacher(
        "toy2d", cache_root=str(tmp_path), steps=5, seed=1, progress=False, cfg=cfg
    )
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.equal(other.inp.weight, trained.inp.weight)


@torch.no_grad()
def test_toy2d_teacher_learns_the_ring(tmp_path):
    """Flow matching, then TrigFlow Euler steps x ← cos Δ·x − sin Δ·σ_d·F reach the class's mode."""
    teacher = train_teacher("toy2d", cache_root=str(tmp_path), steps=400, progress=False)
    F = TrigFlow(teacher, uncond=torch.tensor([8]))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(800) % 8
    x, w = SIGMA_D * torch.randn(800, 2, generator=g), torch.full((800,), 1.5)
    t = torch.linspace(math.pi / 2, 0, 17)
    for t0, t1 in zip(t[:-1], t[1:], strict=True):
        F_t = F(x / SIGMA_D, t0.expand(800), y, w)
        x = torch.cos(t0 - t1) * x - torch.sin(t0 - t1) * SIGMA_D * F_t
    x0 = x / SIGMA_D  # TrigFlow data → FM units
    assert (torch.cdist(x0, ring_centers()).argmin(1) == y).float().mean() > 0.95
    assert (x0 - ring_centers()[y]).norm(dim=1).median() < 0.3
