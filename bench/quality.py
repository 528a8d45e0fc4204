"""Quality of TBCM vs the sCM baseline and the paper's ablations on a toy backbone (Tabs. 2, 4–7 analogues).

Each variant × seed is one `python train.py` process; the script gathers their metrics.json into JSON and a
markdown table (mean ± std over seeds of distance and alignment for teacher@N and student@1/2/4).
    python bench/quality.py --table main --seeds 0 1 2          # TBCM vs sCM (Tab. 2 analogue)
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {  # variant name → extra train.py flags
    # sCM with Sana-Sprint's P_mean 0.2 and with −0.8 (more pairs near the data, suggested for 8×8 data)
    "main": {"TBCM": ["--method", "tbcm"],
             "sCM P_mean 0.2": ["--method", "scm", "--P-mean", "0.2"],
             "sCM P_mean -0.8": ["--method", "scm", "--P-mean", "-0.8"]},
    "schemes": {s: ["--scheme", s] for s in ("random", "logit_normal", "reference")},  # Tab. 4
    "steps": {f"N={n}": ["--N", str(n)] for n in (8, 12, 16, 20)},  # Tab. 5
    "r_final": {f"r_final={r}": ["--r-final", str(r)] for r in (0.5, 0.75, 1.0)},  # Tab. 6
    # Tab. 7: "warm-up to r_final" = the cool-down spans the warm-up (S_r = 0, T_r = H = 500, digits' H),
    # so r rises from 0 and ends at r_final at step H; "warm-up–cool-down" = up to 1, later down to r_final.
    "r_schedule": {"warmup to r_final": ["--S-r", "0", "--T-r", "500"], "warmup-cooldown": []},
}
SAMPLERS = ("teacher@N", "student@1", "student@2", "student@4")


def run_variant(backbone: str, name: str, flags: list[str], seed: int, runs: Path, extra: list[str]) -> dict:
    """One train.py process; returns its metrics.json (reused if the run already finished)."""
    out = runs / f"{backbone}-{name.replace(' ', '_').replace('=', '')}-s{seed}"
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, "train.py", "--backbone", backbone, "--seed", str(seed), "--out", str(out),
               "--overwrite", *flags, *extra]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((out / "metrics.json").read_text())


def mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", choices=sorted(TABLES), default="main")
    p.add_argument("--backbone", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--results", default="bench/results")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more train.py flags after --")
    a = p.parse_args()
    extra = [x for x in a.extra if x != "--"]
    variants = TABLES[a.table]
    res = {name: [run_variant(a.backbone, name, f, s, ROOT / a.runs, extra) for s in a.seeds]
           for name, f in variants.items()}
    floor = [m["eval"]["data"]["distance"] for ms in res.values() for m in ms]
    dname = next(iter(res.values()))[0]["eval"]["distance_name"]
    summary = {"table": a.table, "backbone": a.backbone, "seeds": a.seeds, "extra_flags": extra,
               "distance_name": dname, "floor": statistics.mean(floor), "variants": {}}
    lines = [f"| variant | sampler | {dname} ↓ | alignment ↑ | NFE |", "|---|---|---|---|---|"]
    for name, ms in res.items():
        summary["variants"][name] = {"steps": ms[0]["train"]["steps"], "wall_s": [m["train"]["wall_s"] for m in ms]}
        for smp in SAMPLERS:
            d = [m["eval"][smp]["distance"] for m in ms]
            al = [m["eval"][smp]["alignment"] for m in ms]
            summary["variants"][name][smp] = {"distance": d, "alignment": al}
            lines.append(f"| {name} | {smp} | {mean_std(d)} | {mean_std(al)} | {ms[0]['eval'][smp]['nfe']} |")
    lines.append(f"| real data (floor) | – | {summary['floor']:.3f} | – | – |")
    out = ROOT / a.results
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{a.backbone}_{a.table}.json").write_text(json.dumps(summary, indent=1))
    (out / f"quality_{a.backbone}_{a.table}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
