"""The quality bench's verdicts and tables (Tabs. 2, 4–7): the paper's claim per table, the
paired-seed 95 % t-interval that judges it, the markdown, and the docs block per table.
    python bench/quality.py --table main --rewrite --readme   # from the JSON, no training
"""

import json
import statistics
from pathlib import Path

import report
from config import parse_args

ROOT = Path(__file__).resolve().parents[1]
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
    "lora": [
        (f"the full student beats LoRA rank {r} (ours)", "full", f"LoRA r{r}") for r in (4, 16, 64)
    ]
    + [
        (f"the full student beats LoRA rank {r} at {w} {lr} (ours)", "full", f"LoRA r{r} {w} {lr}")
        for w in ("lr", "adapter lr")
        for r in (16, 64)
        for lr in ("1e-4", "3e-4")
    ],
    "optimizer": [
        (f"CAME at lr {lr} beats AdamW at 3e-5 (ours)", f"CAME lr {lr}", "AdamW lr 3e-5")
        for lr in ("3e-6", "1e-5", "3e-5", "1e-4")
    ],
    "r_schedule": [
        (
            "warm-up–cool-down beats warm-up to r_final (Tab. 7)",
            "warmup-cooldown",
            "warmup to r_final",
        )
    ],
}
# two-sided 95 % quantiles of Student's t by degrees of freedom; above 30, df 30's (conservative)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
T975 |= {10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110}
T975 |= {18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060}
T975 |= {26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def half_width(sd: float, n: int) -> float:
    """Half the 95 % t-interval of a mean of n values with standard deviation sd."""
    return T975[min(n - 1, 30)] * sd / n**0.5 if n > 1 else float("inf")


def verdict(better: list[float], worse: list[float]) -> dict:
    """Paired by seed (same teacher, same evaluation noise): d = better − worse, the 95 % t-interval
    of its mean. Below 0 throughout: reproduced; above 0: not reproduced (the opposite holds); else
    inconclusive, with the number of seeds whose interval would exclude 0 if the mean difference
    and its spread stayed as observed."""
    d = [b - w for b, w in zip(better, worse, strict=True)]
    m = statistics.mean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    lo, hi = m - half_width(sd, len(d)), m + half_width(sd, len(d))
    word = "reproduced" if hi < 0 else "not reproduced" if lo > 0 else "inconclusive"
    out = {"diff": m, "ci95": [lo, hi], "verdict": word}
    if word == "inconclusive" and len(d) > 1:
        need = (k for k in range(len(d), 10_000) if half_width(sd, k) < abs(m))
        out["seeds_to_resolve"] = next(need, None)
    return out


SAMPLERS = ("teacher@N", "student@1", "student@2", "student@4")


def mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def teacher_nfe(summary: dict) -> int:
    """teacher@N's network evaluations (2 per step: CFG), for summaries older than their `nfe`."""
    cfg = parse_args(["--backbone", summary["backbone"], *summary["extra_flags"]])
    return 2 * cfg.eval_teacher_steps


def claims(summary: dict) -> list[dict]:
    """One verdict per claim of the table and student sampler (1 and 2 steps); a claim whose
    variants the JSON does not hold (written before they were added) is left out."""
    out = []
    for claim, better, worse in CLAIMS.get(summary["table"], []):
        if not {better, worse} <= summary["variants"].keys():
            continue
        for smp in ("student@1", "student@2"):
            b, w = (summary["variants"][x][smp]["distance"] for x in (better, worse))
            out.append({"claim": claim, "sampler": smp, **verdict(b, w)})
    return out


def markdown(summary: dict, samplers: tuple[str, ...] = SAMPLERS, floor: bool = True) -> str:
    """The table (rows: variant × sampler) and one line per claim of summary["claims"]."""
    lines = [
        f"| variant | sampler | {summary['distance_name']} ↓ | alignment ↑ | NFE |",
        "|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        for smp in samplers:
            teacher = smp == "teacher@N"
            nfe = (v[smp].get("nfe") or teacher_nfe(summary)) if teacher else int(smp[-1])
            d, al = mean_std(v[smp]["distance"]), mean_std(v[smp]["alignment"])
            lines.append(f"| {name} | {smp} | {d} | {al} | {nfe} |")
    if floor:
        lines.append(f"| real data (floor) | – | {summary['floor']:.3f} | – | – |")
    return "\n".join([*lines, "", *claim_lines(summary)]) + "\n"


def claim_lines(summary: dict) -> list[str]:
    """One line per claim: the verdict, the mean paired difference and its 95 % interval."""
    lines, n = [], len(summary["seeds"])
    for c in summary["claims"]:
        lo, hi = c["ci95"]
        more = c.get("seeds_to_resolve")
        more = f"; {more} seeds would decide it at this mean and spread" if more else ""
        lines.append(
            f"- {c['claim']}, {c['sampler']}: {c['verdict']} (difference {c['diff']:+.2f}, 95 % "
            f"CI [{lo:+.2f}, {hi:+.2f}] over {n} paired seeds{more})"
        )
    return lines


def wide(summary: dict) -> str:
    """A row per variant, the distance at 1, 2 and 4 steps (the markdown file keeps the alignment);
    the teacher (the same in every variant) and the floor below it; then the claim lines."""
    students = [smp for smp in SAMPLERS if smp != "teacher@N"]
    lines = [f"| variant | {' | '.join(students)} |", "|---|" + "---|" * len(students)]
    for name, v in summary["variants"].items():
        lines.append(f"| {name} | {' | '.join(mean_std(v[s]['distance']) for s in students)} |")
    teacher = next(iter(summary["variants"].values()))["teacher@N"]
    lines += [
        "",
        f"{summary['distance_name']} ↓, mean ± std over seeds "
        f"{', '.join(map(str, summary['seeds']))}; teacher@N {mean_std(teacher['distance'])} "
        f"({teacher.get('nfe') or teacher_nfe(summary)} NFE); "
        f"real data (floor) {summary['floor']:.3f}.",
    ]
    return "\n".join([*lines, "", *claim_lines(summary)]) + "\n"


def readme_markdown(summary: dict) -> str:
    """The docs block `quality_<table>` (report.page): main and schemes in full, lora wide (a row
    per variant), the ablations at 1–2 steps."""
    if summary["table"] == "lora":
        return wide(summary)
    if summary["table"] in ("main", "schemes"):
        return markdown(summary)
    return markdown(summary, ("student@1", "student@2"), floor=False)


def write(summary: dict, out: Path, readme: bool = False) -> None:
    """The verdicts (into the JSON), the markdown, and with readme the table's docs block."""
    summary["claims"] = claims(summary)
    out.mkdir(parents=True, exist_ok=True)
    name = f"quality_{summary['backbone']}_{summary['table']}"
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{name}.md").write_text(markdown(summary))
    print(markdown(summary))
    if readme:
        key = f"quality_{summary['table']}"
        report.replace_block(report.page(key), key, readme_markdown(summary))
