"""The GPU self-check: a few steps of every cost variant (sCM, TBCM, bank, LoRA) on every visible
GPU at the paper's shapes (random weights), each GPU's peak memory and s/step against the composed
predictions of bench/results/cost_paper-sana.json, then TBCM under torchrun on all GPUs and its
exported student sampled at 1 and 2 steps in SanaSprintPipeline. Without CUDA (or with --tiny):
the same steps on the tiny pipeline on CPU. Exit 0 only if all of it ran and every image is finite.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost
import cost_compose
import torch
from cost_report import LORA_VARIANTS, VARIANTS

import evaluate
import sana_io
import sana_tiny
from checkpoint import write_json
from config import Parser, UsageError

ROOT = Path(__file__).resolve().parents[1]
PREDICTIONS = ROOT / "bench" / "results" / "cost_paper-sana.json"
TINY_RESOLUTION = 64  # the tiny pipeline's own: sample_size 8 × the DC-AE's 2^3
NA = "n/a on the tiny pipeline"


def plan(tiny: bool, cuda: bool, n_gpus: int) -> dict:
    """Where the check runs: the paper-size pipeline, one process per variant on each visible GPU
    (CUDA_VISIBLE_DEVICES = its index, so each process reads its own GPU's peak), or the tiny
    pipeline on the CPU (--tiny, or no CUDA device)."""
    if tiny or not cuda or n_gpus < 1:
        why = "--tiny" if tiny else "no CUDA device: torch.cuda.is_available() is False"
        return dict(tiny=True, devices=["cpu"], env=[{}], why=why)
    env = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n_gpus)]
    return dict(tiny=False, devices=[f"cuda:{i}" for i in range(n_gpus)], env=env, why="")


def parser() -> Parser:
    what = "A few steps of every cost variant on every visible GPU, against the paper-shape "
    what += "predictions, and the exported student sampled; without CUDA, the tiny pipeline on CPU."
    p = Parser(description=what, epilog="after --: train.py flags, for all runs")
    add = p.add_argument
    add("--tiny", action="store_true", help="the tiny pipeline on CPU (default: without CUDA)")
    add("--steps", type=int, default=3, within=">= 1", help="measured steps (default: 3)")
    add("--warmup", type=int, default=1, within=">= 0", help="steps before them (default: 1)")
    res = "image side of the paper-size pipeline, 512 or 1024 (default: 1024; --tiny: 64)"
    add("--resolution", type=int, choices=(512, 1024), default=1024, help=res)
    add("--work", default="runs/gpu_check", help="inputs, bank, run (default: runs/gpu_check)")
    add("--json", default="runs/gpu_check.json", help="results (default: runs/gpu_check.json)")
    return p


def launch(args: list[str], env: dict, cpu: bool) -> subprocess.Popen:
    """`python <args>` in the repository, in the background; on CPU under cost.MALLOC_ENV (the
    RSS follows live tensors, as bench/cost.py measures it)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    env |= cost.MALLOC_ENV if cpu else {}
    pipe = subprocess.PIPE
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=pipe, stderr=pipe)


def finish(p: subprocess.Popen, parse: bool = True) -> dict:
    """A process's last stdout line as JSON (parse) or {}, or {"error": its exit status and the
    tail of its stderr}."""
    out, err = (b.decode(errors="replace") for b in p.communicate())
    if p.returncode:
        return {"error": f"exit {p.returncode}: {err.strip()[-2000:]}"}
    return json.loads(out.strip().splitlines()[-1]) if parse else {}


def measure(v: str, flags: list[str], where: dict, steps: int, warmup: int) -> dict:
    """Variant v at once on every device, one bench/cost_worker.py process each (cost_step.Stages:
    CUDA's max_memory_allocated after a synchronize, or the RSS): device → its reading."""
    args = ["bench/cost_worker.py", "--steps", str(steps), "--warmup", str(warmup), "--", *flags]
    procs = [launch(args, env, where["tiny"]) for env in where["env"]]
    got = {}
    for dev, p in zip(where["devices"], procs, strict=True):
        m = finish(p)
        key = "cuda_peak_mb" if "cuda_peak_mb" in m else "peak_above_floor_mb"
        read = dict(peak_mb=m.get(key), memory=key, step_s=m.get("step_s"))
        got[dev] = m if "error" in m else read | dict(reserved_mb=m.get("max_memory_reserved_mb"))
    return got


def verdict(v: str, got: dict, predicted: dict | None, clock: str) -> list[str]:
    """One line per device: peak memory and s/step, measured / predicted."""
    lines = []
    for dev, m in got.items():
        if "error" in m:
            lines.append(f"{v:9s} {dev:7s} FAILED: {m['error'].splitlines()[-1]}")
            continue
        line = f"{v:9s} {dev:7s} peak {m['peak_mb']:9.0f} MB  {m['step_s']:8.3f} s/step  "
        if predicted is None:
            lines.append(line + f"predicted: {NA}")
            continue
        mem, s = m["peak_mb"] / predicted["peak_mb"], m["step_s"] / predicted["step_s"]
        line += f"measured/predicted: memory {mem:.2f} ({predicted['peak_mb']:.0f} MB), "
        lines.append(line + f"time {s:.3g} ({predicted['step_s']:.1f} s, {clock})")
    return lines


def sample_student(run: Path, device: str, dtype: torch.dtype) -> dict:
    """run/student in SanaSprintPipeline (evaluate.load_pipelines), one image at 1 and 2 steps at
    the run's resolution and guidance (evaluate.sprint_times): k → shape, finite."""
    cfg = json.loads((run / "config.json").read_text())
    (pipe, _) = evaluate.load_pipelines(run, "", dtype, device)
    pipe.set_progress_bar_config(disable=True)
    res, plain = (
        cfg["resolution"],
        {"complex_human_instruction": None} if cfg["plain_prompts"] else {},
    )
    call = dict(height=res, width=res, guidance_scale=cfg["eval_w"], output_type="pt")
    call |= dict(max_sequence_length=cfg["max_sequence_length"], use_resolution_binning=False)
    out = {}
    for k in (1, 2):  # seed k: one image's noise
        at_k, g = call | plain | evaluate.sprint_times(k, cfg["t_mid"]), torch.Generator(device)
        with torch.no_grad():
            x = pipe(prompt=["a red cat at dawn"], generator=g.manual_seed(k), **at_k).images
        out[str(k)] = dict(shape=list(x.shape), finite=bool(torch.isfinite(x).all()))
    return out


def export_check(flags: list[str], where: dict, work: Path, steps: int) -> dict:
    """TBCM through train.py under torchrun, one process per device (one prompt each), then its
    exported student sampled; the run's per-rank device memory from metrics.json if it has it."""
    n, run = len(where["devices"]), work / "run"
    flags = [*flags, "--prompts", str(n), "--steps", str(steps), "--out", str(run)]
    flags += ["--overwrite", "--ckpt-every", str(steps)]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    t0 = time.perf_counter()
    got = finish(launch([*torchrun, "train.py", *flags], {}, where["tiny"]), parse=False)
    if "error" in got:
        return dict(ok=False, processes=n) | got
    trained = json.loads((run / "metrics.json").read_text())["train"]
    out = dict(processes=n, run=str(run), wall_s=time.perf_counter() - t0)
    out["device_memory"] = {k: v for k, v in trained.items() if k.startswith("max_memory")}
    try:
        dtype = torch.float32 if where["tiny"] else torch.bfloat16
        out["samples"] = sample_student(run, where["devices"][0], dtype)
    except Exception as e:  # a folder SanaSprintPipeline does not load, or a failed call
        return out | dict(ok=False, error=f"SanaSprintPipeline: {evaluate.reason(e)}")
    return out | dict(ok=all(s["finite"] for s in out["samples"].values()))


def inputs(where: dict, resolution: int, work: Path, extra: list[str]) -> tuple[dict, dict]:
    """The pipeline (built once, or reused from runs/), captioned images and prompts, and each
    variant's train.py flags at the paper's settings (cost_compose.flags) → (flags, config)."""
    size, device = ("tiny", "cpu") if where["tiny"] else ("paper", "cuda")
    precision = "fp32" if where["tiny"] else "bf16"  # the paper's, as cost_paper-sana.json's
    # tiny: fp32 throughout (bf16 is slow on a CPU) and the tiny pipeline's short text encoding
    small = f"--frozen-precision fp32 --max-sequence-length {sana_tiny.TINY_MAX_SEQUENCE_LENGTH}"
    extra = small.split() * where["tiny"] + extra  # later flags win: the user's last
    with sana_io.quiet_loading():  # the paper-size pipeline: ~1.5 min, 7.7 GB, once
        folder = str(sana_tiny.cached_folder(ROOT / "runs", size))
    cost_compose.write_inputs(work, resolution, cost_compose.PAPER["scm_images"])
    flags = {
        v: cost_compose.flags(folder, work, resolution, v, device, precision) + extra
        for v in ("scm", "tbcm", "tbcm-lora")
    }
    for v in ("bank", "bank-lora"):  # the bank cost.build_bank writes under work/bank
        flags[v] = [*flags[v.replace("bank", "tbcm")], "--bank", str(work / "bank")]
    config = dict(pipeline=folder, size=size, resolution=resolution, precision=precision)
    return flags, config | dict(devices=where["devices"], flags=flags["tbcm"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a, extra = parser().parse_before_dashes(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    where = plan(a.tiny, cuda, torch.cuda.device_count() if cuda else 0)
    resolution, work = TINY_RESOLUTION if where["tiny"] else a.resolution, ROOT / a.work
    if where["tiny"]:
        print(f"gpu_check: the tiny pipeline on CPU ({where['why']})")
    else:
        n = len(where["devices"])
        print(f"gpu_check: the paper-size pipeline on {n} GPUs at {resolution} px")
    sys.stdout.flush()
    flags, config = inputs(where, resolution, work, extra)
    paper = json.loads(PREDICTIONS.read_text())
    composed = {} if where["tiny"] else paper["composed"][f"{resolution}px_vae_batch_1"]
    clock = f"{paper['clock']} on {paper['config']['device']}"
    res = dict(config=config | dict(steps=a.steps, warmup=a.warmup, tiny=where["tiny"]))
    res |= dict(predictions=NA if where["tiny"] else f"{PREDICTIONS.name}, {clock}")
    try:
        res["bank_build"] = cost.build_bank(work, flags["tbcm"], a.warmup + a.steps)
    except cost.RunFailed as e:
        res["bank_build"] = {"error": f"exit {e.args[1]}: {e.args[2][-2000:]}"}
    res["variants"] = {}
    for v in (*VARIANTS, *LORA_VARIANTS):
        failed = v.startswith("bank") and "error" in res["bank_build"]
        got = {d: {"error": "no bank"} for d in where["devices"]} if failed else None
        got = got or measure(v, flags[v], where, a.steps, a.warmup)
        p = composed.get(v)  # at sCM's --vae-batch 1
        p = p and {k: p[k] for k in ("peak_mb", "step_s")}
        res["variants"][v] = dict(by_device=got, predicted=p)
        print("\n".join(verdict(v, got, p, clock)), flush=True)
    res["export"] = export_check(flags["tbcm"], where, work, a.steps)
    got = res["export"].get("samples", {}).items()
    done = {True: "finite", False: "NOT FINITE"}
    shown = ", ".join(
        f"{k} step{'s' * (k != '1')} {s['shape']} {done[s['finite']]}" for k, s in got
    )
    ok = "ok" if res["export"]["ok"] else "FAILED"
    print(f"student in SanaSprintPipeline: {ok}; {shown or res['export'].get('error')}")
    ran = all("error" not in m for v in res["variants"].values() for m in v["by_device"].values())
    res["ok"] = ran and res["export"]["ok"] and "error" not in res["bank_build"]
    write_json(ROOT / a.json, res)
    print(f"gpu_check: {'ok' if res['ok'] else 'FAILED'}; {a.json}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
