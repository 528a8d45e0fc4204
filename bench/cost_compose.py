"""`bench/cost.py --config paper-sana`: Tab. 3 at the paper's shapes with random weights. Runs the
parts of cost_paper.py, each in its own process, storing each part's JSON under <work>/parts as it
finishes (a rerun skips the parts that exist: run them in the background, commit them one by one),
then composes each variant's peak at the paper's per-GPU batch from the parts and checks the
composition against the whole steps measured directly where one fits.

Composed peak = resident (models + AdamW state) + the largest stage rise, each stage's rise and time
linear in its batch (measured at 1 and 2). Stages at the paper's batch: sCM 16 images (Tab. 3),
its DC-AE encoding `vae_batch` of them per call (the 16 pixel images held meanwhile), each caption
encoded on its own as our SanaTeacher.cond does, one CFG teacher pass on 16, JVP and checkpointed
forward+backward on 16; TBCM one prompt, 16 CFG teacher passes of one sample, JVP and
forward+backward on 15 pairs; the bank: JVP and forward+backward on 15. The gradient (freed at each
step's zero_grad) lives from the backward pass through the optimiser step.

Recipes (RECIPES): the optimiser (AdamW or the official CAME) and gradient checkpointing on or off,
the same on both sides; a part whose numbers depend on the recipe carries it in its name
(recipe_of). The DC-AE: sCM holds its encoder, TBCM none (sana.load_sana), the bank no Sana part
but the student.
Over 250 lines: the parts' names, recipes and needs, their runner and their composition together.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cost_report
from cost_report import TAB3_GB, claim_lines, gpu_memory, paper_table

import report
import sana_io
import sana_tiny
from checkpoint import write_json
from config import UsageError

# Per-GPU batch of Tab. 3 ("a single A100 GPU with a batch size of 16"): sCM 16 images; TBCM one
# prompt, K = 1, N = 16 (official code): 16 teacher evaluations, 15 pairs.
PAPER = dict(scm_images=16, tbcm_pairs=15, tbcm_teacher_evals=16)
BATCHES = (1, 2)  # each stage at two batch sizes: linear in the batch or not
L = 300  # text tokens per prompt (SanaPipeline, Sana-Sprint)
# GB a part needs free before it starts (CPU: MemAvailable), from the shapes: fp32 student 2.4,
# its gradient 2.4, AdamW 4.7, bf16 teacher 1.2, bf16 Gemma 5.2, DC-AE 1.2, activations
NEEDS_GB = {  # in the order they run
    part: int(gb)
    for part, gb in (
        x.split(":")
        for x in """stage-text:9 stage-vae-512:9 stage-vae-1024:13
    stage-teacher-512:9 stage-teacher-1024:9 stage-jvp-512:4 stage-jvp-1024:6 stage-fwdbwd-512:7
    stage-fwdbwd-1024:9 stage-optimizer:11 resident-scm:17 resident-tbcm:17 bank-512:9
    resident-bank:11 direct-tbcm-512:19 direct-bank-512:12 direct-scm-512:19
    direct-scm-vae8-512:20 stage-jvp-lora-512:4 stage-jvp-lora-1024:6 stage-fwdbwd-lora-512:5
    stage-fwdbwd-lora-1024:7 stage-optimizer-lora:4 resident-tbcm-lora:10 resident-bank-lora:4
    direct-tbcm-lora-512:13 direct-bank-lora-512:6 stage-optimizer-came:11
    stage-optimizer-lora-came:4 resident-scm-came:15 resident-tbcm-came:15 resident-bank-came:9
    resident-tbcm-lora-came:10 resident-bank-lora-came:4 direct-tbcm-came-512:17
    direct-bank-came-512:10 direct-scm-came-512:17 stage-fwdbwd-nockpt-512:9
    stage-fwdbwd-nockpt-1024:14 stage-fwdbwd-lora-nockpt-512:7 stage-fwdbwd-lora-nockpt-1024:12
    direct-bank-came-accum15-512:9 direct-bank-lora-came-accum15-512:5
    direct-tbcm-came-accum15-512:16
    """.split()
    )
}
# the optimiser, and gradient checkpointing on both sides; "came-ckpt": the official configs';
# -accum<A>: --accum-steps A on both sides (composed from the same parts)
RECIPES = ("adamw-ckpt", "came-ckpt", "adamw", "came", "came-ckpt-accum15")
OFFICIAL = "came-ckpt"
PARTS = tuple(NEEDS_GB)


ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS, VAE_BATCHES = (512, 1024), (1, 8, 16)
TOLERANCE = 0.10  # composed vs direct peak, relative: the composition is trusted this far
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def recipe_of(part: str) -> str:
    """The recipe a part's name says: -came for CAME, -nockpt for checkpointing off, -accum<A>."""
    words = part.split("-")
    accum = "".join(f"-{w}" for w in words if w.startswith("accum"))
    return ("came" if "came" in words else "adamw") + "-ckpt" * ("nockpt" not in words) + accum


def recipe_part(kind: str, recipe: str) -> str:
    """The name of a part of `kind` (resident-tbcm, stage-fwdbwd-lora, …) under `recipe`, less its
    resolution: only the optimiser's parts carry -came, only forward+backward -nockpt."""
    came = "-came" * (recipe.startswith("came") and kind.startswith(("resident", "stage-opt")))
    ckpt = "ckpt" in recipe.split("-")
    return kind + came + "-nockpt" * (not ckpt and "fwdbwd" in kind)


def flags(
    folder: str,
    work: Path,
    res: int,
    variant: str,
    device: str,
    precision: str,
    vae_batch=1,
    recipe="adamw-ckpt",
) -> list:
    """train.py's flags of `variant` at the paper's settings (sana preset: N 16, K 1, 1 prompt,
    no EMA), bf16 frozen networks, the recipe's optimiser and checkpointing, sCM's DC-AE
    `vae_batch` per call."""
    words = recipe.split("-")  # optimiser[-ckpt][-accum<A>]
    ckpt, opt = "--grad-checkpointing" if "ckpt" in words else "--no-grad-checkpointing", words[0]
    f = f"--backbone sana --pretrained {folder} --prompts-file {work}/prompts.txt --resolution "
    f += f"{res} --max-sequence-length {L} {ckpt} --filter-mode off --n-eval 2 "
    f += f"--frozen-precision bf16 --precision {precision} --device {device} --optimizer {opt}"
    f += f" --accum-steps {recipe.partition('accum')[2]}" * ("accum" in recipe)
    own = dict(scm=f" --method scm --images {work}/images-{res} --vae-batch {vae_batch}", tbcm="")
    own["bank"] = f" --bank {work}/bank-{res}"
    lora = cost_report.LORA_FLAGS * variant.endswith("-lora")  # ours: LoRA on the bf16 base
    return (f + own[variant.removesuffix("-lora")]).split() + lora


def write_inputs(work: Path, res: int, n: int) -> Path:
    """work/prompts.txt, 384 distinct prompts; work/images-<res>, n random images with captions
    (sCM's data) written under a temporary name, so no partial folder if killed; returns it."""
    import numpy as np
    from PIL import Image

    words = [("red", "blue", "green", "golden", "pale", "dark", "bright", "striped")]
    words += [("cat", "house", "river", "mountain", "car", "tree", "bird", "city")]
    words += [("at dawn", "in the rain", "on a hill", "by the sea", "in winter", "at night")]
    triples = [(c, t, p) for c in words[0] for t in words[1] for p in words[2]]
    prompts = [f"a {c} {t} {p}, photo {i}" for i, (c, t, p) in enumerate(triples)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    images = work / f"images-{res}"
    if not images.exists():
        tmp = images.with_name(images.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(
                tmp / f"{i}.png"
            )
            (tmp / f"{i}.txt").write_text(f"{prompts[i * 11 % len(prompts)]}, image {i}\n")
        tmp.rename(images)
    return images


def free_gb(device: str) -> float:
    """Memory free for a new part: MemAvailable, or the CUDA device's free memory."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] / 2**30
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return next(int(x.split()[1]) for x in meminfo if x.startswith("MemAvailable")) / 2**20


def run_parts(names: list[str], folder: str, work: Path, device: str, precision: str) -> None:
    """Each missing part in its own process, its JSON written when it finishes."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **MALLOC_ENV}
    for name in names:
        out = work / "parts" / f"{name}.json"
        if out.exists():
            continue
        if (free := free_gb(device)) < NEEDS_GB[name]:
            raise RuntimeError(f"part {name} needs {NEEDS_GB[name]} GB free, {free:.1f} GB are")
        print(f"paper-sana: {name} ...", file=sys.stderr, flush=True)
        if name == "bank-512":  # TBCM's pairs of one step, for direct-bank-512
            tbcm = flags(folder, work, 512, "tbcm", device, precision)
            cmd = ["bank.py", "build", "--out", str(work / "bank-512"), "--pools", "1", *tbcm]
        else:
            cmd = ["bench/cost_paper.py", "--part", name, "--folder", folder, "--work", str(work)]
            cmd += ["--device", device, "--precision", precision]
        p = subprocess.run(
            [sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=False
        )
        if p.returncode:
            raise RuntimeError(f"part {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        write_json(out, json.loads(p.stdout.strip().splitlines()[-1]))


def lin(stage: dict, n: float, key: str) -> float:
    """A stage's `key` (s or dynamic_mb) at batch n, linear through its two measured batches."""
    b1, b2 = BATCHES
    y1, y2 = (stage["by_batch"][str(b)][key] for b in BATCHES)
    return y1 + (n - b1) * (y2 - y1) / (b2 - b1)


def compose_one(
    p: dict,
    variant: str,
    res: int,
    vae_batch: int,
    n: int,
    clock: str = "s",
    recipe: str = "adamw-ckpt",
) -> dict | None:
    """One variant's composed peak (MB above the floor) and step time at resolution res with n
    pairs (sCM: n images, vae_batch per DC-AE call) under `recipe`; None while a part it needs is
    missing. A LoRA variant (`<variant>-lora`) has its own resident and student stages. With
    --accum-steps A (recipe -accum<A>) the JVP and forward+backward run on n/A pairs at a time,
    A times, all but the first JVP beside the step's gradient."""
    lora, A = "-lora" * variant.endswith("-lora"), int(recipe.partition("accum")[2] or 1)
    jvp_k, fb_k, opt_k = (
        f"stage-jvp{lora}-{res}",
        recipe_part(f"stage-fwdbwd{lora}", recipe) + f"-{res}",
        recipe_part(f"stage-optimizer{lora}", recipe),
    )
    variant = variant.removesuffix("-lora")
    res_k = recipe_part(f"resident-{variant}{lora}", recipe)
    need = [res_k, jvp_k, fb_k, opt_k]
    need += ["stage-text", f"stage-teacher-{res}"] * (variant != "bank")
    need += [f"stage-vae-{res}"] * (variant == "scm")
    if any(k not in p for k in need):
        return None
    resident = p[res_k]
    res_mb, grads = resident["resident_mb"], resident["grads_mb"]
    jvp, fb, opt = p[jvp_k], p[fb_k], p[opt_k]
    opt_1 = opt["by_batch"]["1"]
    mem = dict(jvp=lin(jvp, n / A, "dynamic_mb") + grads * (A > 1))
    mem |= dict(student_fwd_bwd=lin(fb, n / A, "dynamic_mb"), optimizer=grads + opt_1["dynamic_mb"])
    time = dict(jvp=A * lin(jvp, n / A, clock), student_fwd_bwd=A * lin(fb, n / A, clock))
    time["optimizer"] = opt_1[clock]
    if variant != "bank":
        text, teacher = p["stage-text"], p[f"stage-teacher-{res}"]
        prompts, evals = (n, 1) if variant == "scm" else (1, PAPER["tbcm_teacher_evals"])
        mem |= dict(text_encode=lin(text, 1, "dynamic_mb"))
        mem["teacher"] = lin(teacher, n if variant == "scm" else 1, "dynamic_mb")
        time |= dict(text_encode=prompts * lin(text, 1, clock))
        time["teacher"] = (
            lin(teacher, n, clock) if variant == "scm" else evals * lin(teacher, 1, clock)
        )
    if variant == "scm":
        vae, pixels_mb = p[f"stage-vae-{res}"], n * 3 * res * res * 4 / 2**20
        mem["vae_encode"] = lin(vae, min(vae_batch, n), "dynamic_mb") + pixels_mb
        time["vae_encode"] = math.ceil(n / vae_batch) * lin(vae, min(vae_batch, n), clock)
    top, step_s = max(mem, key=mem.get), sum(time.values())
    out = dict(peak_mb=res_mb + mem[top], resident_mb=res_mb, bottleneck=top, stage_mb=mem)
    out |= {k: resident.get(k) for k in ("models_mb", "optimizer_state_mb", "tensor_mb")}
    out |= dict(grads_mb=grads, recipe=recipe)
    return out | dict(stage_s=time, step_s=step_s, pairs=n, time_per_pair_s=step_s / n)


def compose_recipe(p: dict, recipe: str, clock: str) -> dict:
    """Per resolution and sCM DC-AE batch: every variant at the paper's batch under `recipe` and
    their ratios to sCM's."""
    out, n_scm, n_tbcm = {}, PAPER["scm_images"], PAPER["tbcm_pairs"]
    for res in RESOLUTIONS:
        tb, bk = (compose_one(p, v, res, 1, n_tbcm, clock, recipe) for v in ("tbcm", "bank"))
        lora = {
            v: compose_one(p, v, res, 1, n_tbcm, clock, recipe) for v in cost_report.LORA_VARIANTS
        }
        for vb in VAE_BATCHES:
            sc = compose_one(p, "scm", res, vb, n_scm, clock, recipe)
            row = dict(scm=sc, tbcm=tb, bank=bk) | lora
            if sc and tb and bk:
                row["ratios"] = cost_report.composed_ratios(sc, tb, bk, lora)
            out[f"{res}px_vae_batch_{vb}"] = row
    return out


def compose(p: dict) -> dict:
    """Per resolution and sCM DC-AE batch: the variants at the paper's batch and their ratios,
    AdamW with checkpointing (composed) and every recipe (by_recipe); the direct steps beside the
    composition for the same setting and recipe; the headline ratios (1024 px, the whole batch in
    one DC-AE call, most likely the paper's sCM), each recipe's named by it."""
    # CPU seconds of the process where every stage has them (steadier on a shared machine)
    stages = [x["by_batch"]["1"] for k, x in p.items() if k.startswith("stage-")]
    on_cpu = all(x.get("device", "cpu") == "cpu" for x in p.values())
    clock = "cpu_s" if stages and on_cpu and all("cpu_s" in x for x in stages) else "s"
    by_recipe = {r: compose_recipe(p, r, clock) for r in RECIPES}
    out: dict = {"clock": clock, "composed": by_recipe[RECIPES[0]], "by_recipe": by_recipe}
    out["direct"] = {}
    for name in (k for k in p if k.startswith("direct-")):
        d, v, recipe = p[name], name.split("-")[1] + "-lora" * ("-lora-" in name), recipe_of(name)
        comp = compose_one(p, v, d["resolution"], d["vae_batch"] or 1, d["pairs"], clock, recipe)
        rel = None if comp is None else comp["peak_mb"] / d["peak_above_floor_mb"] - 1
        row = d | dict(variant=v, recipe=recipe, composed_peak_mb=comp and comp["peak_mb"])
        out["direct"][name[7:]] = row | dict(
            rel_diff=rel, within_tolerance=rel is not None and abs(rel) <= TOLERANCE
        )
    head = out["composed"].get("1024px_vae_batch_16", {}).get("ratios")
    if head:
        out["ratios"], out["claims"] = dict(head), claim_lines(head)
        for r in RECIPES:  # e.g. tbcm-came-ckpt_over_scm-came-ckpt_peak_memory
            named = by_recipe[r]["1024px_vae_batch_16"].get("ratios", {})
            out["ratios"] |= {cost_report.recipe_key(k, r): x for k, x in named.items()}
        out["claims"] += claim_lines(out["ratios"], cost_report.RECIPE_CLAIMS)
    return out


def load_parts(work: Path) -> dict:
    return {q.stem: json.loads(q.read_text()) for q in sorted((work / "parts").glob("*.json"))}


def check(a, extra: list[str]) -> None:
    """bench/cost.py's flags: --parts only with paper-sana, which takes no small-sana flags."""
    if set(a.parts.split(",")) - {*PARTS, "all"} or (a.parts != "all" and a.config != "paper-sana"):
        raise UsageError(f"--parts is for --config paper-sana, from: all, {', '.join(PARTS)}")
    if a.config == "paper-sana" and (a.quick or a.sweep or a.pretrained or a.resolution or extra):
        raise UsageError("--config paper-sana takes --parts, --device, --precision, --work, --json")


def main_paper(a, root: Path) -> str:
    """Run the missing parts named (all: every part), then compose what exists."""
    names = list(PARTS) if a.parts == "all" else a.parts.split(",")
    device, precision, work = a.device or "cpu", a.precision or "bf16", root / a.work / "paper-sana"
    out = Path(a.json) if a.json else root / "bench" / "results" / "cost_paper-sana.json"
    with sana_io.quiet_loading():  # the paper-size pipeline, built once (~1.5 min, 7.7 GB)
        folder = str(sana_tiny.cached_folder("runs", "paper"))
    write_inputs(work, 512, PAPER["scm_images"])
    run_parts(names, folder, work, device, precision)
    p = load_parts(work)
    res = dict(config=dict(name="paper-sana", device=device, precision=precision, paper=PAPER))
    res |= dict(tab3_gb=TAB3_GB, tolerance=TOLERANCE, parts=p) | compose(p)
    write_json(out, res)
    md = paper_table(res)
    report.publish(out.with_suffix(".md"), md + "\n", {"gpu_memory": gpu_memory(res)})
    return md
