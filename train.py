"""Distil a flow-matching teacher into a 1–4 step student: TBCM (the paper's Alg. 1) or sCM.

    python train.py                  # digits (bundled with scikit-learn), TBCM, end to end
    python train.py --method scm     # the sCM baseline: forward-diffused real data, no trajectories
    python train.py --help           # every flag with its provenance, default and backbone presets

Alg. 1, its lines numbered from "Input" = 1, and where each lives:
    2      Init θ ← θ_pretrain, φ                backbones.Teacher.student, loss.LogvarHead
    3–11   prompts, noise, route, rollout        pairs.py → trajectory.rollout (Eq. 9),
           (Eq. 9), brightness mask, concat      brightness_filter; sCM: pairs.SCMPairs;
                                                 from an offline bank: bank.BankPairs
    12     r warm-up / cool-down                 loss.r_schedule
    13–16  g, tangent normalisation, adaptive    loss.scm_loss (the JVP: loss.jvp_cs_dF_dt)
           weighting, brightness mask
    17–18  (θ, φ) ← (θ, φ) − η∇L, Iters + 1      train() below
Around it, not in the paper: config.py (flags), runtime.py (EMA, Ctrl-C), parallel.py (DDP, FSDP2,
accumulation), checkpoint.py, metrics.evaluate_samplers (teacher@N, student@1/2/4), report.py.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import backbones
import bank
import checkpoint
import lora
import optimizers
import parallel
import report
from config import Config, UsageError, parse_args, validate
from loss import LogvarHead, merge_stats, r_schedule, scm_loss
from metrics import evaluate_samplers
from monitor import Monitor
from pairs import PairPool, PairSource, SCMPairs, TBCMPairs, split
from runtime import (
    autocast,
    clock,
    device_memory_mb,
    ema_of,
    ema_update,
    peak_rss_mb,
    rank0_first,
    set_threads,
    sigint_flag,
)
from trigflow import TrigFlow


class RunError(Exception):
    """The run cannot go on (repeated NaN steps); the last good checkpoint is kept (exit 1)."""


def train(cfg: Config, student: nn.Module, source: PairSource, run: Path, rank=0, world=1):
    """Alg. 1 lines 2–18 with EMA, logging, checkpoints, a NaN guard, resume; returns (EMA, state).

    Data parallel (world > 1): rank r takes prompt slots r·P/world … (r+1)·P/world − 1 of each step,
    the gradients are averaged before clipping (DDP, or FSDP2 with --shard fsdp); the JVP runs on
    the plain module. --accum-steps A: A micro-batches per step. Rank 0 writes.
    """
    torch.manual_seed(cfg.seed)
    student, head = student.train(), LogvarHead().to(cfg.device)  # line 2: θ from the teacher; φ
    ema, A = ema_of(student, cfg.ema_decay), cfg.accum_steps
    sharded = cfg.shard == "fsdp"  # FSDP2 shards, before the optimiser takes them; else DDP
    for m in {id(m): m for m in (student, head, ema)}.values() if sharded else ():
        parallel.shard(m, cfg.precision)
    ddp = partial(parallel.data_parallel, device=cfg.device, world=1 if sharded else world)
    wrapped = [ddp(student), ddp(head)]  # the gradient pass's (FSDP2 shards average themselves)
    groups = lora.param_groups(student, list(head.parameters()), cfg.lr, cfg.lora_lr)
    params, opt = [p for g in groups for p in g["params"]], optimizers.build(groups, cfg)
    trig = partial(TrigFlow, guidance_scale=cfg.guidance_scale)  # F_θ(x/σ_d, t, cond, w)
    F_theta, F_grad = trig(student), trig(wrapped[0])  # for the JVP; for the gradient pass
    modules = dict(student=student, head=head) | ({} if ema is student else dict(ema=ema))
    modules, base = lora.checkpointed(modules, student)  # LoRA: what trains, the base's hash
    per_rank = cfg.prompts // world
    slots, per_step = range(rank * per_rank, (rank + 1) * per_rank), per_rank * cfg.K * (cfg.N - 1)
    r_of = dict(H=cfg.H, S_r=cfg.S_r, T_r=cfg.T_r, r_final=cfg.r_final, direct=cfg.r_direct)
    fd_eps = cfg.fd_eps if cfg.jvp == "fd" else None
    hyper = dict(sigma_d=cfg.sigma_d, c=cfg.c, t_min=cfg.t_min, fd_eps=fd_eps)
    st = dict(step=0, nan_skipped=0, bad_streak=0, wall_s=0.0, pairs=0, kept_sum=0.0, kept_n=0)
    st |= dict(pool=-1, pool_pos=0)
    if cfg.resume:
        path = checkpoint.latest(run / "checkpoints")  # config.validate: there is one
        if (note := checkpoint.skipped_note(path)) and rank == 0:
            print(note, file=sys.stderr)  # incomplete checkpoints after the one resumed from
        tensors, meta = checkpoint.load(path)  # whole tensors; --shard fsdp: this rank's shards
        lora.check_base(meta.get("base_sha256"), base, run, cfg.student)
        tensors = parallel.scattered(tensors, checkpoint.targets(modules, params, tensors))
        checkpoint.unpack_state(modules, opt, tensors, meta["optimizer"])
        st = meta["train"]
        if rank == 0:
            checkpoint.truncate_log(run / "log.jsonl", st["step"])
    # a resumed run redraws its pool from the seeds and goes on from the saved position
    pool = PairPool(source, cfg, slots, rank, st["pool"], st["pool_pos"])

    def save() -> None:
        t = time.perf_counter()  # the wall time counts the step's kernels still on the device
        st.update(pool=pool.pool, pool_pos=pool.pos, wall_s=st["wall_s"] + clock(cfg.device) - t)
        tensors, opt_meta = checkpoint.pack_state(modules, opt)
        tensors = parallel.gathered(tensors, rank == 0) if sharded else tensors  # every rank sends
        if rank == 0:
            state = {"train": st, "optimizer": opt_meta, "config": dataclasses.asdict(cfg)}
            state |= {"base_sha256": base} if base else {}
            checkpoint.save(run / "checkpoints", st["step"], tensors, state)

    steps, name = range(st["step"], cfg.steps), f"{cfg.method} {cfg.backbone}"
    bar = tqdm(steps, name, cfg.steps, initial=st["step"], disable=rank > 0 or None)
    mon = Monitor(cfg, run, rank, ema, source, opt)  # --sample-every, --tensorboard (rank 0)
    t0, log_file = clock(cfg.device) - st["wall_s"], run / "log.jsonl"
    with open(log_file, "a") if rank == 0 else nullcontext() as log, sigint_flag() as interrupt:
        for step in bar:
            opt.zero_grad(set_to_none=True)  # the last gradient is not kept through the pairs
            b = pool.next(per_step)  # lines 3–11: pairs (x_t, t, dx_t/dt), prompts, w, mask
            r = r_schedule(step, **r_of)  # line 12
            denom, parts = b["keep"].sum().clamp(min=1) if A > 1 else None, []  # the step's kept
            for i, mb in enumerate(split(b, A)):  # micro-batches; gradients averaged on the last
                on = dict(cond=source.cond(mb["prompt"]), w=mb["w"])  # the student is F(x, t)
                F, F_g, t = partial(F_theta, **on), partial(F_grad, **on), mb["t"]
                with parallel.gradient_sync(wrapped, i == A - 1):
                    with autocast(cfg.device, cfg.precision):  # lines 13–16
                        loss, stats = scm_loss(
                            F, mb["x_t"], t, mb["dxdt"], wrapped[1](t), r=r, mask=mb["keep"],
                            F_grad=F_g, denom=denom, **hyper
                        )  # fmt: skip
                    loss.backward()  # line 17, then clipping and a guard against NaN/Inf steps
                parts.append(stats)
            stats = merge_stats(parts)
            grad_norm = parallel.whole(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            logs = log is not None and (step % cfg.log_every == 0 or step + 1 == cfg.steps)
            # One host read a step (one stall on a GPU): the guard's flag, the kept share and on a
            # log line its statistics. A skip on the device (an update masked by torch.where) would
            # read nothing but rewrite weights and moments at every step and see a NaN streak late.
            read = dict(finite=stats["loss"].isfinite() & grad_norm.isfinite(), kept=stats["kept"])
            got = host(read | (dict(stats, grad_norm=grad_norm) if logs else {}))
            finite = bool(got["finite"])
            if finite:
                opt.step()
                ema_update(ema, student, cfg.ema_decay, step)
            st["bad_streak"] = 0 if finite else st["bad_streak"] + 1
            st["nan_skipped"] += not finite
            if st["bad_streak"] >= cfg.max_bad_steps:
                raise RunError(
                    f"{st['bad_streak']} NaN/Inf steps in a row at step {step}; the last good "
                    f"checkpoint is in {run}/checkpoints (try a lower --lr)"
                )
            st.update(
                step=step + 1, pairs=st["pairs"] + per_step * world, kept_n=st["kept_n"] + 1
            )  # line 18
            st.update(kept_sum=st["kept_sum"] + got["kept"], wall_s=time.perf_counter() - t0)
            if logs:
                rec = {"step": step, **{k: got[k] for k in stats}, "grad_norm": got["grad_norm"]}
                rec |= {"wall_s": st["wall_s"]} | device_memory_mb(cfg.device)  # CUDA: rank 0's
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{got['loss']:.4f}", r=f"{r:.2f}")
            mon.step(st["step"], rec if logs else None)
            if st["step"] % cfg.ckpt_every == 0 or interrupt["stop"]:
                save()
            if interrupt["stop"]:
                raise KeyboardInterrupt
    if st["step"] % cfg.ckpt_every:
        save()
    return ema, st


def host(values: dict) -> dict:
    """The tensors among `values` read to the host in one copy (one sync on a GPU), a 0-dim one as a
    float, others as lists of floats (float64 holds every value exactly); the rest as they are."""
    tensors = [v.detach().reshape(-1) for v in values.values() if isinstance(v, torch.Tensor)]
    flat = iter(torch.cat([v.double() for v in tensors]).tolist() if tensors else [])
    return {
        k: (next(flat) if v.dim() == 0 else [next(flat) for _ in range(v.numel())])
        if isinstance(v, torch.Tensor)
        else v
        for k, v in values.items()
    }


def main(argv: list[str] | None = None) -> int:
    """parse → validate → teacher and pair source (rank 0 first) → run directory → train →
    evaluate → export → metrics.json → figures. Exit 0; 1: the run failed; 2: bad input; 130: ^C."""
    rank, local_rank, world = parallel.ranks()
    teacher = None
    try:
        cfg = parse_args(argv)
        validate(cfg)  # config.parallel_problems: the device, the processes, --shard
        # this rank's device (cuda: cuda:LOCAL_RANK), made current; the process group joined
        cfg = dataclasses.replace(cfg, device=parallel.init(cfg.device, local_rank, world))
        set_threads(cfg.threads)
        with rank0_first(rank):  # toy teachers are trained and cached once
            if cfg.bank:  # the teacher's weights for θ only: no teacher pass, text encoder or VAE
                source = bank.BankPairs(cfg)
                student = source.student()
            else:
                teacher = backbones.build(cfg)
                student = teacher.student()
                source = (TBCMPairs if cfg.method == "tbcm" else SCMPairs)(cfg, teacher)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.out)
    if rank == 0:
        if cfg.overwrite:
            shutil.rmtree(run, ignore_errors=True)
        checkpoint.write_json(run / "config.json", dataclasses.asdict(cfg))
    try:
        ema, st = train(cfg, student, source, run, rank, world)
    except KeyboardInterrupt:
        print(
            f"interrupted; a checkpoint is in {run}/checkpoints: continue with --resume",
            file=sys.stderr,
        )
        return 130
    except (RunError, UsageError) as e:  # UsageError: a bank shard found corrupted mid-run
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunError) else 2
    mem = device_memory_mb(cfg.device, world)  # CUDA: each rank's peaks (every rank gathers)
    # --shard fsdp: the evaluated student whole on rank 0, in a fresh student (every rank sends)
    ema = parallel.unsharded(ema, (source if cfg.bank else teacher).student, keep=rank == 0)
    if rank > 0:
        return 0
    teacher = teacher or backbones.build(cfg)  # from a bank: the teacher only now, for evaluation
    ev, shown = evaluate_samplers(cfg, teacher, ema)
    teacher.export(ema, run / "student")
    wall, kept = st["wall_s"], st["kept_sum"] / max(st["kept_n"], 1)
    trained = dict(
        steps=st["step"], wall_s=wall, peak_rss_mb=peak_rss_mb(), pairs_per_s=st["pairs"] / wall
    )
    trained |= dict(filtered_fraction=1 - kept, nan_skipped=st["nan_skipped"], processes=world)
    metrics = {"backbone": cfg.backbone, "method": cfg.method, "train": trained | mem, "eval": ev}
    checkpoint.write_json(run / "metrics.json", metrics)
    report.samples_png(run / "samples.png", shown, teacher.prompt_names)
    report.training_png(run / "training.png", run / "log.jsonl")
    report.summary(metrics, run)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
