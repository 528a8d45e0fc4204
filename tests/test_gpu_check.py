"""bench/gpu_check.py: the device choice, the verdict against the paper-shape predictions, bad
flags, and its CPU mode end to end on the tiny pipeline (every variant, torchrun, the exported
student sampled in SanaSprintPipeline), the mode that keeps its GPU path from rotting."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check
import pytest


def test_plan_one_process_per_gpu_or_the_tiny_pipeline():
    """Every visible GPU, each process seeing only its own; the CPU without CUDA or with --tiny."""
    gpus = gpu_check.plan(tiny=False, cuda=True, n_gpus=2)
    assert gpus["devices"] == ["cuda:0", "cuda:1"] and not gpus["tiny"]
    assert gpus["env"] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    for where in (gpu_check.plan(False, False, 0), gpu_check.plan(True, True, 8)):
        assert where["tiny"] and where["devices"] == ["cpu"] and where["env"] == [{}]
    assert "is_available() is False" in gpu_check.plan(False, False, 0)["why"]


def test_verdict_is_measured_over_predicted():
    """A verdict line per device: memory and time as measured / predicted; n/a without them."""
    got = {"cuda:0": dict(peak_mb=9000.0, memory="cuda_peak_mb", step_s=2.0)}
    (line,) = gpu_check.verdict("tbcm", got, dict(peak_mb=18000.0, step_s=1000.0), "cpu_s on cpu")
    assert "memory 0.50 (18000 MB)" in line and "time 0.002 (1000.0 s, cpu_s on cpu)" in line
    (line,) = gpu_check.verdict("tbcm", got, None, "")
    assert line.endswith(gpu_check.NA)
    (line,) = gpu_check.verdict("scm", {"cpu": {"error": "exit 1: a\nboom"}}, None, "")
    assert line.endswith("FAILED: boom")


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--resolution", "768"], ["--step", "2"]])
def test_bad_flag_exits_2_with_one_line(flag, capsys, tmp_path):
    assert gpu_check.main([*flag, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_cpu_mode_runs_every_variant_end_to_end(tmp_path, capsys):
    """--tiny: the bank built, each variant's steps measured, TBCM under torchrun exported and its
    student sampled at 1 and 2 steps to finite images; the JSON holds it all; exit 0."""
    out = tmp_path / "gpu_check.json"
    argv = ["--tiny", "--steps", "1", "--warmup", "0", "--work", str(tmp_path / "work")]
    argv += ["--json", str(out), "--", "--n-eval", "2", "--eval-teacher-steps", "2"]
    assert gpu_check.main(argv) == 0, capsys.readouterr()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gpu_check: the tiny pipeline on CPU (--tiny)")
    res = json.loads(out.read_text())
    assert list(res) == ["config", "predictions", "bank_build", "variants", "export", "ok"]
    assert res["ok"] and res["predictions"] == gpu_check.NA and res["config"]["devices"] == ["cpu"]
    assert list(res["variants"]) == ["scm", "tbcm", "bank", "tbcm-lora", "bank-lora"]
    for v, got in res["variants"].items():
        m = got["by_device"]["cpu"]
        assert got["predicted"] is None and m["peak_mb"] > 0 and m["step_s"] > 0, v
        assert any(line.startswith(v) and gpu_check.NA in line for line in printed), v
    export = res["export"]
    assert export["ok"] and export["processes"] == 1
    assert export["samples"] == {k: dict(shape=[1, 3, 64, 64], finite=True) for k in ("1", "2")}
    assert (Path(export["run"]) / "student" / "model_index.json").is_file()
    assert printed[-1] == f"gpu_check: ok; {out}"
