"""Training cost of TBCM vs the sCM baseline (Tab. 3, Fig. 4 analogues), and of TBCM from a bank.

Each variant runs in its own process (cost_worker.py; stages: cost_step.py) at equal pairs per
step, prompts·K·(N − 1): sCM reads, DC-AE-encodes and caption-encodes K·(N − 1) images per prompt
slot; TBCM encodes one prompt per slot and rolls the teacher out K times; "bank" reads TBCM's pairs
from a bank built beforehand (bank.py), no teacher, text encoder or DC-AE loaded. Text encodings
are not cached across steps: the realistic case is a prompt set far larger than any cache. Peak
memory comes from a second run under MALLOC_ENV; verdicts and tables: cost_report.py.
    python bench/cost.py --config small-sana      # the paper's setting at reduced width, ~6 min
    python bench/cost.py --quick                  # small-sana at 256 px, fewer steps: ~2 min
    python bench/cost.py --sweep 256,512,1024     # peak memory only, ~9 min
    python bench/cost.py --config paper-sana      # the paper's shapes, in parts (cost_compose.py)
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost_compose
import cost_report
from cost_compose import PARTS
from cost_report import VARIANTS, claim_lines, fit, ratios_of, sweep_table, table

import report
import sana_io
import sana_tiny
from config import Parser, UsageError, parse_args, validate

ROOT = Path(__file__).resolve().parents[1]
SANA = "--backbone sana --pool-steps 1 --filter-mode off --n-eval 2 --N 8 --K 2"
CONFIGS = {  # train.py flags of every variant; sana: + --prompts-file (and --images for sCM)
    "small-sana": f"{SANA} --prompts 1 --resolution 512 --max-sequence-length 300 "
    "--grad-checkpointing",
    "tiny-sana": f"{SANA} --prompts 2 --tiny --resolution 64",
    "digits": "--backbone digits --N 16 --prompts 4 --K 2 --pool-steps 1",
}
# memory runs: glibc returns freed blocks ≥ 64 KB to the OS at once, so RSS follows live tensors
# (as CUDA's allocator statistics would), not heap fragments of earlier stages; for all variants
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MEMORY_KEYS = ("peak_rss_mb", "rss_floor_mb", "rss_after_load_mb", "peak_above_floor_mb")


class RunFailed(Exception):
    """A worker or the bank build failed: (what failed, its exit status, its stderr)."""


def prepare(config: str, work: Path, resolution: int, pretrained: str | None, extra: list[str]):
    """Flags per variant: a prompts file of distinct prompts, captioned random images (sCM), the
    small pipeline (built once) or the user's; `extra` (train.py flags) for all."""
    flags, own = CONFIGS[config].split(), {"scm": ["--method", "scm"], "tbcm": [], "bank": []}
    own["tbcm-lora"] = cost_report.LORA_FLAGS
    if config == "small-sana":
        folder = Path(pretrained) if pretrained else work / "pipeline"
        if not (folder / "model_index.json").exists():
            with sana_io.quiet_loading():
                sana_tiny.build_pipeline(folder, size="small")
        flags += ["--pretrained", str(folder)]
        flags[flags.index("--resolution") + 1] = str(resolution)
    if "sana" in config:
        res = int(flags[flags.index("--resolution") + 1])
        images = cost_compose.write_inputs(work, res, 32)
        flags += ["--prompts-file", str(work / "prompts.txt")]
        own["scm"] += ["--images", str(images)]
    return {v: [*flags, *extra, *own[v]] for v in own} | {"base": [*flags, *extra]}


def run(args: list[str], what: str, env: dict | None = None) -> dict:
    """`python <args>` in the repository: its last stdout line as JSON, or RunFailed."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if p.returncode:
        raise RunFailed(what, p.returncode, p.stderr[-3000:].strip())
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_worker(variant: str, flags: list[str], steps: int, warmup: int, memory: bool = False):
    """One variant in a fresh process; `memory`: under MALLOC_ENV (honest RSS, slower steps)."""
    args = ["bench/cost_worker.py", "--steps", str(steps), "--warmup", str(warmup), "--", *flags]
    return run(args, f"the {variant} worker", MALLOC_ENV if memory else None)


def measure(variant: str, flags: list[str], steps: int, warmup: int) -> dict:
    """Times from a run with the default allocator, memory from a second run under MALLOC_ENV
    (which makes every large allocation an mmap, so it would slow the step it measures)."""
    timed = run_worker(variant, flags, steps, warmup)
    mem = run_worker(variant, flags, min(steps, 2), warmup, memory=True)
    timed |= {k: mem[k] for k in (*MEMORY_KEYS, "cuda_peak_mb") if k in mem}
    for name, stage in timed["stages"].items():
        stage["dynamic_mem_mb"] = mem["stages"][name]["dynamic_mem_mb"]
    return timed


def build_bank(work: Path, flags: list[str], pools: int) -> dict:
    """The bank of exactly the pairs TBCM rolls out in `pools` steps (one pool per step), built
    afresh (its speed is measured) by bank.py in its own process."""
    shutil.rmtree(work / "bank", ignore_errors=True)
    t = time.perf_counter()
    stats = run(
        ["bank.py", "build", "--out", str(work / "bank"), "--pools", str(pools), *flags],
        "bank.py build",
    )
    return stats | {"wall_with_load_s": time.perf_counter() - t}


def run_config(a, extra: list[str], steps: int, warmup: int) -> tuple[dict, str]:
    """The three variants and the two LoRA students, the bank's build and the extras on one
    config: results, markdown."""
    resolution = a.resolution or (256 if a.quick else 512)
    work = ROOT / a.work / (f"small-sana-{resolution}" if a.config == "small-sana" else a.config)
    work.mkdir(parents=True, exist_ok=True)
    flags = prepare(a.config, work, resolution, a.pretrained, extra)
    build = build_bank(work, flags["tbcm"], warmup + steps)
    flags["bank"] = [*flags["tbcm"], "--bank", str(work / "bank")]
    flags["bank-lora"] = [*flags["bank"], *cost_report.LORA_FLAGS]
    variants = {}
    for v in (*VARIANTS, *cost_report.LORA_VARIANTS):
        print(f"{a.config}: {v} ...", file=sys.stderr, flush=True)
        variants[v] = measure(v, flags[v], steps, warmup)
    print(f"{a.config}: extras ...", file=sys.stderr, flush=True)
    ex = run(["bench/cost_worker.py", "--extras", "--", *flags["tbcm"]], "the extras")
    base, ratios, gpu = flags["base"], ratios_of(variants), "cuda_peak_mb" in variants["scm"]
    res_px = int(base[base.index("--resolution") + 1]) if "sana" in a.config else None
    config = dict(name=a.config, resolution=res_px, flags=base, steps_measured=steps, warmup=warmup)
    config |= dict(threads=os.cpu_count(), peak_memory="cuda_peak_mb" if gpu else "peak_rss_mb")
    vae_batch = parse_args(flags["scm"]).vae_batch if "sana" in a.config else None
    config["scm_vae_batch"] = vae_batch  # sCM's peak grows with the DC-AE's images per call
    res = dict(config=config, variants=variants, bank_build=build, extras=ex, ratios=ratios)
    res["claims"] = claim_lines(ratios)
    ratio_line = "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    ratio_line += f" (sCM's DC-AE: {vae_batch} images per call)" * bool(vae_batch)
    return res, "\n\n".join([table(variants), ratio_line, *res["claims"]]) + "\n"


def sweep(resolutions: list[int], root: Path, warmup: int, pretrained: str | None, extra: list):
    """Peak memory of the three variants on small-sana at several resolutions (memory runs only),
    with a line fitted per variant (cost_report.fit)."""
    rows = []
    for res in resolutions:
        work = root / f"small-sana-{res}"
        work.mkdir(parents=True, exist_ok=True)
        flags = prepare("small-sana", work, res, pretrained, extra)
        build_bank(work, flags["tbcm"], warmup + 1)
        flags["bank"] = [*flags["tbcm"], "--bank", str(work / "bank")]
        row = {"resolution": res}
        for v in VARIANTS:
            print(f"sweep {res} px: {v} ...", file=sys.stderr, flush=True)
            m = run_worker(v, flags[v], 1, warmup, memory=True)
            dyn = {s: x["dynamic_mem_mb"] for s, x in m["stages"].items() if s != "other"}
            row[v] = {k: m[k] for k in MEMORY_KEYS if k != "rss_floor_mb"} | {"dynamic_mem_mb": dyn}
        rows.append(row)
    return {"config": "small-sana", "rows": rows} | fit(rows)


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n")[0], epilog="after --: train.py flags, for all")
    add = p.add_argument
    setting = "small-sana: the paper's shapes at 1/8 width (default); paper-sana: the paper's "
    setting += "shapes, random weights, in parts; tiny-sana; digits"
    add("--config", choices=[*sorted(CONFIGS), "paper-sana"], default="small-sana", help=setting)
    parts = f"paper-sana: the parts to run if missing, comma-separated, of {', '.join(PARTS)}"
    add("--parts", default="all", help=parts + " (default: all)")
    add("--device", help="torch device, e.g. cuda (default: cpu; as train.py's --device)")
    add("--precision", choices=["fp32", "bf16"], help="autocast (default: train.py's; paper: bf16)")
    add("--quick", action="store_true", help="small-sana at 256 px, 2 steps after 1 (default: off)")
    add("--steps", type=int, within=">= 1", help="measured steps (default: 5; --quick: 2)")
    add("--warmup", type=int, within=">= 0", help="steps before them (default: 2; --quick: 1)")
    add("--resolution", type=int, help="small-sana image side (default: 512; --quick: 256)")
    add("--sweep", metavar="R1,R2,...", help="small-sana peak memory only (default: none)")
    add("--pretrained", metavar="DIR", help="small-sana: a SanaPipeline folder (default: none)")
    add("--work", default="runs/cost", help="pipeline, images, banks (default: runs/cost)")
    add("--json", help="results, .md beside (default: bench/results/cost_<name>.json)")
    return p


def check(a, extra: list[str]) -> list[int]:
    """Every flag, before anything is built or written; returns the --sweep resolutions."""
    cost_compose.check(a, extra)
    if a.pretrained and a.config != "small-sana" and not a.sweep:
        raise UsageError("--pretrained is for --config small-sana")
    if a.pretrained and not (Path(a.pretrained) / "model_index.json").exists():
        raise UsageError(
            f"--pretrained {a.pretrained}: no model_index.json (a SanaPipeline folder)"
        )
    if a.resolution is not None and (a.config != "small-sana" or a.sweep):
        raise UsageError("--resolution is for --config small-sana without --sweep")
    if a.resolution is not None and (a.resolution < 64 or a.resolution % 32):
        raise UsageError("--resolution must be a multiple of 32, >= 64 (as each --sweep entry)")
    config = CONFIGS["small-sana" if a.sweep or a.config == "paper-sana" else a.config].split()
    validate(parse_args([*config, *extra]), run_dir=False)
    try:
        resolutions = [int(r) for r in a.sweep.split(",")] if a.sweep else []
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated integers, got {a.sweep!r}") from None
    if a.sweep and (len(resolutions) < 2 or any(r < 64 or r % 32 for r in resolutions)):
        raise UsageError("--sweep needs at least two resolutions, each a multiple of 32, >= 64")
    return resolutions


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, extra = parser().parse_before_dashes(argv)
        extra += ["--device", a.device] * bool(a.device)
        extra += ["--precision", a.precision] * bool(a.precision)
        resolutions = check(a, extra)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = a.steps or (2 if a.quick else 5)
    warmup = a.warmup if a.warmup is not None else 1 if a.quick else 2
    try:
        if a.config == "paper-sana":
            print(cost_compose.main_paper(a, ROOT))
            return 0
        if resolutions:
            res = sweep(resolutions, ROOT / a.work, warmup, a.pretrained, extra)
            md, name = sweep_table(res) + "\n", "cost_small-sana_sweep"
        else:
            res, md = run_config(a, extra, steps, warmup)
            name = ("cost_pretrained" if a.pretrained else f"cost_{a.config}") + "_quick" * a.quick
    except RuntimeError as e:  # a paper-sana part failed, or lacks free memory
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunFailed as e:
        what, status, stderr = e.args
        print(f"{stderr}\nerror: {what} failed (exit {status})", file=sys.stderr)
        return 2 if status == 2 else 1
    name = name.replace("small-sana_sweep", "pretrained_sweep") if a.pretrained else name
    path = Path(a.json) if a.json else ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    report.publish(path.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
