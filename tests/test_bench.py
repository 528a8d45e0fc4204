"""bench/: the cost step composed from pairs, loss and the optimiser is train.train's step bit for
bit; the cost worker's JSON contract on digits (each variant in its own process), its claim lines
and bad-input errors; the quality bench's paired-seed verdicts and tables."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cost
import cost_report
import cost_step
import cost_worker
import numpy as np
import pytest
import quality
import quality_report
import torch

import backbones
import bank
import train
from config import parse_args
from pairs import SCMPairs, TBCMPairs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--backbone", "digits", "--teacher-steps", "60", "--N", "4", "--prompts", "2", "--K", "2"]
FAST += ["--pool-steps", "1", "--n-eval", "100"]
# the stages each variant runs (Fig. 4): the bank has no teacher, no text encoder, and digits no VAE
RUNS = {"tbcm": {"data", "text_encode", "teacher", "jvp", "student_fwd_bwd", "optimizer"}}
RUNS |= {"scm": RUNS["tbcm"], "bank": {"data", "jvp", "student_fwd_bwd", "optimizer"}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, cache) -> Path:
    """A bank of 3 pools: 1 warm-up + 2 measured steps, or the 3 steps of train.train."""
    b = tmp_path_factory.mktemp("bank") / "b"
    assert bank.main(["build", "--out", str(b), "--pools", "3", *FAST, "--cache-dir", cache]) == 0
    return b


def variant_flags(variant: str, bank_dir: Path) -> list[str]:
    return {"tbcm": [], "scm": ["--method", "scm"], "bank": ["--bank", str(bank_dir)]}[variant]


def assert_train_step_bit_for_bit(cfg, run: Path) -> set[str]:
    """3 steps of cost_step.train_steps (every stage timed) give train.train's student and EMA after
    3 steps exactly (torch.equal), having trained (the student moved from its start). Returns the
    stages that ran."""
    stages = cost_step.Stages(cfg.device)
    try:
        student, source = cost_step.build(cfg, stages)
        mine, _ = cost_step.train_steps(cfg, student, source, stages, steps=3, warmup=0)
    finally:
        stages.close()
    if cfg.bank:
        ref_source = bank.BankPairs(cfg)
        ref, start = ref_source.student(), ref_source.student()
    else:
        teacher = backbones.build(cfg)
        ref, start = teacher.student(), teacher.student()
        ref_source = (TBCMPairs if cfg.method == "tbcm" else SCMPairs)(cfg, teacher)
    run.mkdir()
    ema, st = train.train(cfg, ref, ref_source, run)
    assert st["step"] == 3 and st["nan_skipped"] == 0
    for a, b in ((mine["student"], ref), (mine["ema"], ema)):
        a, b = a.state_dict(), b.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = mine["student"].state_dict()
    assert not all(torch.equal(v, moved[k]) for k, v in start.state_dict().items())
    return set(stages.time)


@pytest.mark.parametrize("variant", ["tbcm", "scm", "bank"])
def test_cost_step_is_train_step_bit_for_bit(variant, cache, bank_dir, tmp_path):
    """Digits: the composed, timed step is train.train's (see assert_train_step_bit_for_bit); each
    variant runs only its own stages."""
    argv = [*FAST, "--cache-dir", cache, "--steps", "3", "--out", str(tmp_path / "run")]
    cfg = parse_args([*argv, *variant_flags(variant, bank_dir)])
    assert assert_train_step_bit_for_bit(cfg, tmp_path / "run") == RUNS[variant]


@pytest.mark.parametrize("variant", ["tbcm", "bank"])
def test_cost_step_accumulates_as_train_step_bit_for_bit(variant, cache, bank_dir, tmp_path):
    """--accum-steps 3: the composed step runs its JVP and forward+backward per micro-batch as
    train.train does (each kept pair over the whole step's count), the same students exactly."""
    argv = [*FAST, "--cache-dir", cache, "--steps", "3", "--out", str(tmp_path / "run")]
    cfg = parse_args([*argv, "--accum-steps", "3", *variant_flags(variant, bank_dir)])
    assert assert_train_step_bit_for_bit(cfg, tmp_path / "run") == RUNS[variant]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tbcm", "scm"])
def test_cost_step_is_train_step_bit_for_bit_on_sana(method, tmp_path_factory, tmp_path):
    """Sana (tiny pipeline): the same, with every prompt encoded afresh and, for sCM, images read
    and DC-AE-encoded as SanaTeacher.real_data does (the same draws, the same latents)."""
    from PIL import Image

    root = tmp_path_factory.getbasetemp() / "sana-inputs"
    if not root.exists():
        (root / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i, caption in enumerate(["a red cat", "a green tree", "noise"]):
            pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"im{i}.png")
            (root / "images" / f"im{i}.txt").write_text(caption + "\n", encoding="utf-8")
    images = ["--images", str(root / "images")] if method == "scm" else []
    argv = ["--backbone", "sana", "--tiny", "--N", "4", "--K", "2", "--prompts", "2"]
    argv += ["--cache-dir", str(root / "cache"), "--steps", "3", "--out", str(tmp_path / "run")]
    cfg = parse_args([*argv, "--method", method, *images])
    ran = assert_train_step_bit_for_bit(cfg, tmp_path / "run")
    assert ran == RUNS["tbcm"] | ({"vae_encode"} if method == "scm" else set())


def test_stages_time_only_when_active_and_do_not_nest():
    """A stage adds its block's wall time once `active`; a stage inside another is an error."""
    stages = cost_step.Stages("cpu")
    try:
        with stages("data"):
            time.sleep(0.01)
        assert not stages.time
        stages.active = True
        with stages("data"):
            time.sleep(0.01)
        assert stages.time["data"] >= 0.01 and stages.mem["data"] >= 0
        with pytest.raises(RuntimeError, match="inside"), stages("jvp"), stages("teacher"):
            pass
        assert set(stages.time) == {"data", "jvp"}
    finally:
        stages.close()


@pytest.fixture(scope="module")
def measured(cache, bank_dir):
    """scm, tbcm and bank workers, 1 warm-up + 2 measured steps each (and the memory runs)."""
    flags = [*FAST, "--cache-dir", cache]
    return {v: cost.measure(v, [*flags, *variant_flags(v, bank_dir)], 2, 1) for v in RUNS}


def test_cost_worker_contract(measured):
    """The issue's schema per variant; the stages and the rest of the step (`other`, no stage)
    sum to the step, every stage's time fits inside it; each variant runs only its own stages."""
    for name, v in measured.items():
        assert {"time_per_pair_s", "step_s", "peak_rss_mb", "stages"} <= set(v)
        assert v["steps_measured"] == 2 and v["pairs_per_step"] == 2 * 2 * 3
        assert math.isclose(v["time_per_pair_s"] * v["pairs_per_step"], v["step_s"])
        stages = v["stages"]
        assert list(stages) == [*cost_step.STAGES, "other"]
        assert all(s["s_per_step"] >= 0 for s in stages.values())  # `other` too
        assert math.isclose(sum(s["s_per_step"] for s in stages.values()), v["step_s"])
        assert all(stages[s]["dynamic_mem_mb"] >= 0 for s in cost_step.STAGES)
        assert stages["other"]["dynamic_mem_mb"] is None
        ran = {s for s in cost_step.STAGES if stages[s]["s_per_step"] > 0}
        assert ran == RUNS[name], name
        assert v["peak_rss_mb"] >= v["rss_after_load_mb"] >= v["rss_floor_mb"] > 0
    rows = cost_report.table(measured).splitlines()
    assert len(rows) == 6 + len(cost_step.STAGES) + 1 and rows[-1].startswith("| other: ")


def test_cost_claim_lines_compare_with_the_papers_ratios():
    """At or below the paper's ratio (Tab. 3: 4640/7965 h, 22.6/62.9 GB) a claim is reproduced."""
    at = {
        "tbcm_over_scm_time_per_pair": 4640 / 7965,
        "tbcm_over_scm_peak_memory": 0.37,
        "bank_over_scm_peak_memory": 0.2,
        "bank_over_tbcm_time_per_pair": 1.01,
    }
    lines = cost_report.claim_lines(at)
    assert [line.endswith(", reproduced") for line in lines] == [True, False, True, False]
    want = "TBCM/sCM peak memory (Tab. 3: 0.36): measured 0.37, not reproduced at this scale"
    assert lines[1] == want


def test_quality_verdicts_are_paired_t_intervals():
    """d = better − worse per seed; 95 % t-interval (df = n − 1) of its mean decides the verdict."""
    v = quality_report.verdict([10.0, 11.0, 12.5], [12.0, 13.5, 14.0])  # d = −2, −2.5, −1.5
    half = 4.303 * 0.5 / math.sqrt(3)
    assert math.isclose(v["diff"], -2.0) and v["verdict"] == "reproduced"
    assert math.isclose(v["ci95"][0], -2.0 - half) and math.isclose(v["ci95"][1], -2.0 + half)
    assert (
        quality_report.verdict([10.0, 14.0, 12.0], [12.0, 11.0, 12.5])["verdict"] == "inconclusive"
    )
    assert (
        quality_report.verdict([13.0, 14.0, 15.0], [12.0, 12.5, 13.0])["verdict"]
        == "not reproduced"
    )


def test_quality_write_table_and_claims(tmp_path):
    """`write` (also `--rewrite`): one row per variant and sampler, one verdict per claim and
    student sampler, the same verdicts in the JSON."""

    def v(d):
        return {
            smp: {"distance": [x + i for x in d], "alignment": [1.0, 1.0, 1.0], "nfe": 1}
            for i, smp in enumerate(quality_report.SAMPLERS)
        }

    summary = {
        "table": "r_schedule",
        "backbone": "digits",
        "seeds": [0, 1, 2],
        "extra_flags": [],
        "distance_name": "fd",
        "floor": 1.0,
        "variants": {
            "warmup to r_final": v([12.0, 13.5, 14.0]),
            "warmup-cooldown": v([10.0, 11.0, 12.5]),
        },
    }
    quality_report.write(summary, tmp_path)
    md = (tmp_path / "quality_digits_r_schedule.md").read_text().splitlines()
    assert sum(line.startswith("| warmup") for line in md) == 2 * len(quality_report.SAMPLERS)
    verdicts = [line for line in md if "paired seeds" in line]
    assert len(verdicts) == 2 and all(": reproduced (difference -2.00" in line for line in verdicts)
    saved = json.loads((tmp_path / "quality_digits_r_schedule.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == ["reproduced", "reproduced"]
    # the wide form (the lora table's docs block): a row per variant, 1/2/4 steps
    wide = quality_report.wide(saved).splitlines()
    assert wide[0] == "| variant | student@1 | student@2 | student@4 |"
    assert wide[2] == "| warmup to r_final | 14.167 ± 1.041 | 15.167 ± 1.041 | 16.167 ± 1.041 |"
    assert "teacher@N 13.167 ± 1.041" in wide[5] and "seeds 0, 1, 2" in wide[5]
    assert wide[7:] == [line for line in md if "paired seeds" in line]


def test_quality_seeds_to_resolve():
    """An inconclusive claim names the fewest seeds whose interval would exclude 0 at the observed
    mean difference and spread (d = −1, −3, +1: mean −1, sd 2)."""
    v = quality_report.verdict([9.0, 7.0, 11.0], [10.0, 10.0, 10.0])
    k = v["seeds_to_resolve"]
    assert v["verdict"] == "inconclusive" and k > 3
    assert quality_report.half_width(2.0, k) < 1 <= quality_report.half_width(2.0, k - 1)
    assert quality_report.T975[30] == 2.042 and quality_report.half_width(2.0, 100) < 0.42
    assert "seeds_to_resolve" not in quality_report.verdict([1.0, 2.0, 3.0], [3.0, 4.5, 5.0])


def fake_metrics(distance: float) -> dict:
    ev = {smp: {"distance": distance, "alignment": 1.0, "nfe": 1} for smp in quality.SAMPLERS}
    ev |= {"data": {"distance": 5.0}, "distance_name": "fd"}
    return {"train": {"steps": 10, "wall_s": 1.0}, "eval": ev}


def test_quality_more_seeds_keep_the_old_ones(tmp_path, monkeypatch):
    """Seeds in the table's JSON are not trained again; new seeds join them in seed order."""
    trained = []

    def run_variant(backbone, flags, seed, runs):
        trained.append((tuple(flags), seed))
        return fake_metrics(10.0 + seed + 5 * ("--method" in flags))

    monkeypatch.setattr(quality, "run_variant", run_variant)
    argv = ["--table", "r_schedule", "--results", str(tmp_path), "--runs", str(tmp_path / "r")]
    assert quality.main([*argv, "--seeds", "0", "2"]) == 0
    assert len(trained) == 4
    trained.clear()
    assert quality.main([*argv, "--seeds", "0", "1", "2"]) == 0
    assert sorted(seed for _, seed in trained) == [1, 1]  # one new seed per variant
    d = json.loads((tmp_path / "quality_digits_r_schedule.json").read_text())
    assert d["seeds"] == [0, 1, 2]
    assert d["variants"]["warmup-cooldown"]["student@1"]["distance"] == [10.0, 11.0, 12.0]


def test_quality_first_run_to_train_runs_alone(tmp_path, monkeypatch):
    """The first run that trains runs before the others start (it caches the teacher they load),
    also when the table's first run is already finished."""
    spans = []

    def run_variant(backbone, flags, seed, runs):
        out = quality.run_dir(backbone, flags, seed, runs) / "metrics.json"
        if out.exists():
            return json.loads(out.read_text())
        start = time.monotonic()
        time.sleep(0.2)
        spans.append((start, time.monotonic()))
        return fake_metrics(10.0 + seed)

    monkeypatch.setattr(quality, "run_variant", run_variant)
    runs = tmp_path / "r"
    first = quality.run_dir("digits", quality.TABLES["r_schedule"]["warmup to r_final"], 0, runs)
    first.mkdir(parents=True)
    (first / "metrics.json").write_text(json.dumps(fake_metrics(10.0)))
    argv = ["--table", "r_schedule", "--results", str(tmp_path), "--runs", str(runs)]
    assert quality.main([*argv, "--seeds", "0", "1"]) == 0
    spans.sort()
    assert len(spans) == 3 and spans[0][1] <= min(s for s, _ in spans[1:])
    assert spans[1][0] < spans[2][1] and spans[2][0] < spans[1][1]  # the rest run side by side


def test_quality_refuses_a_run_folder_in_use(tmp_path, monkeypatch, capsys):
    """While one quality.py trains in a run folder, another on that folder exits 2 with one line
    (naming the holder's pid) and trains nothing; once the first is done, the second runs."""
    monkeypatch.setattr(quality, "run_variant", lambda *a: fake_metrics(10.0))
    runs = tmp_path / "r"
    argv = ["--table", "r_schedule", "--seeds", "0", "--results", str(tmp_path)]
    argv += ["--runs", str(runs)]
    with quality.lock(runs):
        assert quality.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "--runs" in lines[0]
        assert not (tmp_path / "quality_digits_r_schedule.json").exists()
    assert quality.main(argv) == 0
    assert (tmp_path / "quality_digits_r_schedule.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--sweep", "256,abc"],
        ["--sweep", "512"],
        ["--sweep", "256,500"],
        ["--pretrained", "/nonexistent/pipeline"],
        ["--config", "digits", "--pretrained", "."],
        ["--config", "digits", "--resolution", "64"],
        ["--steps", "0"],
        ["--config", "digits", "--", "--N", "1"],
    ],
)
def test_cost_bad_input_is_one_line_exit_2(args, tmp_path):
    """Bad flags (the script's own, or train.py's after --) stop before anything is built: exit 2,
    one line naming the flag, no work folder."""
    cut = args.index("--") if "--" in args else len(args)
    argv = [*args[:cut], "--work", str(tmp_path / "w"), *args[cut:]]
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost.py"), *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --"), p.stderr
    assert not (tmp_path / "w").exists()


def test_worker_and_quality_bad_input_exit_2(tmp_path, capsys):
    """The worker and quality.py refuse bad values the same way: exit 2, one `error: --…` line."""
    assert cost_worker.main(["--steps", "0", "--", *FAST]) == 2
    assert quality.main(["--rewrite", "--results", str(tmp_path)]) == 2
    assert quality.main(["--table", "main", "--", "--lr", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: --") for line in err), err
