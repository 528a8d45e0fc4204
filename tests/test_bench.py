"""bench/: the cost worker's JSON contract on digits (each variant in its own process), its claim lines and
bad-input errors; the quality bench's paired-seed verdicts and tables."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cost  # noqa: E402
import quality  # noqa: E402

import bank  # noqa: E402

FAST = ["--backbone", "digits", "--teacher-steps", "60", "--N", "4", "--prompts", "2", "--K", "2",
        "--pool-steps", "1", "--n-eval", "100"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """scm, tbcm and bank workers, 1 warm-up + 2 measured steps each."""
    cache = str(tmp_path_factory.mktemp("cache"))
    flags = [*FAST, "--cache-dir", cache]
    b = tmp_path_factory.mktemp("bank") / "b"
    assert bank.main(["build", "--out", str(b), "--pools", "3", *flags]) == 0
    return {"scm": cost.measure("scm", [*flags, "--method", "scm"], 2, 1),
            "tbcm": cost.measure("tbcm", flags, 2, 1),
            "bank": cost.measure("bank", [*flags, "--bank", str(b)], 2, 1)}


def test_cost_worker_contract(measured):
    """The issue's schema per variant; stage times are non-negative and (with the rest) sum to the step;
    each variant runs only its own stages."""
    for name, v in measured.items():
        assert {"time_per_pair_s", "step_s", "peak_rss_mb", "stages"} <= set(v)
        assert v["steps_measured"] == 2 and v["pairs_per_step"] == 2 * 2 * 3
        assert math.isclose(v["time_per_pair_s"] * v["pairs_per_step"], v["step_s"])
        stages = v["stages"]
        assert set(stages) == {*cost.STAGES, "student_fwd_bwd"}
        assert all(s["s_per_step"] >= 0 for s in stages.values())
        assert all(stages[s]["dynamic_mem_mb"] >= 0 for s in cost.STAGES)
        assert sum(s["s_per_step"] for s in stages.values()) >= v["step_s"] * (1 - 1e-9)
        assert sum(s["s_per_step"] for k, s in stages.items() if k != "student_fwd_bwd") <= v["step_s"]
        assert stages["jvp"]["s_per_step"] > 0 and stages["optimizer"]["s_per_step"] > 0
        assert v["peak_rss_mb"] >= v["rss_after_load_mb"] >= v["rss_floor_mb"] > 0
    assert measured["scm"]["stages"]["data"]["s_per_step"] > 0  # real data drawn
    assert measured["tbcm"]["stages"]["teacher"]["s_per_step"] > 0  # rollouts
    assert measured["bank"]["stages"]["teacher"]["s_per_step"] == 0  # no teacher at all
    assert measured["bank"]["stages"]["data"]["s_per_step"] > 0  # shards read


def test_cost_claim_lines_compare_with_the_papers_ratios():
    """At or below the paper's ratio (Tab. 3: 4640/7965 h, 22.6/62.9 GB) a claim is reproduced, above not."""
    at = {"tbcm_over_scm_time_per_pair": 4640 / 7965, "tbcm_over_scm_peak_memory": 0.37,
          "bank_over_scm_peak_memory": 0.2, "bank_over_tbcm_time_per_pair": 1.01}
    lines = cost.claim_lines(at)
    assert [line.endswith(", reproduced") for line in lines] == [True, False, True, False]
    assert lines[1] == "TBCM/sCM peak memory (Tab. 3: 0.36): measured 0.37, not reproduced at this scale"


def test_quality_verdicts_are_paired_t_intervals():
    """d = better − worse per seed; 95 % t-interval (df = n − 1) of its mean decides the verdict."""
    v = quality.verdict([10.0, 11.0, 12.5], [12.0, 13.5, 14.0])  # d = −2, −2.5, −1.5
    half = 4.303 * 0.5 / math.sqrt(3)
    assert math.isclose(v["diff"], -2.0) and v["verdict"] == "reproduced"
    assert math.isclose(v["ci95"][0], -2.0 - half) and math.isclose(v["ci95"][1], -2.0 + half)
    assert quality.verdict([10.0, 14.0, 12.0], [12.0, 11.0, 12.5])["verdict"] == "inconclusive"
    assert quality.verdict([13.0, 14.0, 15.0], [12.0, 12.5, 13.0])["verdict"] == "not reproduced"


def test_quality_write_table_and_claims(tmp_path):
    """`write` (also `--rewrite`): one row per variant and sampler, one verdict per claim and student
    sampler, the same verdicts in the JSON."""
    def v(d):
        return {smp: {"distance": [x + i for x in d], "alignment": [1.0, 1.0, 1.0], "nfe": 1}
                for i, smp in enumerate(quality.SAMPLERS)}

    summary = {"table": "r_schedule", "backbone": "digits", "seeds": [0, 1, 2], "extra_flags": [],
               "distance_name": "fd", "floor": 1.0,
               "variants": {"warmup to r_final": v([12.0, 13.5, 14.0]), "warmup-cooldown": v([10.0, 11.0, 12.5])}}
    quality.write(summary, tmp_path)
    md = (tmp_path / "quality_digits_r_schedule.md").read_text().splitlines()
    assert sum(line.startswith("| warmup") for line in md) == 2 * len(quality.SAMPLERS)
    verdicts = [line for line in md if "paired seeds" in line]
    assert len(verdicts) == 2 and all(": reproduced (difference -2.00" in line for line in verdicts)
    saved = json.loads((tmp_path / "quality_digits_r_schedule.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == ["reproduced", "reproduced"]


@pytest.mark.parametrize("args", [["--sweep", "256,abc"], ["--sweep", "512"], ["--sweep", "256,500"],
                                  ["--pretrained", "/nonexistent/pipeline"],
                                  ["--config", "digits", "--pretrained", "."]])
def test_cost_bad_input_is_one_line_exit_2(args, tmp_path):
    """Bad flags stop before anything is built: exit 2, one line naming the flag, no work folder."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "cost.py"), *args, "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("cost.py: error: --")
    assert not (tmp_path / "w").exists()
