"""The offline bank on digits: size and build speed per storage dtype, and its effect on training.

For each dtype a bank for the default run (2000 steps) is built and the default run is trained from
it; the fp32 bank's run is compared bit for bit with the online run (same seeds), fp16/bf16 runs by
their losses and final metrics. Writes bench/results/bank_digits.{json,md}.
    python bench/bank_storage.py         # ~12 min on 2 cores; reuses finished builds and runs
"""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import report
from config import Parser, UsageError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "fp16", "bf16")


def sh(cmd: list[str], log: Path) -> str:
    """Run a command single-threaded (fair when jobs share the CPU): its stdout, else exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {p.returncode}); see {log}")
    return p.stdout


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "log.jsonl").read_text().splitlines()]


def final_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(max((run / "checkpoints").glob("step-*")) / "tensors.safetensors")


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", default="runs/bench", help="runs and banks, reused (default: runs/bench)"
    )
    p.add_argument(
        "--results",
        default="bench/results",
        help="bank_digits.{json,md} go here (default: bench/results)",
    )
    try:
        a = p.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs, py = ROOT / a.runs, sys.executable
    online = runs / "digits-default-s0"  # bench/quality.py's default run, seed 0
    if not (online / "metrics.json").exists():
        sh([py, "train.py", "--out", str(online), "--overwrite"], online.with_suffix(".log"))
    res = {"online": json.loads((online / "metrics.json").read_text()), "banks": {}}
    for dt in DTYPES:
        bank, run = runs / f"bank-digits-{dt}", runs / f"digits-bank-{dt}"
        stats_file = bank.with_suffix(".json")
        if not stats_file.exists():  # build once: the stats of a finished build are kept beside it
            stats_file.write_text(
                sh(
                    [py, "bank.py", "build", "--out", str(bank), "--dtype", dt],
                    bank.with_suffix(".log"),
                )
                .strip()
                .splitlines()[-1]
            )
        if not (run / "metrics.json").exists():
            sh(
                [py, "train.py", "--bank", str(bank), "--out", str(run), "--overwrite"],
                run.with_suffix(".log"),
            )
        res["banks"][dt] = {
            "build": json.loads(stats_file.read_text()),
            "metrics": json.loads((run / "metrics.json").read_text()),
            "losses": losses(run),
        }
    ref, on = res["banks"]["fp32"], final_tensors(online)
    res["fp32_bank_equals_online_bitwise"] = all(
        (v == on[k]).all().item() for k, v in final_tensors(runs / "digits-bank-fp32").items()
    )
    lines = [
        "| storage | bytes/pair | build pairs/s | max rel. loss change vs fp32 | student@1 FD | "
        "student@2 FD | training s (online: {:.0f}) |".format(res["online"]["train"]["wall_s"]),
        "|---|---|---|---|---|---|---|",
    ]
    for dt, r in res["banks"].items():
        rel = max(
            abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["losses"], ref["losses"], strict=True)
        )
        r["max_rel_loss_change_vs_fp32"] = rel
        ev = r["metrics"]["eval"]
        lines.append(
            f"| {dt} | {r['build']['bytes_per_pair']:.0f} | {r['build']['pairs_per_s']:.0f} | "
            f"{rel:.2e} | {ev['student@1']['distance']:.2f} | {ev['student@2']['distance']:.2f} | "
            f"{r['metrics']['train']['wall_s']:.0f} |"
        )
    ev = res["online"]["eval"]
    lines.append(
        f"| online (no bank) | – | – | – | {ev['student@1']['distance']:.2f} | "
        f"{ev['student@2']['distance']:.2f} | {res['online']['train']['wall_s']:.0f} |"
    )
    lines.append(
        f"\nfp32 bank run == online run, bit for bit: {res['fp32_bank_equals_online_bitwise']}"
    )
    out = ROOT / a.results
    out.mkdir(parents=True, exist_ok=True)
    for r in res["banks"].values():
        del r["losses"]
    (out / "bank_digits.json").write_text(json.dumps(res, indent=1))
    report.publish(out / "bank_digits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
