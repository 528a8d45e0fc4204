"""Memory per GPU under FSDP2 (`--shard fsdp`): per-rank peak for world 1-8 at Sana-Sprint 0.6B and
1.6B, 512 and 1024 px, composed from meta-device counts, the replicated frozen networks and measured
stages (paper-sana's, the 1.6B student's), checked by a direct 2-process sharded step (torchrun).
Over 250 lines: the composition, the parts it reads and the direct step checking it belong together.
    python bench/cost_shard.py                  # missing parts first (~40 min), then the table
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost_step
import torch
from cost_compose import MALLOC_ENV, PAPER, TOLERANCE, compose_one, flags, lin, write_inputs
from cost_paper import config
from cost_stages import Meter
from cost_step import Stages, build, train_steps

import parallel
import report
import sana_io
import sana_tiny
from checkpoint import atomic_path, write_json
from config import Parser
from loss import LogvarHead
from runtime import set_threads

ROOT = Path(__file__).resolve().parents[1]
WORLDS, RESOLUTIONS, GPU_GB = (1, 2, 4, 8), (512, 1024), (32, 80)
MODELS = {"0.6B": "paper", "1.6B": "paper-1.6b"}  # sana_tiny.SIZES
DIRECT = "direct-bank-shard2-512"  # the bank variant: two processes of TBCM do not fit 24 GB
# FSDP2's gathered weights beside a block's compute (an assumption the direct step checks): the
# block computing and the next one prefetched, in the compute dtype (bf16: 2 bytes/param), plus
# the root's weights (embeddings, caption projection, output head) unsharded through the pass;
# in the backward pass also one block's unsharded gradient in bf16 and its fp32 copy that
# reduce-scatter sends (MixedPrecisionPolicy(bf16, fp32)).
GATHERED_BLOCKS, BF16, FP32 = 2, 2, 4
STEPS = 2  # the direct part's training steps
STAGES_1_6B = ("stage-fwdbwd-512", "stage-jvp-512", "stage-fwdbwd-1024", "stage-jvp-1024")


def transformer(size: str, **extra):
    """sana_tiny's Sana-Sprint transformer at SIZES[size] (QK-norm, timestep_scale 0.001)."""
    from diffusers import SanaTransformer2DModel

    shape = sana_tiny.SIZES[size]["transformer"]
    kw = dict(patch_size=1, qk_norm="rms_norm_across_heads", timestep_scale=0.001)
    return SanaTransformer2DModel(**kw, **shape, **extra)


def counts(size: str) -> dict:
    """Parameters of the student (teacher + guidance embedding), the teacher, one repeated block
    and the root (all but the blocks), counted on the meta device from sana_tiny.SIZES[size]."""
    with torch.device("meta"):
        teacher = transformer(size)
        student = transformer(size, guidance_embeds=True, guidance_embeds_scale=0.1)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks, shape = parallel.blocks(student), sana_tiny.SIZES[size]["transformer"]
    block = n(blocks[0])
    return dict(
        student=n(student), teacher=n(teacher), block=block, blocks=len(blocks),
        root=n(student) - len(blocks) * block, width=shape["num_attention_heads"]
        * shape["attention_head_dim"], depth=shape["num_layers"],
    )  # fmt: skip


def folder_1_6b(folder: str, out: Path) -> Path:
    """A SanaPipeline folder of the 1.6B transformer (random, seed 0, bf16) beside links to the
    0.6B folder's text encoder, DC-AE, tokenizer and scheduler: what the student's stages load."""
    if not (out / "model_index.json").exists():
        with atomic_path(out, replace=False) as tmp:
            tmp.mkdir()
            for name in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae"):
                (tmp / name).symlink_to(Path(folder).resolve() / name)
            with torch.random.fork_rng(), sana_tiny.default_dtype(torch.bfloat16):
                torch.manual_seed(0)
                transformer("paper-1.6b").save_pretrained(tmp / "transformer")
    return out


def per_rank(p: dict, c: dict, c0: dict, variant: str, res: int, world: int, own=None) -> dict:
    """One rank's peak (MB above the floor): paper-sana's composition (cost_compose.compose_one)
    with the student's state 16 bytes/param over `world` ranks, the teacher's bytes at size c,
    (world > 1) FSDP2's gathered weights, and the student's activations: measured at size c where
    `own` holds its stages, else paper-sana's × the width ratio."""
    base = compose_one(p, variant, res, 1, PAPER["tbcm_pairs"], "cpu_s")
    mb, k = 2**-20, c["width"] / c0["width"]  # activations per pair ∝ width (tokens equal)
    w, res_part, st = world, p[f"resident-{variant}"], base["stage_mb"]
    grads, grads0 = FP32 * c["student"] * mb / w, FP32 * c0["student"] * mb
    # the student's activations: a stage's rise, less the fp32 gradient inside fwd+bwd's rise
    act = dict(jvp=k * st["jvp"], fwdbwd=k * (st["student_fwd_bwd"] - grads0))
    measured = c is c0 or all(f"stage-{s}-{res}" in (own or {}) for s in ("jvp", "fwdbwd"))
    if c is not c0 and measured:
        m = {s: lin(own[f"stage-{s}-{res}"], PAPER["tbcm_pairs"], "dynamic_mb") for s in act}
        act = dict(jvp=m["jvp"], fwdbwd=m["fwdbwd"] - FP32 * c["student"] * mb)
    # resident = frozen (measured, teacher rescaled) + fp32 θ + AdamW's m, v: 12 bytes/param / W
    tensors = res_part["tensor_mb"]
    frozen = base["resident_mb"] - tensors["student"] - tensors["optimizer_state"]
    frozen += (c["teacher"] - c0["teacher"]) * BF16 * mb * (variant != "bank")
    state = 12 * c["student"] * mb / w
    gather = (GATHERED_BLOCKS * c["block"] + c["root"]) * BF16 * mb * (w > 1)
    grad_block = c["block"] * (BF16 + FP32) * mb * (w > 1)
    stage = dict(jvp=act["jvp"] + gather, student_fwd_bwd=act["fwdbwd"] + grads + gather)
    stage["student_fwd_bwd"] += grad_block
    # AdamW's step: its temporaries ∝ the parameters a rank holds
    stage["optimizer"] = grads + (st["optimizer"] - res_part["grads_mb"]) * grads / grads0
    for s in ("text_encode", "teacher"):  # replicated, unchanged by sharding (TBCM only)
        if s in st:
            stage[s] = st[s] * (k if s == "teacher" else 1)
    top = max(stage, key=stage.get)
    peak = frozen + state + stage[top]
    fits = {f"fits_{g}gb": peak <= g * 1024 for g in GPU_GB}  # GB as GPUs count them: GiB
    out = dict(peak_mb=peak, frozen_mb=frozen, state_mb=state, bottleneck=top, stage_mb=stage)
    return out | fits | dict(activations="measured" if measured else "0.6B × width ratio")


def compose(p: dict, own: dict, sizes: dict, d: dict | None) -> dict:
    """Every (model, variant, px, world)'s per-rank peak (`own`: the 1.6B student's stages); the
    direct step beside its own."""
    rows, c0 = [], sizes["0.6B"]
    for model, c in sizes.items():
        for variant in ("tbcm", "bank"):
            for res in RESOLUTIONS:
                for w in WORLDS:
                    r = per_rank(p, c, c0, variant, res, w, own if model == "1.6B" else None)
                    rows.append(dict(model=model, variant=variant, px=res, world=w) | r)
    if d is None:
        return dict(rows=rows, direct=None)
    _, variant, w, res = DIRECT.split("-")
    comp = per_rank(p, c0, c0, variant, int(res), int(w[5:]))["peak_mb"]
    peaks = [r["peak_above_floor_mb"] for r in d["by_rank"]]
    rel = [comp / x - 1 for x in peaks]
    ok = all(abs(x) <= TOLERANCE for x in rel)
    check = dict(variant=variant, world=d["world"], px=d["resolution"], composed_peak_mb=comp)
    check |= dict(peak_above_floor_mb_by_rank=peaks, rel_diff_by_rank=rel, within_tolerance=ok)
    return dict(rows=rows, direct=check | dict(part=d))


def table(res: dict) -> str:
    """Markdown: per model, variant and px the per-rank peak (GB) at each world size, marked by the
    smallest of 32 / 80 GB it fits; the direct check's line."""

    def gb(r: dict) -> str:
        fit = " ≤32" if r["fits_32gb"] else " ≤80" if r["fits_80gb"] else " >80"
        return f"{r['peak_mb'] / 1024:.1f}{fit}"

    out = [
        "| model, variant, px | " + " | ".join(f"world {w}" for w in WORLDS) + " | activations |"
    ]
    out.append("|---" * (len(WORLDS) + 2) + "|")
    by = {}
    for r in res["rows"]:
        by.setdefault((r["model"], r["variant"], r["px"]), []).append(r)
    for (m, v, px), rows in by.items():
        name = v.replace("tbcm", "TBCM")
        cells = [gb(r) for r in rows] + [rows[0]["activations"]]
        out.append(f"| {m}, {name}, {px} px | " + " | ".join(cells) + " |")
    d = res["direct"]
    if d:
        peaks = ", ".join(f"{x / 1024:.2f}" for x in d["peak_above_floor_mb_by_rank"])
        rel = ", ".join(f"{x:+.3f}" for x in d["rel_diff_by_rank"])
        verdict = "within" if d["within_tolerance"] else "outside"
        comp = f"{d['composed_peak_mb'] / 1024:.2f}"
        out += ["", f"Direct sharded step ({d['variant']}, 0.6B, {d['px']} px, world "
                f"{d['world']}): peak per rank {peaks} GB, composed {comp} GB, composed/direct − 1"
                f" = {rel} ({verdict} ±{TOLERANCE:.0%})."]  # fmt: skip
    return "\n".join(out)


def run(cmd: list[str], what: str) -> dict:
    """`python <cmd>` in the repository under MALLOC_ENV: its last stdout line as JSON."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **MALLOC_ENV}
    p = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if p.returncode:
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def run_parts(folder: str, work: Path, run_missing: bool) -> tuple[dict | None, dict]:
    """The direct part under torchrun (its bank built first), then the 1.6B student's stages
    (cost_paper.py), each JSON kept in work/shard-parts as it finishes; a rerun reads them."""
    parts = work / "shard-parts"
    if run_missing and not (out := parts / f"{DIRECT}.json").exists():
        write_inputs(work, 512, PAPER["scm_images"])
        if not (work / "bank-512" / "manifest.json").exists():  # TBCM's pairs of one step
            cmd = ["bank.py", "build", "--out", str(work / "bank-512"), "--pools", "1"]
            run(cmd + flags(folder, work, 512, "tbcm", "cpu", "bf16"), "the bank")
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["bench/cost_shard.py", "--part", DIRECT, "--folder", folder, "--work", str(work)]
        write_json(out, run(cmd, DIRECT))
    big = str(folder_1_6b(folder, work.parent / "paper-1.6b")) if run_missing else ""
    for name in STAGES_1_6B * run_missing:
        if not (out := parts / f"1.6B-{name}.json").exists():
            print(f"cost_shard: 1.6B {name} ...", file=sys.stderr, flush=True)
            cmd = ["bench/cost_paper.py", "--part", name, "--folder", big, "--work", str(work)]
            write_json(out, run(cmd, f"1.6B {name}"))
    own = {q.stem.removeprefix("1.6B-"): json.loads(q.read_text()) for q in parts.glob("1.6B-*")}
    d = parts / f"{DIRECT}.json"
    return (json.loads(d.read_text()) if d.exists() else None), own


def run_direct(part: str, folder: str, work: Path) -> None:
    """One rank of `part` (direct-<variant>-shard<W>-<px>) under torchrun: whole training steps
    (cost_step.train_steps), the student FSDP2-sharded after it is built and before the optimiser
    exists, the peak reset once sharded; two steps, so that the second's forward+backward meets
    AdamW's state (the composed steady state). Rank 0 prints all ranks' readings as a JSON line."""
    import torch.distributed as dist

    _, variant, w, res = part.split("-")
    rank, local_rank, world = parallel.ranks()
    if world != int(w.removeprefix("shard")):
        raise SystemExit(f"error: {part} runs under torchrun --nproc_per_node {w[5:]}")
    parallel.init("cpu", local_rank, world)
    argv = flags(folder, str(work), int(res), variant, "cpu", "bf16") + ["--threads", "1"]
    # each rank the paper's per-GPU batch (one prompt, 15 pairs: the bank's), validated as one
    # process's (train.py's --prompts counts all ranks' prompts)
    with mock.patch.dict(os.environ, WORLD_SIZE="1"):
        cfg = config(argv)
    set_threads(cfg.threads)
    import diffusers  # noqa: F401  the libraries' own footprint is not training memory
    import transformers  # noqa: F401

    meter, stages = Meter("cpu"), Stages("cpu")
    mb = dict(floor=meter.now())
    try:
        student, source = build(cfg, stages, own_memory=True)
        mb["built"] = meter.now()
        parallel.shard(student, cfg.precision)
        mb["loaded"] = meter.now()
        meter.reset_peak()
        t = time.perf_counter()
        # the logvar head sharded too (one unit, fp32): clip_grad_norm_ over the student's DTensor
        # gradients and the head's plain ones raises "mixed torch.Tensor and DTensor"
        with mock.patch.object(cost_step, "LogvarHead", lambda: parallel.shard(LogvarHead())):
            train_steps(cfg, student, source, stages, steps=STEPS, warmup=0)
        step_s, mb["peak"] = (time.perf_counter() - t) / STEPS, meter.peak()
    finally:
        stages.close()
    out = {f"{k}_above_floor_mb": v - mb["floor"] for k, v in mb.items() if k != "floor"}
    out |= dict(step_s=step_s, floor_mb=mb["floor"], pairs=cfg.prompts * cfg.K * (cfg.N - 1))
    out["stages"] = {
        k: dict(s=stages.time[k] / STEPS, dynamic_mb=stages.mem[k]) for k in stages.mem
    }
    by_rank = [None] * world
    dist.all_gather_object(by_rank, out)
    if rank == 0:
        print(json.dumps(dict(part=part, resolution=int(res), world=world, by_rank=by_rank)))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0], usage=__doc__.split("\n")[-2].strip())
    p.add_argument("--part", help=f"one rank of a direct part under torchrun ({DIRECT})")
    p.add_argument("--folder", help="the paper-size SanaPipeline folder (default: built once)")
    p.add_argument("--work", default="runs/cost/paper-sana", help="prompts, bank, parts")
    p.add_argument("--compose-only", action="store_true", help="the parts on disk; none run")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.part:
        run_direct(a.part, a.folder, Path(a.work))
        return 0
    with sana_io.quiet_loading():  # the paper-size pipeline, built once (~1.5 min, 7.7 GB)
        folder = a.folder or str(sana_tiny.cached_folder("runs", "paper"))
    paper = json.loads((ROOT / "bench" / "results" / "cost_paper-sana.json").read_text())
    sizes = {m: counts(s) for m, s in MODELS.items()}
    d, own = run_parts(folder, ROOT / a.work, run_missing=not a.compose_only)
    res = dict(config=dict(paper=PAPER, worlds=WORLDS, gpu_gb=GPU_GB, tolerance=TOLERANCE))
    res |= dict(counts=sizes, source="bench/results/cost_paper-sana.json", parts_1_6b=own)
    res |= compose(paper["parts"], own, sizes, d)
    out = ROOT / "bench" / "results" / "cost_shard.json"
    write_json(out, res)
    md = table(res)
    report.publish(out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
