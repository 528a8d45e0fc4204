"""Fig. 4's stages: train.train's step (Alg. 1) composed from pairs, loss and the optimiser, with a
timer around each stage; bench/cost_worker.py runs it. The same draws and passes as training, so
3 steps give train.train's student bit for bit (tests/test_bench.py).
"""

import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import backbones
import optimizers
import sana
import sana_io
from bank import BankPairs
from brightness_filter import black_distance
from config import Config
from loss import LogvarHead, loss_from_target, r_schedule, scm_target
from pairs import (
    Batch,
    PairPool,
    PairSource,
    SCMPairs,
    TBCMPairs,
    filter_keep,
    rollout_inputs,
    seeded,
    split,
)
from runtime import autocast, ema_of, ema_update, rss_mb, synchronize
from trajectory import forward_pairs, logit_normal_times, rollout
from trigflow import TrigFlow

# data: rollout inputs, real images read, bank shards; vae_encode: DC-AE; text_encode: every prompt
# afresh; teacher: rollout and brightness filter, or CFG velocity; jvp: Alg. 1 lines 13–14 (per
# micro-batch); student_fwd_bwd: lines 15–17 up to the clipped gradient; optimizer: step and EMA.
STAGES = ("data", "vae_encode", "text_encode", "teacher", "jvp", "student_fwd_bwd", "optimizer")


class Stages:
    """`with stages("jvp"):` adds the block's wall time to that stage once `active`, and keeps its
    largest memory rise: RSS (a thread reads it every millisecond), or on CUDA the allocator's peak
    above its level at entry (`cuda_peak`: the peak across those resets). Stages do not nest."""

    def __init__(self, device: str):
        self.device, self.cuda = device, device.startswith("cuda")
        self.active, self.inside = False, False
        self.time: dict[str, float] = defaultdict(float)
        self.mem: dict[str, float] = defaultdict(float)
        self.cuda_peak, self._peak, self._stop = 0.0, 0.0, threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            if self.inside:
                self._peak = max(self._peak, rss_mb())

    def close(self) -> None:
        self._stop.set()
        self._sampler.join()

    def sync(self) -> None:
        synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        if self.inside:
            raise RuntimeError(f"stage {name} inside another stage")
        if self.cuda:
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        entry = self._peak = torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mb()
        self.inside, t0 = True, time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.time[name] += time.perf_counter() - t0
            rss_peak = max(self._peak, rss_mb())
            peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else rss_peak
            self.mem[name] = max(self.mem[name], peak - entry)
            self.inside = False


def fresh_cond(teacher: Any, prompt: torch.Tensor) -> Any:
    """The teacher's conditioning with every prompt encoded afresh (Sana's cache emptied first):
    the realistic case is a prompt set far larger than any cache (see bench/cost.py)."""
    getattr(teacher, "_cache", {}).clear()
    return teacher.cond(prompt)


class TimedTBCM(TBCMPairs):
    """pairs.TBCMPairs.part piece by piece, each piece in its stage."""

    def __init__(self, cfg: Config, teacher: Any, stage: Stages):
        super().__init__(cfg, teacher)
        self.stage = stage

    def part(self, pool: int, part: int, slots: range) -> Batch:
        cfg, T, stage, key = self.cfg, self.teacher, self.stage, (self.cfg.seed, pool, part)
        with stage("data"):  # Alg. 1 lines 4–5
            inputs = rollout_inputs(cfg, len(T.prompt_names), T.data_shape, key, slots)
            route, prompt, w, z, gens = inputs
        with stage("text_encode"):  # one encoding per prompt slot (Sec. 4.1)
            cond = fresh_cond(T, prompt)
        with stage("teacher"):  # lines 6–10
            with autocast(cfg.device, cfg.precision):
                p = rollout(self.F_teacher, z, route, cond, w, cfg.sigma_d)
            keep = filter_keep(black_distance(p.x0.float(), T.black, cfg.sigma_d), gens, cfg)
        prompt, w, keep = prompt[p.traj], w[p.traj], keep[p.traj]  # line 11
        return dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt, w=w, keep=keep)


class TimedSCM(SCMPairs):
    """pairs.SCMPairs.part piece by piece, each piece in its stage (SanaTeacher.real_data too)."""

    def __init__(self, cfg: Config, teacher: Any, stage: Stages):
        super().__init__(cfg, teacher)
        self.stage = stage

    def real_data(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.teacher
        if not isinstance(T, backbones.SanaTeacher):
            with self.stage("data"):
                return T.real_data(n, g)
        with self.stage("data"):  # as SanaTeacher.real_data: drawn with replacement, read
            k = torch.randint(len(T.image_paths), (n,), generator=g)
            paths = [T.image_paths[j] for j in k.tolist()]
            pixels = torch.stack([sana_io.load_image(path, T.resolution) for path in paths])
        with self.stage("vae_encode"):
            x0 = sana.encode_images(T.parts, pixels, self.cfg.vae_batch)
            return x0.to(T.device, torch.float32), T.image_prompt[k].to(T.device)

    def part(self, pool: int, part: int, slots: range) -> Batch:
        cfg, dev, stage = self.cfg, self.cfg.device, self.stage
        ws, n = torch.tensor(cfg.cfg_scales), cfg.K * (cfg.N - 1)
        gens = [seeded(cfg.seed, pool, part, j) for j in slots]
        data = [self.real_data(n, g) for g in gens]  # FM units
        with stage("data"):
            x0, prompt = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
            w = torch.cat([ws[torch.randint(len(ws), (n,), generator=g)] for g in gens]).to(dev)
            t = [logit_normal_times(n, cfg.P_mean, cfg.P_std, cfg.sigma_d, g) for g in gens]
            z = torch.cat([torch.randn((n, *x0.shape[1:]), generator=g) for g in gens])
            t, z = torch.cat(t).to(dev), cfg.sigma_d * z.to(dev)
        with stage("text_encode"):  # every caption
            cond = fresh_cond(self.teacher, prompt)
        with stage("teacher"), autocast(cfg.device, cfg.precision):
            p = forward_pairs(self.F_teacher, cfg.sigma_d * x0, z, t, cond, w, cfg.sigma_d)
        keep = torch.ones_like(t, dtype=torch.bool)
        return dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt, w=w, keep=keep)


class TimedBank(BankPairs):
    """bank.BankPairs, its part one stage, data: a shard read, dx_t/dt rebuilt, the filter drawn."""

    def __init__(self, cfg: Config, stage: Stages):
        super().__init__(cfg)
        self.stage = stage

    def part(self, pool: int, part: int, slots: range) -> Batch:
        with self.stage("data"):
            return super().part(pool, part, slots)


def build(
    cfg: Config, stage: Stages, own_memory: bool = False
) -> tuple[torch.nn.Module, PairSource]:
    """What train.main builds, the student and the pair source; the source timed by `stage`.
    own_memory: a Sana teacher's weights copied into memory of their own (sana.hold_in_memory),
    for a bench that measures the RSS (bench/cost_paper.py on a CPU)."""
    if cfg.bank:
        source = TimedBank(cfg, stage)
        return source.student(), source
    teacher = backbones.build(cfg)
    if own_memory and isinstance(teacher, backbones.SanaTeacher):
        p = teacher.parts
        sana.hold_in_memory(*(m for m in (p.transformer, p.text_encoder, p.vae) if m is not None))
    timed = TimedTBCM if cfg.method == "tbcm" else TimedSCM
    return teacher.student(), timed(cfg, teacher, stage)


def bound(F_theta: TrigFlow, cond: Any, w: torch.Tensor) -> Callable:
    """The student with its condition and guidance bound, as loss.py takes it: F(x_t/σ_d, t)."""
    return lambda x, t: F_theta(x, t, cond, w)


def train_steps(
    cfg: Config,
    student: torch.nn.Module,
    source: PairSource,
    stage: Stages,
    steps: int,
    warmup: int,
) -> tuple[dict[str, torch.nn.Module], list[float]]:
    """train.train's loop in one process (Alg. 1 lines 2–18, no checkpoints or logs), `stage` active
    after `warmup` steps. Returns the modules and the times of each step's start and the end."""
    torch.manual_seed(cfg.seed)
    student, head = student.train(), LogvarHead().to(cfg.device)  # line 2: θ from the teacher; φ
    ema, pool = ema_of(student, cfg.ema_decay), PairPool(source, cfg, range(cfg.prompts), rank=0)
    params = [p for p in student.parameters() if p.requires_grad] + list(head.parameters())
    opt = optimizers.build([{"params": params}], cfg)  # train.train's --optimizer
    F_theta = TrigFlow(student, guidance_scale=cfg.guidance_scale)
    per_step, fd_eps = cfg.prompts * cfg.K * (cfg.N - 1), cfg.fd_eps if cfg.jvp == "fd" else None
    r_of = dict(H=cfg.H, S_r=cfg.S_r, T_r=cfg.T_r, r_final=cfg.r_final, direct=cfg.r_direct)
    marks: list[float] = []
    for step in range(warmup + steps):
        stage.active = step >= warmup
        stage.sync()
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)  # as train.train: no gradient kept through the pairs
        b = pool.next(per_step)  # lines 3–11, in the source's stages
        r = r_schedule(step, **r_of)
        finite, A = torch.ones((), dtype=torch.bool, device=cfg.device), cfg.accum_steps
        denom = b["keep"].sum().clamp(min=1) if A > 1 else None  # train.train's micro-batches
        for mb in split(b, A):
            F, x_t, t = bound(F_theta, source.cond(mb["prompt"]), mb["w"]), mb["x_t"], mb["t"]
            with autocast(cfg.device, cfg.precision):
                with stage("jvp"):  # lines 13–14: F⁻ and the normalised tangent g
                    F_minus, g, g_norm = scm_target(
                        F, x_t, t, mb["dxdt"], r=r, sigma_d=cfg.sigma_d, c=cfg.c, fd_eps=fd_eps
                    )
                    extra = {"g_norm": g_norm.mean(), "r": r}
                with stage("student_fwd_bwd"):  # lines 15–16
                    kw = dict(sigma_d=cfg.sigma_d, t_min=cfg.t_min, mask=mb["keep"], extra=extra)
                    loss, _ = loss_from_target(F, x_t, t, F_minus, g, head(t), denom=denom, **kw)
            with stage("student_fwd_bwd"):  # line 17's gradient (one process: no all-reduce)
                loss.backward()
            finite &= torch.isfinite(loss)
        with stage("student_fwd_bwd"):  # clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with stage("optimizer"):  # line 17's step, skipped on NaN/Inf as train.train does: one read
            if bool(finite & torch.isfinite(grad_norm)):
                opt.step()
                ema_update(ema, student, cfg.ema_decay, step)
    stage.sync()
    return dict(student=student, head=head, ema=ema), [*marks, time.perf_counter()]
