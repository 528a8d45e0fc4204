"""One variant of bench/cost.py in its own process: time, stages and memory of its training steps.

cost_step's timed steps → time per step and pair, Fig. 4's stages, memory; or (--extras) text
encoding per pair vs K, the JVP in forward passes, 1-step student vs N-step teacher sampling.
Prints one JSON line.
    python bench/cost_worker.py --steps 5 --warmup 2 -- <train.py flags>
"""

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from cost_step import STAGES, Stages, bound, build, train_steps

import backbones
import sana
from config import Config, Parser, UsageError, parse_args, validate
from loss import jvp_cs_dF_dt
from runtime import clock, device_memory_mb, peak_rss_mb, rss_mb, set_threads
from sampler import consistency_sample, default_times
from trajectory import reference_route, rollout
from trigflow import TrigFlow


def measure(cfg: Config, steps: int, warmup: int) -> dict:
    """`warmup + steps` training steps; means over the last `steps` (the first JVP sets up forward
    AD). Memory: the floor (the interpreter with its libraries), after loading, VmHWM at the end."""
    if cfg.backbone == "sana":  # the libraries' own footprint is not training memory
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    floor, stages = rss_mb(), Stages(cfg.device)
    try:
        t0 = clock(cfg.device)
        student, source = build(cfg, stages)
        load_s, loaded = clock(cfg.device) - t0, rss_mb()
        if stages.cuda:
            torch.cuda.reset_peak_memory_stats()
        _, marks = train_steps(cfg, student, source, stages, steps, warmup)
        peak = peak_rss_mb()  # at the last step
    finally:
        stages.close()
    step_s, pairs = (marks[-1] - marks[warmup]) / steps, cfg.prompts * cfg.K * (cfg.N - 1)
    t = {s: stages.time[s] / steps for s in STAGES}  # per step
    t["other"] = step_s - sum(t.values())  # pool shuffle, r, lookups: no stage, no memory
    dyn = {s: stages.mem[s] for s in STAGES} | {"other": None}
    res = dict(
        step_s=step_s,
        time_per_pair_s=step_s / pairs,
        pairs_per_step=pairs,
        peak_rss_mb=peak,
        rss_floor_mb=floor,
        rss_after_load_mb=loaded,
        peak_above_floor_mb=peak - floor,
        load_s=load_s,
        steps_measured=steps,
        threads=torch.get_num_threads(),
        stages={
            s: dict(s_per_step=v, share=v / step_s, dynamic_mem_mb=dyn[s]) for s, v in t.items()
        },
    )
    if stages.cuda:  # allocated: the peak across Stages' resets; reserved memory only grows
        res["cuda_peak_mb"] = max(stages.cuda_peak, torch.cuda.max_memory_allocated() / 2**20)
        res["max_memory_reserved_mb"] = device_memory_mb(cfg.device)["max_memory_reserved_mb"]
    return res


def extras(cfg: Config, Ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Text encoding per pair vs K (Sana), the JVP in student forward passes, and the 1-step
    student's sampling throughput against teacher@N with CFG (2N network evaluations)."""
    teacher, sd, dev = backbones.build(cfg), cfg.sigma_d, cfg.device
    F_theta = TrigFlow(teacher.student(), guidance_scale=cfg.guidance_scale)

    def median_s(fn: Callable, reps: int = 3, warm: bool = True) -> float:
        ts = []
        for i in range(-int(warm), reps):  # i = −1: the warm-up call
            t = clock(dev)
            fn()
            ts += [clock(dev) - t] if i >= 0 else []
        return statistics.median(ts)

    res, per_traj = {}, cfg.N - 1
    if isinstance(
        teacher, backbones.SanaTeacher
    ):  # one caption per sCM pair, one prompt per K·(N − 1)
        names = iter(range(10**6))
        enc = median_s(
            lambda: sana.encode_prompts(
                teacher.parts,
                [f"prompt {next(names)}"],
                teacher.L,
                instruction=not cfg.plain_prompts,
            )
        )
        by_K = {K: enc / (K * per_traj) for K in Ks}
        res["text_encode"] = dict(s_per_prompt=enc, scm_s_per_pair=enc, tbcm_s_per_pair_by_K=by_K)
    P, g, shape = (
        cfg.prompts * cfg.K * per_traj,
        torch.Generator().manual_seed(0),
        teacher.data_shape,
    )
    x = torch.randn((P, *shape), generator=g).to(dev)  # x_t/σ_d
    t = (torch.rand(P, generator=g) * 1.5 + 0.02).to(dev)
    dxdt = (sd * torch.randn((P, *shape), generator=g)).to(dev)
    prompt, w = torch.arange(P) % len(teacher.prompt_names), torch.full((P,), cfg.cfg_scales[0])
    prompt, w = prompt.to(dev), w.to(dev)
    F = bound(F_theta, teacher.cond(prompt), w)
    with torch.no_grad():
        f = median_s(lambda: F(x, t))
    jvp = median_s(lambda: jvp_cs_dF_dt(F, x, t, dxdt, sd))
    fb = median_s(lambda: F(x, t).square().mean().backward())
    res["jvp"] = dict(batch=P, forward_s=f, jvp_s=jvp, fwd_bwd_s=fb)
    res["jvp"] |= dict(jvp_in_forwards=jvp / f, fwd_bwd_in_forwards=fb / f)
    B, N = min(P, 8), cfg.eval_teacher_steps
    z, cond = (sd * torch.randn((B, *shape), generator=g)).to(dev), teacher.cond(prompt[:B])
    F_teacher = TrigFlow(teacher.velocity, uncond=teacher.uncond)
    route, times = reference_route(N, cfg.shift), default_times(1, cfg.t_mid)
    with torch.no_grad():
        teacher_s = median_s(lambda: rollout(F_teacher, z, route, cond, w[:B], sd), 1, warm=False)
        student_s = median_s(lambda: consistency_sample(bound(F_theta, cond, w[:B]), z, times, sd))
    sampling = dict(
        batch=B, teacher_steps=N, teacher_nfe=2 * N, teacher_samples_per_s=B / teacher_s
    )
    sampling |= dict(student_1step_samples_per_s=B / student_s, speedup=teacher_s / student_s)
    return res | {"sampling": sampling}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = Parser(description=__doc__.split("\n")[0], usage=__doc__.split("\n")[5].strip())
    p.add_argument(
        "--steps", type=int, default=5, within=">= 1", help="measured steps (default: 5)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, within=">= 0", help="steps before them (default: 2)"
    )
    p.add_argument("--extras", action="store_true", help="the extras instead (default: off)")
    try:
        a, train_flags = p.parse_before_dashes(argv)
        cfg = parse_args([*train_flags, "--steps", str(a.warmup + a.steps)])
        validate(cfg, run_dir=False)
        set_threads(cfg.threads)  # as train.py does
        res = extras(cfg) if a.extras else measure(cfg, a.steps, a.warmup)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
