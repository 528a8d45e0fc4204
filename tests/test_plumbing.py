"""The plumbing a long run relies on: EMA, resume between checkpoints, a half-written checkpoint,
the brightness filter's wiring, one pool per rank. Each test names the bug it catches."""

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import backbones
import checkpoint
import runtime
import train
from config import Config, parse_args
from pairs import PairPool, TBCMPairs
from trigflow import bcast

pytestmark = pytest.mark.usefixtures("one_thread")
# toy2d, a 60-step teacher, 2 prompts × 2 trajectories × 3 pairs a step, pools of 2 steps
FAST = ["--backbone", "toy2d", "--teacher-steps", "60", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "2", "--log-every", "1", "--n-eval", "100", "--eval-teacher-steps", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def config(cache: str, out: Path, *args: str) -> Config:
    return parse_args([*FAST, "--cache-dir", cache, "--out", str(out), *args])


def fit(cfg: Config, teacher: backbones.Teacher | None = None) -> dict:
    """train.train as train.main calls it (no evaluation); returns the training state."""
    teacher = teacher or backbones.build(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return train.train(cfg, teacher.student(), TBCMPairs(cfg, teacher), Path(cfg.out))[1]


def log(run: Path) -> list[dict]:
    """log.jsonl's lines without their wall time."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "wall_s"} for ln in lines]


def test_ema_update_is_its_formula(float64):
    """runtime.ema_update against its transcription, β_k = min(decay, (1 + k)/(10 + k)) and
    ema ← β·ema + (1 − β)·θ, over steps in the warm-up and past it (decay 0.5 from k = 8); the
    frozen layer, shared with the EMA as a LoRA student's base, stays as it is. Catches the update
    written the wrong way round (β and 1 − β swapped) and a warm-up of another shape."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3).requires_grad_(False), nn.Linear(3, 2))
    ema, frozen, theta = runtime.ema_of(net, 0.5), net[0].weight.clone(), list(net[1].parameters())
    expected = [p.clone() for p in theta]
    for k in range(12):
        with torch.no_grad():  # an optimiser step
            for p in theta:
                p.add_(torch.randn_like(p))
        runtime.ema_update(ema, net, 0.5, k)
        beta = min(0.5, (1 + k) / (10 + k))
        expected = [beta * e + (1 - beta) * p for e, p in zip(expected, theta, strict=True)]
    for e, p in zip(expected, ema[1].parameters(), strict=True):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-14)
    assert ema[0].weight is net[0].weight and torch.equal(net[0].weight, frozen)


class Crash(Exception):
    """The test's own interruption of a run."""


def test_resume_between_checkpoints(cache, tmp_path, monkeypatch):
    """Checkpoints every 3 steps, a crash after 5 steps, --resume: the run goes on from step 3 (in
    the middle of a pool) and ends as the uninterrupted one does: student, EMA, head and optimiser
    tensors bitwise, the training and optimiser state of state.json, and log.jsonl line by line
    (wall time aside). Catches checkpoint.truncate_log off by one (the resume step's line twice, or
    the line before it lost) and any training state that a checkpoint does not carry."""
    args = ("--steps", "7", "--ckpt-every", "3", "--ema-decay", "0.9")
    fit(config(cache, tmp_path / "a", *args))
    r_schedule = train.r_schedule

    def crash_at_5(step: int, **kw) -> float:
        if step == 5:
            raise Crash
        return r_schedule(step, **kw)

    monkeypatch.setattr(train, "r_schedule", crash_at_5)
    with pytest.raises(Crash):
        fit(config(cache, tmp_path / "b", *args))
    monkeypatch.undo()
    assert [r["step"] for r in log(tmp_path / "b")] == [0, 1, 2, 3, 4]
    assert checkpoint.latest(tmp_path / "b" / "checkpoints").name == "step-0000003"
    fit(config(cache, tmp_path / "b", *args, "--resume"))
    assert log(tmp_path / "a") == log(tmp_path / "b")
    ta, tb = (
        load_file(tmp_path / r / "checkpoints/step-0000007/tensors.safetensors") for r in "ab"
    )
    assert ta.keys() == tb.keys() and any(k.startswith(("ema/", "opt/")) for k in ta)
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]
    sa, sb = (
        json.loads((tmp_path / r / "checkpoints/step-0000007/state.json").read_text()) for r in "ab"
    )
    for s in (sa, sb):
        s["train"].pop("wall_s")
    assert sa["train"] == sb["train"] and sa["optimizer"] == sb["optimizer"]


@pytest.mark.parametrize("damage", ["no state.json", "tensors cut short"])
def test_half_written_checkpoint(damage, cache, tmp_path, capsys, monkeypatch):
    """A step-* folder that is not whole (state.json missing, or the tensors file cut short) beside
    a complete earlier one: --resume takes the complete one and says in one line which it skipped;
    the half folder does not count among the checkpoints kept; with nothing complete --resume
    refuses in one line (exit 2). While a checkpoint is written, readers see only the older ones.
    Catches checkpoint.latest picking the newest step-* folder whatever it holds."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = [*FAST, "--cache-dir", cache, "--out", str(out), "--ckpt-every", "3"]
    assert train.main([*common, "--steps", "3"]) == 0
    half = ckpts / "step-0000005"
    shutil.copytree(ckpts / "step-0000003", half)
    if damage == "no state.json":
        (half / "state.json").unlink()
    else:
        tensors = half / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:-100])
    seen, save_file = [], checkpoint.save_file

    def watched(tensors: dict, path: Path) -> None:  # a reader looking while step 6 is written
        save_file(tensors, path)
        seen.append((checkpoint.latest(ckpts).name, sorted(p.name for p in ckpts.glob("step-*"))))

    monkeypatch.setattr(checkpoint, "save_file", watched)
    capsys.readouterr()
    assert train.main([*common, "--steps", "6", "--resume"]) == 0
    said = [ln for ln in capsys.readouterr().err.splitlines() if "step-0000005" in ln]
    assert len(said) == 1 and "step-0000003" in said[0], said
    assert [r["step"] for r in log(out)] == [0, 1, 2, 3, 4, 5]
    assert seen[0] == ("step-0000003", ["step-0000003", "step-0000005"])
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-000000{k}" for k in (3, 5, 6)]
    for name in ("step-0000003", "step-0000006"):
        shutil.rmtree(ckpts / name)
    assert train.main([*common, "--steps", "9", "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume"), err


@pytest.mark.parametrize("mode", ["hard", "off"])
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # x_t's gradient
def test_black_trajectories_carry_no_weight(mode, cache, tmp_path, monkeypatch):
    """The brightness filter's wiring (Alg. 1 lines 10, 16): a teacher whose even classes end on
    the black point (its x̂0 is black all along: v = (x − black)/s); with --filter-mode hard their
    pairs reach loss.py with mask False and their gradient there is exactly zero, all others with
    mask True, and log.jsonl's kept share is the mask's; with --filter-mode off every pair counts,
    the black ones with a gradient. Catches pairs.py ignoring the filter's mask, train.py not
    passing it, and loss.py not applying it."""
    cfg = config(cache, tmp_path, "--steps", "4", "--filter-mode", mode)
    teacher, seen = backbones.build(cfg), []
    v, C = teacher.velocity, len(teacher.prompt_names)

    def to_black(x, s, cond, guidance):  # even classes (not the null class C)
        dark = bcast((cond % 2 == 0) & (cond < C), x)
        return torch.where(dark, (x - teacher.black) / bcast(s, x), v(x, s, cond, guidance))

    teacher.velocity, scm_loss = to_black, train.scm_loss

    def watched(F: partial, x_t, *args, mask, **kw):  # F's cond: the toy prompts
        x_t = x_t.detach().requires_grad_(True)
        loss, stats = scm_loss(F, x_t, *args, mask=mask, **kw)
        (grad,) = torch.autograd.grad(loss, x_t, retain_graph=True)
        seen.append((F.keywords["cond"] % 2 == 0, mask, grad.flatten(1).abs().amax(1)))
        return loss, stats

    monkeypatch.setattr(train, "scm_loss", watched)
    fit(cfg, teacher)
    darks = torch.cat([d for d, _, _ in seen])
    assert darks.any() and not darks.all()
    for (dark, keep, grad), rec in zip(seen, log(tmp_path), strict=True):
        assert torch.equal(keep, ~dark if mode == "hard" else torch.ones_like(dark))
        assert not grad[~keep].any()  # a dropped pair: no weight
        assert (grad[keep & dark] > 0).all()  # a black pair kept (filter off): weighs in
        assert rec["kept"] == keep.float().mean().item()


def rows(b: dict) -> torch.Tensor:
    """One row per pair: x_t, dx_t/dt, t, prompt, w, keep [P, 2·D + 4], float64."""
    cols = [b["x_t"].flatten(1), b["dxdt"].flatten(1)]
    cols += [b[k][:, None] for k in ("t", "prompt", "w", "keep")]
    return torch.cat([c.double() for c in cols], 1)


def same_pairs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as multisets of rows, to rounding (the processes' batches differ in size)."""
    d = torch.cdist(a, b)
    return len(a) == len(b) and bool(d.amin(1).max() < 1e-4) and len(d.argmin(1).unique()) == len(b)


def test_one_pool_per_rank(cache, tmp_path, torchrun):
    """Data parallel's pools (pairs.seeded, PairPool): rank r rolls out its own prompt slots, each
    slot from its own stream, and shuffles its pool with its own stream. For 2 gloo ranks against
    one process, 2 pools of 2 steps: in each step the ranks' pairs are disjoint; over a pool their
    union is the one process's pool; in no step do the two ranks draw the same sequence of times.
    Catches every rank drawing the same slots' streams (each pair trained twice) and every rank
    shuffling with the same seed (both take the same positions of their pools, hence the same
    times, in every step)."""
    flags = [*FAST, "--cache-dir", cache, "--steps", "4", "--ckpt-every", "100"]
    cfg = parse_args([*flags, "--out", str(tmp_path / "one")])
    teacher = backbones.build(cfg)  # the ranks load it from the cache
    pool = PairPool(TBCMPairs(cfg, teacher), cfg, range(cfg.prompts), rank=0)
    one = [rows(pool.draw(k)) for k in range(2)]  # one process's pools 0 and 1
    p = torchrun(
        ["-m", "tests.plumbing_ranks", str(tmp_path), *flags, "--out", str(tmp_path / "two")]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    drawn = [load_file(tmp_path / f"rank-{r}.safetensors") for r in (0, 1)]
    # step[r][s]: what rank r drew in step s
    split = [{tuple(k.split("/")): v for k, v in d.items()} for d in drawn]
    step = [[{k: v for (i, k), v in d.items() if i == str(s)} for s in range(4)] for d in split]
    for s in range(4):
        a, b = step[0][s], step[1][s]
        assert torch.cdist(rows(a), rows(b)).amin() > 1e-3
        assert not torch.equal(a["t"], b["t"])
    for k in range(2):  # pool k: steps 2k and 2k + 1
        union = torch.cat([rows(step[r][s]) for r in (0, 1) for s in (2 * k, 2 * k + 1)])
        assert same_pairs(union, one[k])
