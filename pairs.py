"""Alg. 1 lines 3–11: where each optimiser step's pairs (x_t, t, dx_t/dt) come from, and their pool.

A pair source yields one step's pairs for some prompt slots: TBCM rolls the teacher out (Eq. 9),
the sCM baseline forward-diffuses real data, an offline bank (bank.py) reads recorded rollouts.
TrigFlow units (t = 0 is data, z ~ N(0, σ_d² I)); the teacher is seen through trigflow.TrigFlow.
"""

from typing import Any, Protocol

import torch

from brightness_filter import black_distance, mask_from_distance
from config import Config
from runtime import autocast
from trajectory import forward_pairs, logit_normal_times, rollout, sample_route
from trigflow import TrigFlow

# One step's pairs: x_t, t, dxdt [P, ...] and per pair its prompt index, CFG scale w, keep-mask [P].
Batch = dict[str, torch.Tensor]


def seeded(*key: int) -> torch.Generator:
    """The stream contract: every draw comes from a CPU generator seeded by a tuple of ints.

    Per (seed, pool, part): the route. Per prompt slot j, seeded(seed, pool, part, j): TBCM draws
    the prompt, K CFG indices, K noises, then the filter's K uniforms; sCM draws K·(N − 1) data
    indices, CFG indices, times, then noises. The pool's shuffle: seeded(seed, pool, 2**40 + rank).
    """
    # DEVIATION (official code: one global RNG): streams keyed by (seed, pool, step, slot), so
    # that N data-parallel ranks draw the pairs of one process and a resumed run redraws its pool
    # without saved RNG state — see tests/test_train.py::test_resume_is_bit_identical
    s = 0
    for k in key:
        s = (s * 1_000_003 + k) % 2**63
    return torch.Generator().manual_seed(s)


def rollout_inputs(cfg: Config, n_prompts: int, shape: tuple[int, ...], key: tuple, slots: range):
    """Alg. 1 lines 4–5 for one step: the route, and per prompt slot a prompt repeated for its K
    trajectories (Sec. 4.1: encoded once), a CFG scale and a noise per trajectory. Returns (route,
    prompt [T], w [T], z [T, ...], gens), T = len(slots)·K, `gens` advanced past these draws."""
    K, ws = cfg.K, torch.tensor(cfg.cfg_scales)
    gens = [seeded(*key, j) for j in slots]
    times = dict(shift=cfg.shift, P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_d=cfg.sigma_d)
    route = sample_route(cfg.scheme, cfg.N, seeded(*key), **times)  # one per step (official code)
    prompt = torch.cat([torch.randint(n_prompts, (1,), generator=g).expand(K) for g in gens])
    w = torch.cat([ws[torch.randint(len(ws), (K,), generator=g)] for g in gens])
    z = cfg.sigma_d * torch.cat([torch.randn((K, *shape), generator=g) for g in gens])  # [T, ...]
    return route, prompt.to(cfg.device), w.to(cfg.device), z.to(cfg.device), gens


def filter_keep(score: torch.Tensor, gens: list[torch.Generator], cfg: Config) -> torch.Tensor:
    """Alg. 1 line 10 (Sec. 4.3): the brightness filter's keep-mask [T] from each trajectory's
    distance to black, each slot's K uniforms drawn from that slot's stream."""
    K, how = cfg.K, dict(threshold=cfg.filter_threshold, mode=cfg.filter_mode)
    masks = [
        mask_from_distance(score[i * K : (i + 1) * K], **how, generator=g)
        for i, g in enumerate(gens)
    ]
    return torch.cat(masks)


class PairSource(Protocol):
    """What the pool draws from: TBCMPairs, SCMPairs, or bank.BankPairs."""

    def part(self, pool: int, part: int, slots: range) -> Batch:
        """Step `part` of pool `pool`: the pairs of prompt slots `slots`."""

    def cond(self, prompt: torch.Tensor) -> Any:
        """The conditioning of prompt indices [P], as the student sees it."""


class TBCMPairs:
    """Alg. 1 lines 4–11 online: the CFG teacher rolled out from noise along a route (Eq. 9)."""

    def __init__(self, cfg: Config, teacher: Any):
        self.cfg, self.teacher = cfg, teacher  # a backbones.Teacher
        self.F_teacher = TrigFlow(teacher.velocity, uncond=teacher.uncond)

    def cond(self, prompt: torch.Tensor) -> Any:
        return self.teacher.cond(prompt)

    def part(self, pool: int, part: int, slots: range) -> Batch:
        cfg, T, key = self.cfg, self.teacher, (self.cfg.seed, pool, part)
        route, prompt, w, z, gens = rollout_inputs(
            cfg, len(T.prompt_names), T.data_shape, key, slots
        )
        with autocast(cfg.device, cfg.precision):  # lines 6–9
            p = rollout(self.F_teacher, z, route, T.cond(prompt), w, cfg.sigma_d)
        keep = filter_keep(black_distance(p.x0.float(), T.black, cfg.sigma_d), gens, cfg)  # line 10
        # line 11: the pairs, time-major; each takes its trajectory's prompt, w and mask
        i = p.traj
        return dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt[i], w=w[i], keep=keep[i])


class SCMPairs:
    """The sCM / Sana-Sprint baseline (Sec. 4.2, diffusion space): real data forward-diffused to
    logit-normal times and the CFG teacher's velocity there; K·(N − 1) pairs per slot, as TBCM."""

    def __init__(self, cfg: Config, teacher: Any):
        self.cfg, self.teacher = cfg, teacher
        self.F_teacher = TrigFlow(teacher.velocity, uncond=teacher.uncond)

    def cond(self, prompt: torch.Tensor) -> Any:
        return self.teacher.cond(prompt)

    def part(self, pool: int, part: int, slots: range) -> Batch:
        cfg, T, dev, sd = self.cfg, self.teacher, self.cfg.device, self.cfg.sigma_d
        ws, n = torch.tensor(cfg.cfg_scales), cfg.K * (cfg.N - 1)
        gens = [seeded(cfg.seed, pool, part, j) for j in slots]
        data = [T.real_data(n, g) for g in gens]  # FM units
        x0, prompt = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
        w = torch.cat([ws[torch.randint(len(ws), (n,), generator=g)] for g in gens]).to(dev)
        t = [logit_normal_times(n, cfg.P_mean, cfg.P_std, sd, g) for g in gens]
        t = torch.cat(t).to(dev)
        z = sd * torch.cat([torch.randn((n, *x0.shape[1:]), generator=g) for g in gens]).to(dev)
        with autocast(cfg.device, cfg.precision):  # TrigFlow data = σ_d × FM data
            p = forward_pairs(self.F_teacher, sd * x0, z, t, T.cond(prompt), w, sd)
        keep = torch.ones_like(t, dtype=torch.bool)
        return dict(x_t=p.x_t, t=p.t, dxdt=p.dxdt, prompt=prompt, w=w, keep=keep)


class PairPool:
    """pool_steps steps' worth of pairs for this rank's prompt slots, drawn at once and shuffled
    across those steps. `pool` and `pos` (the next pair) are all a checkpoint needs: a pool is
    redrawn from its seeds."""

    def __init__(self, source: PairSource, cfg: Config, slots: range, rank: int, pool=-1, pos=0):
        self.source, self.cfg, self.slots, self.rank = source, cfg, slots, rank
        self.pool, self.pos = pool, pos
        self.pairs = self.draw(pool) if pool >= 0 else None

    def draw(self, pool: int) -> Batch:
        """All steps of pool `pool`, concatenated, shuffled; floats as float32 (bf16 rollouts)."""
        # DEVIATION (official code: each step trains on its own step's trajectories): --pool-steps
        # steps' pairs are shuffled across those steps to decorrelate a minibatch; 1 is the official
        # behaviour — see tests/test_train.py::test_resume_is_bit_identical (resumes mid-pool)
        parts = [self.source.part(pool, k, self.slots) for k in range(self.cfg.pool_steps)]
        pairs = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
        shuffle = seeded(self.cfg.seed, pool, 2**40 + self.rank)
        order = torch.randperm(len(pairs["t"]), generator=shuffle).to(self.cfg.device)
        return {
            k: v[order].float() if v.is_floating_point() else v[order] for k, v in pairs.items()
        }

    def next(self, n: int) -> Batch:
        """The next n pairs; a new pool is drawn when this one is used up."""
        if self.pairs is None or self.pos >= len(self.pairs["t"]):
            self.pool += 1
            self.pairs, self.pos = self.draw(self.pool), 0
        batch = {k: v[self.pos : self.pos + n] for k, v in self.pairs.items()}
        self.pos += n
        return batch


def split(b: Batch, n: int) -> list[Batch]:
    """One step's pairs as n micro-batches of nearly equal size, in order (gradient accumulation,
    --accum-steps); n = 1: the batch itself."""
    if n == 1:
        return [b]
    cut = {k: v.tensor_split(n) for k, v in b.items()}
    return [{k: v[i] for k, v in cut.items()} for i in range(n)]
