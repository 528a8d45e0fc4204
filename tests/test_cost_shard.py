"""bench/cost_shard.py: the per-rank memory under FSDP2 is 12·P/W resident + the frozen networks +
the largest stage, whose forward+backward holds 4·P/W of gradient and FSDP2's gathered weights;
world 1 is paper-sana's composition; the meta-device counts match the released checkpoints."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import cost_shard  # noqa: E402

MB = 2**20
# The released fp32 checkpoints' sizes in bytes (Efficient-Large-Model on Hugging Face): the
# student Sana_Sprint_1.6B_1024px.pth and the teacher Sana_Sprint_0.6B_1024px_teacher.pth.
SPRINT_1_6B_PTH, TEACHER_0_6B_PTH = 6_453_060_642, 2_375_214_166


def stage(mb_1: float, mb_2: float) -> dict:
    return {
        "by_batch": {"1": dict(dynamic_mb=mb_1, cpu_s=1.0), "2": dict(dynamic_mb=mb_2, cpu_s=2.0)}
    }


def parts(P: int, act: float, jvp: float) -> dict:
    """A bank variant's parts for a student of P parameters: forward+backward's rise is its fp32
    gradient plus `act` MB at any batch, the JVP's `jvp` MB, AdamW's step 1 MB."""
    g = 4 * P / MB
    resident = dict(resident_mb=10 + 12 * P / MB, grads_mb=g)  # 10 MB of frozen parts
    resident["tensor_mb"] = dict(student=g, optimizer_state=2 * g, grads=g)
    p = {"resident-bank": resident, "resident-tbcm": resident}
    p |= {"stage-fwdbwd-512": stage(g + act, g + act), "stage-jvp-512": stage(jvp, jvp)}
    return p | {"stage-optimizer": {"by_batch": {"1": dict(dynamic_mb=1.0, cpu_s=1.0)}}}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_per_rank_closed_form(world):
    """peak = frozen + 12·P/W + act·k + 4·P/W + (2·block + root)·2 B + block·6 B (W > 1), with k
    the width ratio of the activations, at a forward+backward bottleneck."""
    P, block, root = 8 * MB, MB, 2 * MB
    c0 = dict(student=P, teacher=P, block=block, root=root, width=100)
    c = dict(c0, width=150)
    r = cost_shard.per_rank(parts(P, act=40.0, jvp=1.0), c, c0, "bank", 512, world)
    gathered = ((2 * block + root) * 2 + block * 6) / MB * (world > 1)
    assert r["bottleneck"] == "student_fwd_bwd"
    assert r["peak_mb"] == pytest.approx(10 + 12 * 8 / world + 1.5 * 40 + 4 * 8 / world + gathered)
    assert r["state_mb"] == pytest.approx(96 / world) and r["frozen_mb"] == pytest.approx(10)


def test_measured_stages_replace_the_width_scaling():
    """Where the larger student's own stages exist, its activations are their rise at 15 pairs
    less its own fp32 gradient, not the smaller one's × the width ratio."""
    P, P1, block = 8 * MB, 16 * MB, MB
    c0 = dict(student=P, teacher=P, block=block, root=block, width=100)
    c = dict(student=P1, teacher=P1, block=block, root=block, width=300)
    g1 = 4 * P1 / MB
    own = {"stage-fwdbwd-512": stage(g1 + 10, g1 + 12), "stage-jvp-512": stage(1.0, 1.0)}
    r = cost_shard.per_rank(parts(P, act=40.0, jvp=1.0), c, c0, "bank", 512, 1, own)
    assert r["activations"] == "measured"
    assert r["stage_mb"]["student_fwd_bwd"] == pytest.approx(10 + 14 * 2 + g1)
    scaled = cost_shard.per_rank(parts(P, act=40.0, jvp=1.0), c, c0, "bank", 512, 1)
    assert scaled["stage_mb"]["student_fwd_bwd"] == pytest.approx(3 * 40 + g1)


def test_fits_are_gib():
    """A GPU of 32 GB holds 32 · 1024 MB (nvidia-smi's MiB), not one MB more."""
    P, c0 = 8 * MB, dict(student=8 * MB, teacher=8 * MB, block=MB, root=MB, width=1)
    for act, fits in ((32 * 1024 - 10 - 128, True), (32 * 1024 - 10 - 127, False)):
        r = cost_shard.per_rank(parts(P, act=act, jvp=1.0), c0, c0, "bank", 512, 1)
        assert r["fits_32gb"] is fits and r["fits_80gb"]


@pytest.fixture(scope="module")
def sizes() -> dict:
    return {m: cost_shard.counts(s) for m, s in cost_shard.MODELS.items()}


def test_world_1_is_paper_sanas_composition(sizes):
    """Unsharded at 0.6B, every variant and px: the committed cost_paper-sana peak."""
    paper = json.loads((ROOT / "bench" / "results" / "cost_paper-sana.json").read_text())
    for v in ("tbcm", "bank"):
        for px in cost_shard.RESOLUTIONS:
            r = cost_shard.per_rank(paper["parts"], sizes["0.6B"], sizes["0.6B"], v, px, 1)
            want = paper["composed"][f"{px}px_vae_batch_1"][v]["peak_mb"]
            assert r["peak_mb"] == pytest.approx(want, abs=0.5)


def test_meta_counts_match_the_released_models(sizes):
    """1.6B: 1.6 B parameters, 4 bytes each within 0.5 % of the released fp32 student; 0.6B: the
    teacher's bf16 bytes paper-sana measured, 4 bytes each within 0.5 % of its released file."""
    s16, s06 = sizes["1.6B"], sizes["0.6B"]
    assert s16["student"] == pytest.approx(1.6e9, rel=0.01)
    assert 4 * s16["student"] == pytest.approx(SPRINT_1_6B_PTH, rel=0.005)
    assert (s16["blocks"], s16["width"]) == (20, 2240)
    paper = json.loads((ROOT / "bench" / "results" / "cost_paper-sana.json").read_text())
    assert 2 * s06["teacher"] / MB == paper["parts"]["resident-tbcm"]["tensor_mb"]["teacher"]
    assert 4 * s06["student"] == pytest.approx(TEACHER_0_6B_PTH, rel=0.005)
    assert s06["student"] == s06["blocks"] * s06["block"] + s06["root"]
