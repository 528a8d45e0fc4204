"""Quality of TBCM vs the sCM baseline and the paper's ablations on a toy backbone (Tabs. 2, 4–7).

Each variant × seed is one `python train.py` process; the script gathers their metrics.json into
JSON and a markdown table (mean ± std over seeds of distance and alignment for teacher@N and
student@1/2/4), with a paired-seed verdict per claim of the paper (bench/quality_report.py). Seeds
already in the table's JSON are kept, so more seeds cost only their own runs.
    python bench/quality.py --table main --seeds 0 1 2          # TBCM vs sCM (Tab. 2 analogue)
"""

import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality_report import SAMPLERS, write

from config import RANGES, Config, Parser, UsageError, parse_args, validate

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
    # the official configs' CAME against AdamW (optimizers.py): AdamW at 3e-5 and 1e-4, CAME from
    # 3e-6 (the TBCM code's effective 1e-5·sqrt(32/256)) to 1e-4
    "optimizer": {
        f"{name} lr {lr}": [*flags, *(["--lr", lr] if lr != "3e-5" else [])]
        for name, flags, lrs in (
            ("AdamW", [], ("3e-5", "1e-4")),
            ("CAME", ["--optimizer", "came"], ("3e-6", "1e-5", "3e-5", "1e-4")),
        )
        for lr in lrs
    },
    # ours: the LoRA student (lora.py) against the full copy, same pairs and steps; also at the
    # larger learning rates adapters usually train at: for all that trains (--lr) or for the
    # adapter alone (--lora-lr; the guidance embedding and logvar head stay at 3e-5)
    "lora": {"full": []}
    | {f"LoRA r{r}": ["--student", "lora", "--lora-rank", str(r)] for r in (4, 16, 64)}
    | {
        f"LoRA r{r} {which} {lr}": ["--student", "lora", "--lora-rank", str(r), flag, lr]
        for which, flag in (("lr", "--lr"), ("adapter lr", "--lora-lr"))
        for r in (16, 64)
        for lr in ("1e-4", "3e-4")
    },
}


def run_dir(backbone: str, flags: list[str], seed: int, runs: Path) -> Path:
    """Named by the flags, not the variant: identical runs (the default) are shared by tables."""
    tag = "_".join(f.lstrip("-").replace("-", "_") for f in flags) or "default"
    return runs / f"{backbone}-{tag}-s{seed}"


def done(backbone: str, flags: list[str], seed: int, runs: Path) -> bool:
    return (run_dir(backbone, flags, seed, runs) / "metrics.json").exists()


def kept(before: dict | None, extra: list[str], name: str, seed: int) -> dict | None:
    """A run's metrics as far as the table needs them, from the table's earlier JSON (same extra
    flags): more seeds can be added without training the old ones again. None if absent."""
    if before is None or before["extra_flags"] != extra or seed not in before["seeds"]:
        return None
    if name not in before["variants"]:
        return None
    i, v = before["seeds"].index(seed), before["variants"][name]
    ev = {smp: {q: v[smp][q][i] for q in ("distance", "alignment")} for smp in SAMPLERS}
    for smp in SAMPLERS:
        ev[smp]["nfe"] = v[smp].get("nfe")
    ev |= {"data": {"distance": before["floor"]}, "distance_name": before["distance_name"]}
    return {"train": {"steps": v["steps"], "wall_s": v["wall_s"][i]}, "eval": ev}


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


@contextlib.contextmanager
def lock(runs: Path):
    """Hold runs/.quality.lock while training: two quality.py on one run folder would train the same
    runs over each other. The lock goes with the process (flock), also when it is killed."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / ".quality.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UsageError(
                f"another bench/quality.py (pid {f.read().strip() or '?'}) is training in {runs};"
                " wait for it or pass another --runs"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n")[0], epilog="after --: more train.py flags, for all")
    add = p.add_argument
    add("--table", choices=sorted(TABLES), default="main", help="which table (default: main)")
    add("--backbone", default="digits", help="train.py --backbone (default: digits)")
    seeds = "train.py --seed (default: 0 1 2)"
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], within=RANGES["seed"], help=seeds)
    add("--runs", default="runs/bench", help="run folders, reused (default: runs/bench)")
    add("--results", default="bench/results", help="JSON and markdown (default: bench/results)")
    add(
        "--jobs",
        type=int,
        default=2,
        within=">= 1",
        help="train.py processes at once, 1 thread each (default: 2)",
    )
    add(
        "--rewrite",
        action="store_true",
        help="no training: the table's markdown and verdicts "
        "again from its JSON in --results (default: off)",
    )
    add(
        "--readme",
        action="store_true",
        help="also replace the table's block in its docs page, docs/results.md or docs/lora.md "
        "(default: off)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, extra = parser().parse_before_dashes(argv)
        path = ROOT / a.results / f"quality_{a.backbone}_{a.table}.json"
        if a.rewrite and not path.exists():
            raise UsageError(f"--rewrite: {path} does not exist (run the table first)")
        validate(parse_args(["--backbone", a.backbone, *extra]), run_dir=False)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.rewrite:
        write(json.loads(path.read_text()), path.parent, a.readme)
        return 0
    try:
        with lock(ROOT / a.runs):
            summary = gather(a, extra, path)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(summary, ROOT / a.results, a.readme)
    return 0


def gather(a, extra: list[str], path: Path) -> dict:
    """Train what the table lacks (finished runs and seeds kept in its JSON are not run again) and
    collect every run's metrics into the table's summary."""
    variants, runs = TABLES[a.table], ROOT / a.runs
    before = json.loads(path.read_text()) if path.exists() else None
    jobs = [(name, [*f, *extra], s) for name, f in variants.items() for s in a.seeds]
    fresh = [(n, f, s) for n, f, s in jobs if not done(a.backbone, f, s, runs)]
    got = {(n, s): kept(before, extra, n, s) for n, f, s in fresh}
    todo = [j for j in fresh if got[j[0], j[2]] is None]  # neither a finished run nor kept
    if todo:  # the first run alone: it trains and caches the teacher the others then load
        got[todo[0][0], todo[0][2]] = run_variant(a.backbone, todo[0][1], todo[0][2], runs)
    with ThreadPoolExecutor(a.jobs) as pool:
        ms = pool.map(lambda j: run_variant(a.backbone, j[1], j[2], runs), todo[1:])
        got |= {(name, s): m for (name, _, s), m in zip(todo[1:], ms, strict=True)}
    res: dict[str, list[dict]] = {name: [] for name in variants}
    for name, f, s in jobs:  # finished runs (metrics.json) are read, not run again
        res[name].append(got.get((name, s)) or run_variant(a.backbone, f, s, runs))
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
    return summary


if __name__ == "__main__":
    sys.exit(main())
