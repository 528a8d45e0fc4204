"""monitor.py: --sample-every's grids and --tensorboard's event file on a 4-step digits run, the
grids sampled as the evaluation samples (App. E), a monitored run bit for bit an unmonitored one."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import backbones
import train
from config import parse_args
from metrics import evaluate_samplers
from monitor import Monitor
from pairs import TBCMPairs

# tiny, fast settings (tests/test_train.py's): a 60-step teacher, 4 distillation steps
FAST = ["--teacher-steps", "60", "--n-eval", "100", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "2", "--log-every", "1", "--eval-teacher-steps", "4", "--steps", "4"]
WATCH = ["--sample-every", "2", "--tensorboard"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """The same digits run with and without the monitor's flags."""
    out = tmp_path_factory.mktemp("runs")
    for name, flags in (("plain", []), ("watched", WATCH)):
        args = [*FAST, "--cache-dir", cache, *flags, "--out", str(out / name)]
        assert train.main(args) == 0
    return out / "plain", out / "watched"


def logged(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


def test_grids_and_event_file(runs):
    """Grids after 2 and 4 steps; the event file holds log.jsonl's loss, r, kept, ‖g‖ and grad
    norm at its steps (float32), the loss per t-bin, lr, and the two grids."""
    plain, run = runs
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-0000002.png",
        "step-0000004.png",
    ]
    assert not (plain / "samples").exists() and not (plain / "tb").exists()
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    recs = logged(run)
    for k in ("loss", "r", "kept", "g_norm", "grad_norm"):
        got = events.Scalars(k)
        assert [e.step for e in got] == [r["step"] for r in recs], k
        assert [e.value for e in got] == pytest.approx([r[k] for r in recs], rel=1e-6), k
    assert len(events.Scalars("loss_by_t_bin/0")) == len(recs)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([3e-5] * len(recs))
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_monitoring_changes_nothing(runs):
    """A monitored run's checkpoint tensors (student, EMA, logvar head, AdamW), log and evaluation
    are bit for bit an unmonitored one's: the monitor draws from no training stream."""
    plain, run = runs
    a = load_file(plain / "checkpoints" / "step-0000004" / "tensors.safetensors")
    b = load_file(run / "checkpoints" / "step-0000004" / "tensors.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def untimed(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("wall_s", "samples_per_s")}

    assert [untimed(r) for r in logged(plain)] == [untimed(r) for r in logged(run)]
    ev = [json.loads((r / "metrics.json").read_text())["eval"] for r in runs]
    assert [{k: untimed(v) for k, v in e.items() if k != "distance_name"} for e in ev] == [
        {k: untimed(v) for k, v in ev[0].items() if k != "distance_name"}
    ] * 2


def test_grid_is_the_evaluations_sampling(cache, tmp_path):
    """App. E: the grid's student@1 and student@2 are evaluate_samplers' first samples (its noise,
    prompts, re-noise stream); the global RNG and the student's mode are left as they were."""
    cfg = parse_args([*FAST, "--cache-dir", cache, "--sample-every", "1"])
    teacher = backbones.build(cfg)
    student = teacher.student().train()
    mon = Monitor(cfg, tmp_path, 0, student, TBCMPairs(cfg, teacher), None)
    rng = torch.get_rng_state()
    grid = mon.grid()
    assert torch.equal(torch.get_rng_state(), rng) and student.training
    _, shown = evaluate_samplers(cfg, teacher, student)
    assert set(grid) == {"student@1", "student@2"}
    for k, x in grid.items():
        assert x.shape == (20, 1, 8, 8)  # two per class, as samples.png
        torch.testing.assert_close(x, shown[k], rtol=1e-5, atol=1e-5)


def test_rank_0_alone_writes(cache, tmp_path, torchrun):
    """Data parallel (2 gloo ranks): one event file and one set of grids."""
    out = tmp_path / "two"
    p = torchrun(["train.py", *FAST, "--cache-dir", cache, *WATCH, "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((out / "tb").iterdir())) == 1
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-0000002.png",
        "step-0000004.png",
    ]
