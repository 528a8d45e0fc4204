"""Quality of TBCM vs the sCM baseline and the paper's ablations on a toy backbone (Tabs. 2, 4–7).

Each variant × seed is one `python train.py` process; the script gathers their metrics.json into
JSON and a markdown table (mean ± std over seeds of distance and alignment for teacher@N and
student@1/2/4), with a paired-seed verdict per claim of the paper.
    python bench/quality.py --table main --seeds 0 1 2          # TBCM vs sCM (Tab. 2 analogue)
"""

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, Parser, UsageError, parse_args, validate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = asdict(Config())  # the defaults name the shared default run


def sweep(field: str, flag: str, values: tuple, fmt: str) -> dict[str, list[str]]:
    """One variant per value; the default value adds no flag: its runs are shared across tables."""
    return {fmt.format(v): [] if v == DEFAULT[field] else [flag, str(v)] for v in values}


TABLES = {  # variant name → extra train.py flags
    # sCM with Sana-Sprint's P_mean 0.2 and with −0.8 (more pairs near the data, suggested for 8×8)
    "main": {
        "TBCM": [],
        "sCM P_mean 0.2": ["--method", "scm", "--P-mean", "0.2"],
        "sCM P_mean -0.8": ["--method", "scm", "--P-mean", "-0.8"],
    },
    "schemes": sweep("scheme", "--scheme", ("random", "logit_normal", "reference"), "{}"),  # Tab. 4
    "steps": sweep("N", "--N", (8, 12, 16, 20), "N={}"),  # Tab. 5
    "r_final": sweep("r_final", "--r-final", (0.5, 0.75, 1.0), "r_final={}"),  # Tab. 6
    # Tab. 7: r rises linearly to r_final over H steps and stays, vs up to 1, later down to r_final
    "r_schedule": {"warmup to r_final": ["--r-direct"], "warmup-cooldown": []},
}
# the paper's claims per table: (claim, better variant, worse variant), checked at 1 and 2 steps
CLAIMS = {
    "main": [("TBCM beats sCM at equal steps and pairs (Tab. 2)", "TBCM", "sCM P_mean 0.2")],
    "schemes": [
        ("reference route beats logit-normal (Tab. 4)", "reference", "logit_normal"),
        ("logit-normal beats random (Tab. 4)", "logit_normal", "random"),
    ],
    "steps": [
        ("N = 20 beats N = 8 (Tab. 5)", "N=20", "N=8"),
        ("N = 16 beats N = 12 (Tab. 5)", "N=16", "N=12"),
    ],
    "r_final": [
        ("r_final 0.75 beats 0.5 (Tab. 6)", "r_final=0.75", "r_final=0.5"),
        ("r_final 0.75 beats 1.0 (Tab. 6)", "r_final=0.75", "r_final=1.0"),
    ],
    "r_schedule": [
        (
            "warm-up–cool-down beats warm-up to r_final (Tab. 7)",
            "warmup-cooldown",
            "warmup to r_final",
        )
    ],
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def verdict(better: list[float], worse: list[float]) -> dict:
    """Paired by seed (same teacher, same evaluation noise): d = better − worse, the 95 % t-interval
    of its mean. Below 0 throughout: reproduced; above 0: not reproduced (the opposite holds); else
    inconclusive."""
    d = [b - w for b, w in zip(better, worse, strict=True)]
    m = statistics.mean(d)
    half = T975[len(d) - 1] * statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf")
    lo, hi = m - half, m + half
    word = "reproduced" if hi < 0 else "not reproduced" if lo > 0 else "inconclusive"
    return {"diff": m, "ci95": [lo, hi], "verdict": word}


SAMPLERS = ("teacher@N", "student@1", "student@2", "student@4")


def run_dir(backbone: str, flags: list[str], seed: int, runs: Path) -> Path:
    """Named by the flags, not the variant: identical runs (the default) are shared by tables."""
    tag = "_".join(f.lstrip("-").replace("-", "_") for f in flags) or "default"
    return runs / f"{backbone}-{tag}-s{seed}"


def run_variant(backbone: str, flags: list[str], seed: int, runs: Path) -> dict:
    """One train.py process (one thread: --jobs processes share the cores fairly); its metrics."""
    out = run_dir(backbone, flags, seed, runs)
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, "train.py", "--backbone", backbone, "--seed", str(seed)]
        cmd += ["--out", str(out), "--overwrite", *flags]
        log = out.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        if proc.returncode:
            sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return json.loads((out / "metrics.json").read_text())


def mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n")[0], epilog="after --: more train.py flags, for all")
    add = p.add_argument
    add("--table", choices=sorted(TABLES), default="main", help="which table (default: main)")
    add("--backbone", default="digits", help="train.py --backbone (default: digits)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py --seed (default: 0 1 2)")
    add("--runs", default="runs/bench", help="run folders, reused (default: runs/bench)")
    add("--results", default="bench/results", help="JSON and markdown (default: bench/results)")
    add(
        "--jobs", type=int, default=2, help="train.py processes at once, 1 thread each (default: 2)"
    )
    add(
        "--rewrite",
        action="store_true",
        help="no training: the table's markdown and verdicts "
        "again from its JSON in --results (default: off)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, extra = parser().parse_before_dashes(argv)
        path = ROOT / a.results / f"quality_{a.backbone}_{a.table}.json"
        if a.rewrite and not path.exists():
            raise UsageError(f"--rewrite: {path} does not exist (run the table first)")
        if a.jobs < 1:
            raise UsageError("--jobs must be >= 1")
        validate(parse_args(["--backbone", a.backbone, *extra]), run_dir=False)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.rewrite:
        write(json.loads(path.read_text()), path.parent)
        return 0
    variants = TABLES[a.table]
    jobs = [(name, [*f, *extra], s) for name, f in variants.items() for s in a.seeds]
    runs = ROOT / a.runs
    # the first run alone: it trains and caches the teacher the others then load
    first = run_variant(a.backbone, jobs[0][1], jobs[0][2], runs)
    with ThreadPoolExecutor(a.jobs) as pool:
        rest = list(pool.map(lambda j: run_variant(a.backbone, j[1], j[2], runs), jobs[1:]))
    res: dict[str, list[dict]] = {name: [] for name in variants}
    for (name, _, _), m in zip(jobs, [first, *rest], strict=True):
        res[name].append(m)
    floor = [m["eval"]["data"]["distance"] for ms in res.values() for m in ms]
    dname = next(iter(res.values()))[0]["eval"]["distance_name"]
    summary = {
        "table": a.table,
        "backbone": a.backbone,
        "seeds": a.seeds,
        "extra_flags": extra,
        "distance_name": dname,
        "floor": statistics.mean(floor),
        "variants": {},
    }
    for name, ms in res.items():
        v = summary["variants"][name] = {"steps": ms[0]["train"]["steps"]}
        v["wall_s"] = [m["train"]["wall_s"] for m in ms]
        for smp in SAMPLERS:
            v[smp] = {
                "distance": [m["eval"][smp]["distance"] for m in ms],
                "alignment": [m["eval"][smp]["alignment"] for m in ms],
                "nfe": ms[0]["eval"][smp]["nfe"],
            }
    write(summary, ROOT / a.results)
    return 0


def teacher_nfe(summary: dict) -> int:
    """teacher@N's network evaluations (2 per step: CFG), for summaries older than their `nfe`."""
    cfg = parse_args(["--backbone", summary["backbone"], *summary["extra_flags"]])
    return 2 * cfg.eval_teacher_steps


def write(summary: dict, out: Path) -> None:
    """The markdown table and one verdict per claim (also into the JSON) from a summary."""
    table, n = summary["table"], len(summary["seeds"])
    lines = [
        f"| variant | sampler | {summary['distance_name']} ↓ | alignment ↑ | NFE |",
        "|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        for smp in SAMPLERS:
            teacher = smp == "teacher@N"
            nfe = (v[smp].get("nfe") or teacher_nfe(summary)) if teacher else int(smp[-1])
            d, al = mean_std(v[smp]["distance"]), mean_std(v[smp]["alignment"])
            lines.append(f"| {name} | {smp} | {d} | {al} | {nfe} |")
    lines.append(f"| real data (floor) | – | {summary['floor']:.3f} | – | – |")
    summary["claims"] = []
    for claim, better, worse in CLAIMS.get(table, []):
        for smp in ("student@1", "student@2"):
            b, w = (summary["variants"][x][smp]["distance"] for x in (better, worse))
            v = verdict(b, w)
            summary["claims"].append({"claim": claim, "sampler": smp, **v})
            lines.append(
                f"\n{claim}, {smp}: {v['verdict']} (difference {v['diff']:+.2f}, 95 % CI "
                f"[{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] over {n} paired seeds)"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{summary['backbone']}_{table}.json").write_text(json.dumps(summary, indent=1))
    (out / f"quality_{summary['backbone']}_{table}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
