"""Distil a flow-matching teacher into a 1–4 step student with TBCM (Alg. 1) or the sCM baseline.

    python train.py                      # digits (bundled with scikit-learn), TBCM, end to end
    python train.py --method scm         # the sCM baseline: forward-diffused real data instead of trajectories
Reads top to bottom: Config → build → loop (pairs, mask, loss, step) → checkpoint → evaluate → report.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import checkpoint
from brightness_filter import black_distance, mask_from_distance
from loss import LogvarHead, r_schedule, scm_loss
from sampler import consistency_sample, default_times
from trajectory import forward_pairs, logit_normal_times, reference_route, rollout, sample_route
from trigflow import TrigFlow


@dataclass(frozen=True)
class Config:
    """Every knob of a run; defaults are the bundled digits run, PRESETS adapt them per backbone."""

    backbone: Literal["digits", "toy2d", "cifar10", "sana"] = "digits"  # digits ships with scikit-learn
    method: Literal["tbcm", "scm"] = "tbcm"  # scm: the sCM / Sana-Sprint baseline (needs real data)
    scheme: Literal["reference", "logit_normal", "random"] = "reference"  # paper Tab. 4: reference best
    N: int = 16  # route length: N − 1 pairs per trajectory (paper Tab. 5; official code 16)
    shift: float = 2.5  # reference-route shift (official code, Sana's flow-Euler schedule)
    P_mean: float = 0.2  # logit-normal times (sCM/Sana-Sprint; paper Sec. 5.2); scm and scheme logit_normal
    P_std: float = 1.6  # idem
    prompts: int = 4  # prompts per optimiser step (official: 1 per GPU)
    K: int = 2  # trajectories per prompt (paper Sec. 4.1: amortise text encoding)
    pool_steps: int = 8  # ours: roll out this many steps' pairs at once and shuffle them across steps (1 = official)
    cfg_scales: tuple[float, ...] = (1.5, 2.0, 2.5)  # teacher CFG w, one per trajectory (Sana-Sprint: 4, 4.5, 5)
    eval_w: float = 2.0  # CFG / guidance input at evaluation
    guidance_scale: float = 0.1  # the student sees 0.1·w (Sana-Sprint guidance_embeds_scale)
    H: int = 400  # r warm-up steps (Alg. 1; Sana-Sprint and TBCM: 4000 of 20000)
    S_r: int = 1400  # r cool-down start (TBCM code: 15000)
    T_r: int = 300  # r cool-down length (TBCM code: 2000)
    r_final: float = 0.75  # paper Tab. 6
    r_direct: bool = False  # paper Tab. 7: warm up straight to r_final, no cool-down (worse in the paper)
    c: float = 0.1  # tangent normalisation constant (sCM, Sana-Sprint)
    t_min: float = 0.01  # ours: prior weight 1/(σ_d tan t) uses max(t, t_min), so no pair gets > 200× weight
    sigma_d: float = 0.5  # sCM / Sana-Sprint
    filter_mode: Literal["soft", "hard", "off"] = "soft"  # official code: soft drop
    filter_threshold: float = 0.1  # digits: MSE to the all −1 image of a near-empty digit (official: 1.0 on Sana)
    lr: float = 3e-5  # AdamW; digits: 1e-4 and 3e-4 drift, 1e-5 too slow (runs/dev); TBCM: CAME 1e-5 on Sana
    grad_clip: float = 1.0  # TBCM code: 0.1 on Sana
    ema_decay: float = 0.999  # evaluated weights: EMA of the student (raw weights swing)
    steps: int = 2000
    jvp: Literal["jvp", "fd"] = "jvp"  # tangent by torch.func.jvp, or central finite differences
    fd_eps: float = 1e-3  # step of the finite-difference fallback
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast; master weights stay fp32
    n_eval: int = 2000  # samples per evaluated sampler
    eval_teacher_steps: int = 16  # teacher@N: flow-Euler steps on the reference route (no partitioning)
    t_mid: float = 0.6  # 2-step sampling time; digits: 0.6 best of 0.6–1.4 (TBCM validated 1.0 on Sana)
    eval_batch: int = 2000  # samples per sampler call at evaluation
    log_every: int = 25
    ckpt_every: int = 500
    max_bad_steps: int = 20  # consecutive NaN/Inf steps before the run stops
    seed: int = 0
    device: str = "cpu"
    out: str = ""  # default runs/<backbone>-<method>
    cache_dir: str = "runs"  # teachers and evaluation classifiers are cached here
    teacher_steps: int = 0  # toy teachers: flow-matching steps (0: toy.TEACHERS' default)
    data_dir: str = ""  # cifar10: path to cifar-10-batches-py
    pretrained: str = ""  # sana: a local diffusers folder in SanaPipeline layout
    prompts_file: str = ""  # sana: UTF-8 text, one prompt per line (--tiny tbcm: 4 built-in prompts if omitted)
    images: str = ""  # sana --method scm: images with same-name .txt captions
    tiny: bool = False  # sana: a tiny random pipeline (built once under --cache-dir) instead of --pretrained
    resolution: int = 64  # sana: image side in pixels
    grad_checkpointing: bool = False  # sana: recompute activations in the gradient pass (the JVP runs under
    # no_grad, where diffusers skips checkpointing, so forward AD never meets it)
    max_sequence_length: int = 0  # sana: text tokens per prompt (0: 300 as SanaPipeline, 16 with --tiny)
    bank: str = ""  # train from an offline bank of pairs (bank.py): no teacher, text encoder or VAE in training
    resume: bool = False
    overwrite: bool = False


PRESETS = {  # applied for fields not given on the command line
    "toy2d": dict(N=8, shift=1.0, prompts=8, K=4, cfg_scales=(1.0,), eval_w=1.0, filter_mode="off",
                  P_mean=-0.4, steps=1500, H=300, S_r=1000, T_r=200, lr=2e-4, n_eval=4000),
    "cifar10": dict(prompts=2, K=2, pool_steps=4, steps=500, n_eval=500, filter_threshold=0.05),
    "sana": dict(shift=2.5, N=16, prompts=1, K=1, pool_steps=1, cfg_scales=(4.0, 4.5, 5.0), eval_w=4.5,
                 H=4000, S_r=15000, T_r=2000, r_final=0.75, lr=1e-5, grad_clip=0.1, steps=20000,
                 filter_threshold=1.0, n_eval=16, eval_teacher_steps=20, t_mid=1.0, ema_decay=0.0, eval_batch=4),
}


class UsageError(Exception):
    """Bad input: printed as one line `error: …`, exit status 2, nothing written."""


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags generated from Config's fields; a backbone's PRESETS fill what the user did not set."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None)
        elif typing.get_origin(kind) is Literal:
            p.add_argument(flag, choices=typing.get_args(kind), default=None)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(flag, type=lambda s: tuple(float(v) for v in s.split(",")), default=None,
                           metavar="W1,W2,...")
        else:
            p.add_argument(flag, type=kind, default=None)
    p.error = lambda msg: (_ for _ in ()).throw(UsageError(msg))  # one line, exit 2, via main()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if given.get("bank"):  # the bank's pairs define these fields; contradicting them is an error
        given = from_bank(given)
    preset = PRESETS.get(given.get("backbone", Config.backbone), {})
    cfg = Config(**{**preset, **given})
    if not cfg.out:
        cfg = dataclasses.replace(cfg, out=f"runs/{cfg.backbone}-{cfg.method}")
    return cfg


def from_bank(given: dict) -> dict:
    """`--bank`: the pair-defining fields come from the bank's manifest (an error if a flag says otherwise);
    where to find the teacher's weights too, unless given."""
    import bank

    try:
        m = bank.read_manifest(given["bank"])
    except bank.BankError as e:
        raise UsageError(str(e)) from e
    pairs = {k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()}
    for k in bank.PAIR_FIELDS:
        if k in given and given[k] != pairs[k]:
            raise UsageError(f"--{k.replace('_', '-').lower()} {given[k]} contradicts the bank's {pairs[k]} "
                             f"({given['bank']}); drop the flag or build another bank")
    sources = {k: pairs[k] for k in bank.SOURCE_FIELDS}
    return {**sources, **given, **{k: pairs[k] for k in bank.PAIR_FIELDS}}


def validate(cfg: Config) -> None:
    """All checks, before anything is built or written."""
    validate_ranges(cfg)
    run = Path(cfg.out)
    has_run = (run / "config.json").exists()
    if cfg.resume and not checkpoint.latest(run / "checkpoints"):
        raise UsageError(f"--resume: no checkpoint under {run}/checkpoints")
    if has_run and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"{run} already holds a run; pass --resume to continue it, --overwrite to replace "
                         "it, or --out for a new one")


def validate_ranges(cfg: Config) -> None:
    """Range checks and flag combinations."""
    checks = [
        (cfg.N >= 2, "--n must be at least 2 (the route's first time is π/2)"),
        (cfg.prompts >= 1 and cfg.K >= 1 and cfg.pool_steps >= 1, "--prompts, --k, --pool-steps must be >= 1"),
        (cfg.steps >= 1 and cfg.n_eval >= 2, "--steps must be >= 1 and --n-eval >= 2"),
        (cfg.lr > 0 and cfg.grad_clip > 0, "--lr and --grad-clip must be positive"),
        (min(cfg.H, cfg.S_r, cfg.T_r) >= 0, "--h, --s-r, --t-r must be >= 0"),
        (0 <= cfg.r_final <= 1, "--r-final must be in [0, 1]"),
        (cfg.c > 0 and cfg.sigma_d > 0 and cfg.fd_eps > 0, "--c, --sigma-d, --fd-eps must be positive"),
        (0 <= cfg.t_min < math.pi / 2 and 0 < cfg.t_mid < math.pi / 2, "--t-min, --t-mid must be in (0, π/2)"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (len(cfg.cfg_scales) >= 1 and all(w >= 0 for w in cfg.cfg_scales), "--cfg-scales must be >= 0"),
        (cfg.filter_threshold > 0, "--filter-threshold must be positive"),
        (cfg.log_every >= 1 and cfg.ckpt_every >= 1 and cfg.max_bad_steps >= 1, "--log-every, "
         "--ckpt-every, --max-bad-steps must be >= 1"),
        (cfg.eval_teacher_steps >= 1 and cfg.teacher_steps >= 0 and cfg.eval_batch >= 1,
         "--eval-teacher-steps and --eval-batch must be >= 1, --teacher-steps >= 0"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
        (cfg.backbone != "cifar10" or cfg.data_dir, "cifar10 needs --data-dir path/to/cifar-10-batches-py "
         "(from https://www.cs.toronto.edu/~kriz/cifar.html; nothing is downloaded)"),
        (cfg.backbone == "sana" or not (cfg.pretrained or cfg.prompts_file or cfg.images or cfg.tiny
                                        or cfg.grad_checkpointing),
         "--pretrained, --prompts-file, --images, --tiny, --grad-checkpointing are for --backbone sana"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device} but CUDA is not available; use --device cpu")
    if cfg.bank and cfg.method != "tbcm":
        raise UsageError("--bank holds TBCM trajectory pairs; drop --method scm")


# ------------------------------------------------------------------------------------------ pairs
def seeded(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints. Pairs are drawn per (seed, pool, part, prompt slot), so one process
    and N data-parallel ranks draw the same pairs, and a resumed run redraws its pool without saved RNG state."""
    s = 0
    for k in key:
        s = (s * 1_000_003 + k) % 2**63
    return torch.Generator().manual_seed(s)


def tbcm_inputs(cfg: Config, bb, key: tuple[int, ...], slots: range):
    """One optimiser step's rollout inputs (Alg. 1): a route, per prompt slot one prompt repeated for its K
    trajectories (paper Sec. 4.1: encoded once), a CFG scale and a noise per trajectory. Returns (route,
    prompt [T], w [T], z [T, ...], gens): `gens` are the slots' generators, advanced past these draws (the
    brightness filter draws from them next)."""
    K, ws = cfg.K, torch.tensor(cfg.cfg_scales)
    gens = [seeded(*key, j) for j in slots]  # one stream per prompt slot
    route = sample_route(cfg.scheme, cfg.N, seeded(*key), shift=cfg.shift, P_mean=cfg.P_mean,
                         P_std=cfg.P_std, sigma_d=cfg.sigma_d)  # one route per step (official code)
    prompt = torch.cat([torch.randint(bb.n_prompts, (1,), generator=g).expand(K) for g in gens])
    w = torch.cat([ws[torch.randint(len(ws), (K,), generator=g)] for g in gens])
    z = cfg.sigma_d * torch.cat([torch.randn((K, *bb.data_shape), generator=g) for g in gens])
    return route, prompt.to(cfg.device), w.to(cfg.device), z.to(cfg.device), gens


def make_pool(cfg: Config, bb, pool: int, slots: range, rank: int = 0,
              bank=None) -> dict[str, torch.Tensor]:
    """pool_steps optimiser steps' worth of pairs for the prompt slots of this rank, shuffled across steps:
    TBCM rollouts along sampled routes (Eq. 9, Alg. 1), the same pairs read from an offline bank (bank.py), or,
    for the sCM baseline, forward-diffused real data."""
    K, dev, parts = cfg.K, cfg.device, []
    for part in range(cfg.pool_steps):
        key = (cfg.seed, pool, part)
        if bank is not None:  # the same pairs from an offline bank (bank.py); the filter draws as online
            *_, gens = tbcm_inputs(cfg, bb, (bank.seed, pool, part), slots)
            x_t, t, dxdt, traj, prompt, w, score = bank.part(pool, part, slots)
            keep = torch.cat([mask_from_distance(score[i * K:(i + 1) * K], cfg.filter_threshold,
                                                 cfg.filter_mode, g) for i, g in enumerate(gens)])
            parts.append(dict(x_t=x_t, t=t, dxdt=dxdt, prompt=prompt[traj], w=w[traj], keep=keep[traj]))
        elif cfg.method == "tbcm":
            route, prompt, w, z, gens = tbcm_inputs(cfg, bb, key, slots)
            with autocast(cfg):
                p = rollout(bb.teacher, z, route, bb.cond(prompt), w, cfg.sigma_d)
            score = black_distance(p.x0.float(), bb.black, cfg.sigma_d)
            keep = torch.cat([mask_from_distance(score[i * K:(i + 1) * K], cfg.filter_threshold,
                                                 cfg.filter_mode, g) for i, g in enumerate(gens)])
            parts.append(dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt[p.traj], w=w[p.traj],
                              keep=keep[p.traj]))
        else:
            ws = torch.tensor(cfg.cfg_scales)
            gens = [seeded(*key, j) for j in slots]
            n = K * (cfg.N - 1)  # equal pairs per prompt slot and step as TBCM
            data = [bb.real_data(n, g) for g in gens]
            x0, prompt = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
            w = torch.cat([ws[torch.randint(len(ws), (n,), generator=g)] for g in gens]).to(dev)
            t = torch.cat([logit_normal_times(n, cfg.P_mean, cfg.P_std, cfg.sigma_d, g) for g in gens]).to(dev)
            z = cfg.sigma_d * torch.cat([torch.randn((n, *x0.shape[1:]), generator=g) for g in gens]).to(dev)
            with autocast(cfg):
                p = forward_pairs(bb.teacher, cfg.sigma_d * x0, z, t, bb.cond(prompt), w, cfg.sigma_d)
            parts.append(dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt, w=w,
                              keep=torch.ones_like(t, dtype=torch.bool)))
    pool_ = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    order = torch.randperm(len(pool_["t"]), generator=seeded(cfg.seed, pool, 2**40 + rank)).to(dev)
    return {k: v[order].float() if v.is_floating_point() else v[order] for k, v in pool_.items()}


def autocast(cfg: Config):
    """bf16 autocast around network passes when --precision bf16 (weights and optimiser stay fp32)."""
    dev = torch.device(cfg.device).type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


# ------------------------------------------------------------------------------------------- train
class RunError(Exception):
    """The run cannot go on (e.g. repeated NaN steps); the last good checkpoint is kept."""


def ema_update(ema: torch.nn.Module, student: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the student with the usual warm-up: β = min(decay, (1 + k)/(10 + k))."""
    beta = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), student.parameters(), strict=True):
            p_ema.lerp_(p, 1 - beta)


def state_tensors(student, head, ema, opt) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a bit-identical resume needs, as named tensors (safetensors, no pickle). No RNG state and no
    pairs: a pool is redrawn from its seeds (see `seeded`)."""
    t = {f"student/{k}": v for k, v in student.state_dict().items()}
    t |= {f"head/{k}": v for k, v in head.state_dict().items()}
    t |= {f"ema/{k}": v for k, v in ema.state_dict().items()}
    opt_t, opt_meta = checkpoint.flatten_optimizer(opt)
    return t | opt_t, opt_meta


def train(cfg: Config, bb, run: Path, rank: int = 0, world: int = 1) -> tuple[torch.nn.Module, dict]:
    """Alg. 1: pairs → mask → loss → step, with EMA, logging, checkpoints, NaN guard and resume.

    Data parallel (world > 1): rank r takes prompt slots r·P/world … (r+1)·P/world − 1 of each step, and the
    gradients are averaged by an all-reduce before clipping (what DDP does, without wrapping the module, so the
    JVP runs on the plain module). Only rank 0 writes.
    """
    import copy
    import signal

    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    bank = getattr(bb, "bank", None)  # pairs from an offline bank (bank.BankBackbone) instead of rollouts
    student, head = bb.student.train(), LogvarHead().to(cfg.device)
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    params = [p for p in student.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    F_student = TrigFlow(student, guidance_scale=cfg.guidance_scale)
    per_rank = cfg.prompts // world
    slots = range(rank * per_rank, (rank + 1) * per_rank)
    st = dict(step=0, nan_skipped=0, bad_streak=0, wall_s=0.0, pairs=0, kept_sum=0.0, kept_n=0,
              pool=-1, pool_pos=0)
    pool = None
    if cfg.resume:
        tensors, meta = checkpoint.load(checkpoint.latest(run / "checkpoints"))
        student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student/")})
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head/")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
        checkpoint.restore_optimizer(opt, tensors, meta["optimizer"])
        st = meta["train"]
        if st["pool"] >= 0:
            pool = make_pool(cfg, bb, st["pool"], slots, rank, bank)  # the same pairs again, from their seeds
        if rank == 0:
            truncate_log(run / "log.jsonl", st["step"])

    def save_ckpt():
        if rank == 0:
            tensors, opt_meta = state_tensors(student, head, ema, opt)
            checkpoint.save(run / "checkpoints", st["step"], tensors,
                            {"train": st, "optimizer": opt_meta, "config": dataclasses.asdict(cfg)})

    stop = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    per_step = per_rank * cfg.K * (cfg.N - 1)
    bar = tqdm(range(st["step"], cfg.steps), desc=f"{cfg.method} {cfg.backbone}", initial=st["step"],
               total=cfg.steps, disable=None if rank == 0 else True)
    t0 = time.perf_counter() - st["wall_s"]
    log = open(run / "log.jsonl", "a") if rank == 0 else None
    try:
        for step in bar:
            if pool is None or st["pool_pos"] >= len(pool["t"]):
                st["pool"] += 1
                pool, st["pool_pos"] = make_pool(cfg, bb, st["pool"], slots, rank, bank), 0
            b = {k: v[st["pool_pos"]: st["pool_pos"] + per_step] for k, v in pool.items()}
            st["pool_pos"] += per_step
            r = r_schedule(step, cfg.H, cfg.S_r, cfg.T_r, cfg.r_final, cfg.r_direct)
            cond = bb.cond(b["prompt"])

            def F_theta(x, t):
                return F_student(x, t, cond, b["w"])

            with autocast(cfg):
                loss, stats = scm_loss(F_theta, b["x_t"], b["t"], b["dxdt"], head(b["t"]), r, cfg.sigma_d,
                                       cfg.c, cfg.t_min, b["keep"], cfg.fd_eps if cfg.jvp == "fd" else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                import torch.distributed as dist

                for p in params:
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                    dist.all_reduce(p.grad)
                    p.grad /= world
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                st["nan_skipped"] += 1
                st["bad_streak"] += 1
                if st["bad_streak"] >= cfg.max_bad_steps:
                    raise RunError(f"{st['bad_streak']} consecutive NaN/Inf steps at step {step}; the last "
                                   f"good checkpoint is in {run}/checkpoints (try a lower --lr)")
            else:
                opt.step()
                ema_update(ema, student, cfg.ema_decay, step)
                st["bad_streak"] = 0
            st["step"] = step + 1
            st["pairs"] += per_step * world
            st["kept_sum"] += stats["kept"]
            st["kept_n"] += 1
            st["wall_s"] = time.perf_counter() - t0
            if log and (step % cfg.log_every == 0 or step + 1 == cfg.steps):
                rec = {"step": step, **stats, "grad_norm": float(grad_norm), "wall_s": st["wall_s"]}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.4f}", r=f"{r:.2f}")
            if st["step"] % cfg.ckpt_every == 0 or stop["flag"]:
                save_ckpt()
            if stop["flag"]:
                raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if log:
            log.close()
    if st["step"] % cfg.ckpt_every:
        save_ckpt()
    return ema, st


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint, so the log reads as one uninterrupted run."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(cfg: Config, bb, ema: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """metrics.json's eval block: the real-vs-real floor, teacher@N and student@1/2/4 on the same noise."""
    n, shape = cfg.n_eval, bb.data_shape
    prompt = (torch.arange(n) % bb.n_prompts).to(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    z = (cfg.sigma_d * torch.randn((n, *shape), generator=g)).to(cfg.device)
    w = torch.full((n,), cfg.eval_w, device=cfg.device)
    F_ema = TrigFlow(ema, guidance_scale=cfg.guidance_scale)
    chunk = cfg.eval_batch
    samplers = {"teacher@N": (2 * cfg.eval_teacher_steps, None)} | {
        f"student@{k}": (k, default_times(k, cfg.t_mid)) for k in (1, 2, 4)}
    res, shown, ref = {"distance_name": bb.distance_name, "data": bb.floor(n)}, {}, None
    route = reference_route(cfg.eval_teacher_steps, cfg.shift)
    for name, (nfe, times) in samplers.items():
        gk = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)

        def sample(zi, ci, wi, times=times, gk=gk):
            with autocast(cfg):
                if times is None:
                    return rollout(bb.teacher, zi, route, ci, wi, cfg.sigma_d).x0
                return consistency_sample(lambda x, t: F_ema(x, t, ci, wi), zi, times, cfg.sigma_d, gk)

        sample(z[:2], bb.cond(prompt[:2]), w[:2], gk=torch.Generator(device=cfg.device))  # warm-up, untimed
        xs, t0 = [], time.perf_counter()
        for i in range(0, n, chunk):
            x0 = sample(z[i:i + chunk], bb.cond(prompt[i:i + chunk]), w[i:i + chunk])
            xs.append(x0.float() / cfg.sigma_d)  # back to FM units (data space)
        elapsed = time.perf_counter() - t0
        x = torch.cat(xs)
        ref = x if times is None else ref  # teacher@N comes first: the paired reference
        shown[name] = bb.to_images(x[: 2000 if x.dim() == 2 else min(n, 2 * bb.n_prompts)]).cpu()
        res[name] = {**bb.evaluate(x, prompt, ref), "nfe": nfe, "samples_per_s": n / elapsed}
    return res, shown


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import backbones
    import bank
    import report

    rank, world = dist_init()
    try:
        cfg = parse_args(argv)
        if cfg.device == "cuda" and world > 1:
            cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        validate(cfg)
        if cfg.prompts % world:
            raise UsageError(f"--prompts {cfg.prompts} must be a multiple of the {world} processes")
        if rank > 0:
            barrier()  # rank 0 builds first: toy teachers are trained and cached once
        try:
            if cfg.bank:  # training needs only the student: the teacher is built for evaluation afterwards
                bb = bank.BankBackbone(cfg, bank.Bank(cfg.bank, cfg.device))
            else:
                bb = backbones.build(cfg)
        finally:
            if rank == 0:
                barrier()  # released even if the build failed: the other ranks then fail the same way
    except (UsageError, backbones.InputError, bank.BankError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.out)
    if rank == 0:
        if cfg.overwrite:
            import shutil

            shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    random.seed(cfg.seed), np.random.seed(cfg.seed)
    try:
        ema, st = train(cfg, bb, run, rank, world)
    except KeyboardInterrupt:
        print(f"interrupted; saved a checkpoint in {run}/checkpoints, continue with --resume", file=sys.stderr)
        return 130
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except bank.BankError as e:  # a shard found corrupted mid-run; the last checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank > 0:
        return 0
    if cfg.bank:
        bb = backbones.build(cfg)  # the teacher and its metrics, for evaluation only
    ev, shown = evaluate(cfg, bb, ema)
    bb.export(ema, run / "student")
    kept = st["kept_sum"] / max(st["kept_n"], 1)
    metrics = {"backbone": cfg.backbone, "method": cfg.method,
               "train": {"steps": st["step"], "wall_s": st["wall_s"], "peak_rss_mb": peak_rss_mb(),
                         "pairs_per_s": st["pairs"] / max(st["wall_s"], 1e-9), "filtered_fraction": 1 - kept,
                         "nan_skipped": st["nan_skipped"], "processes": world},
               "eval": ev}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report.samples_png(run / "samples.png", shown, bb)
    report.training_png(run / "training.png", run / "log.jsonl")
    report.summary(metrics, run)
    return 0


def dist_init() -> tuple[int, int]:
    """torchrun: join the process group (gloo on CPU, NCCL on GPU); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux/macOS)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
