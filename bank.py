"""Beyond the paper: TBCM's pairs recorded offline, so that the student trains without the teacher.

The teacher only makes pairs (Eq. 9, Alg. 1 lines 4–11). `build` rolls it out as pairs.TBCMPairs
does (same seeds), storing per pair x_t, t and both CFG velocities (dx_t/dt is rebuilt bit for bit).
Over 250 lines: the format, its writer, its reader and the command line belong together.
"""

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import backbones
import config
import parallel
from brightness_filter import black_distance
from checkpoint import atomic_path, tensors_sha256, weights_sha256, write_json
from config import Config, Parser, UsageError, flag
from pairs import Batch, filter_keep, rollout_inputs
from runtime import autocast, rank0_first, set_threads
from trajectory import rollout
from trigflow import TrigFlow, guided

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REBUILD = "delete it and rerun bank.py build"


class BankError(UsageError):
    """A missing, incomplete, corrupted or mismatched bank; the message is one line (exit 2)."""


def shard_path(bank: Path, pool: int) -> Path:
    return bank / f"pool-{pool:06d}.safetensors"


# ------------------------------------------------------------------------------------------- build
class Recording:
    """A CFG teacher that records its two velocities (v_u, v_c) at every call and returns `guided`
    of them, i.e. exactly what the teacher itself returns (TrigFlow.__call__)."""

    def __init__(self, teacher: TrigFlow):
        self.teacher, self.v_u, self.v_c = teacher, [], []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, w: torch.Tensor):
        v_u, v_c = self.teacher.velocities(x, t, cond)
        self.v_u.append(v_u), self.v_c.append(v_c)
        return guided(x, t, v_u, v_c, w)


def record_part(cfg: Config, teacher: Any, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One optimiser step's pairs for all prompt slots, rolled out as pairs.TBCMPairs does."""
    n_prompts, slots = len(teacher.prompt_names), range(cfg.prompts)
    route, prompt, w, z, _ = rollout_inputs(cfg, n_prompts, teacher.data_shape, key, slots)
    F = Recording(TrigFlow(teacher.velocity, uncond=teacher.uncond))
    with autocast(cfg.device, cfg.precision):
        p = rollout(F, z, route, teacher.cond(prompt), w, cfg.sigma_d)
    slot_cond = teacher.cond(prompt[:: cfg.K])  # one row per prompt slot
    slot_cond = slot_cond if isinstance(slot_cond, tuple) else (slot_cond,)
    score = black_distance(p.x0.float(), teacher.black, cfg.sigma_d)
    v_u, v_c = torch.cat(F.v_u[1:]), torch.cat(F.v_c[1:])  # the π/2 state is no pair
    rec = dict(x_t=p.x_t, t=p.t, v_u=v_u, v_c=v_c, prompt=prompt, w=w, score=score)
    return rec | {f"cond/{i}": c for i, c in enumerate(slot_cond)}


def write_shard(path: Path, parts: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> int:
    """Stack a pool's parts (leading dim pool_steps), write them atomically; returns the bytes.
    States and velocities in `dtype`; times, scores, CFG scales and conditioning stay float32."""
    tensors = {}
    for k in parts[0]:
        v = torch.stack([q[k] for q in parts]).detach().cpu()
        if v.is_floating_point():
            v = v.to(dtype if k in ("x_t", "v_u", "v_c") else torch.float32)
        tensors[k] = v.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sha256": tensors_sha256(tensors)})
    return path.stat().st_size


def manifest_for(cfg: Config, teacher: Any, dtype: str) -> dict:
    """What the pairs are: enough to refuse a mismatched training run and to rebuild the bank."""
    c, first = dataclasses.asdict(cfg), torch.zeros(1, dtype=torch.long, device=cfg.device)
    m = dict(version=config.BANK_VERSION, dtype=dtype, seed=cfg.seed)
    m |= dict(teacher_sha256=weights_sha256(teacher.velocity))
    m |= dict(config={k: c[k] for k in config.PAIR_FIELDS + config.SOURCE_FIELDS})
    m |= dict(data_shape=list(teacher.data_shape), n_prompts=len(teacher.prompt_names))
    m |= dict(pairs_per_pool=cfg.pool_steps * cfg.prompts * cfg.K * (cfg.N - 1))
    return m | dict(cond_tuple=isinstance(teacher.cond(first), tuple))


def build(cfg: Config, out: Path, pools: int, dtype: str, rank: int = 0, world: int = 1) -> dict:
    """Roll out pools 0 … pools − 1 (this rank: those ≡ rank mod world) that are not on disk yet."""
    with rank0_first(rank):  # toy teachers are trained and cached once
        teacher = backbones.build(cfg)
    manifest, mpath = manifest_for(cfg, teacher, dtype), out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    if mpath.exists():
        if json.loads(mpath.read_text()) != json.loads(json.dumps(manifest)):
            raise BankError(f"{out} holds a bank of other pairs or teacher; pass another --out")
    elif rank == 0:
        write_json(mpath, manifest)
    mine = range(rank, pools, world)
    for tmp in out.glob(".tmp-pool-*"):  # a killed build's partial shard of this rank's pools
        if int(tmp.name[10:16]) in mine:
            tmp.unlink()
    todo = [p for p in mine if not shard_path(out, p).exists()]
    t0, nbytes, pairs = time.perf_counter(), 0, 0
    for pool in tqdm(todo, desc=f"bank rank {rank}", disable=None):
        parts = [record_part(cfg, teacher, (cfg.seed, pool, k)) for k in range(cfg.pool_steps)]
        nbytes += write_shard(shard_path(out, pool), parts, DTYPES[dtype])
        pairs += manifest["pairs_per_pool"]
    wall = time.perf_counter() - t0
    stats = dict(pools_written=len(todo), pairs=pairs, bytes=nbytes, wall_s=wall)
    return stats | dict(bytes_per_pair=nbytes / max(pairs, 1), pairs_per_s=pairs / max(wall, 1e-9))


# -------------------------------------------------------------------------------------------- read
class Shards:
    """A bank's shards in pool order (pool p reads shard p mod n), one ahead in a background thread:
    at most two in memory. Each shard is checked against its SHA-256 when read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = config.read_bank_manifest(path)
        pools = sorted(int(f.name[5:11]) for f in self.path.glob("pool-??????.safetensors"))
        self.n = len(pools)
        if self.n == 0:
            raise BankError(f"--bank {path}: no shards yet (pool-000000.safetensors is missing)")
        if pools != list(range(self.n)):
            gap = min(set(range(pools[-1] + 1)) - set(pools))
            missing = shard_path(self.path, gap).name
            raise BankError(f"--bank {path}: {missing} is missing (rerun bank.py build)")
        self._io, self._loaded = ThreadPoolExecutor(1), {}

    def _read(self, shard: int) -> dict[str, torch.Tensor]:
        path = shard_path(self.path, shard)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                want = (f.metadata() or {}).get("sha256")
        except (SafetensorError, OSError) as e:
            raise BankError(f"{path}: unreadable shard ({e}); {REBUILD}") from e
        if want != tensors_sha256(tensors):
            raise BankError(f"{path}: checksum mismatch (corrupted); {REBUILD}")
        return tensors

    def __getitem__(self, pool: int) -> dict[str, torch.Tensor]:
        """Pool `pool`'s shard; starts reading the next one."""
        s = pool % self.n
        fut: Future = self._loaded.pop(s, None) or self._io.submit(self._read, s)
        after = (s + 1) % self.n
        self._loaded = {after: self._io.submit(self._read, after)} if self.n > 1 else {}
        return fut.result()


class BankPairs:
    """A pairs.PairSource reading a bank: an online TBCM run's pairs, the filter's mask drawn from
    the same streams as online, and the student built from the teacher's weights alone."""

    def __init__(self, cfg: Config):
        self.cfg, self.shards = cfg, Shards(cfg.bank)
        m = self.shards.manifest
        self.seed, self.n_prompts = m["seed"], m["n_prompts"]
        self.data_shape = tuple(m["data_shape"])
        self.cond_table: dict[int, tuple[torch.Tensor, ...]] = {}  # the current pool's prompts
        self._pool, self._rec = -1, {}
        needed, n = -(-cfg.steps // cfg.pool_steps), self.shards.n
        if needed > n:
            reuse = f"its pairs are reused (reshuffled, new filter draws) {needed / n:.1f} times"
            note = f"note: {cfg.bank} holds {n} pools, {cfg.steps} steps need {needed}: {reuse}"
            print(note, file=sys.stderr)

    def student(self) -> torch.nn.Module:
        """The student from the teacher's weights, which must be those the bank was built from."""
        student, sha = backbones.build_student(self.cfg)
        if sha != self.shards.manifest["teacher_sha256"]:
            teacher = "another teacher than the one loaded (weights differ)"
            raise BankError(f"{flag('bank')} {self.cfg.bank} was built from {teacher}")
        return student

    def cond(self, prompt: torch.Tensor) -> Any:
        rows = [self.cond_table[i] for i in prompt.tolist()]
        out = tuple(torch.stack(c) for c in zip(*rows, strict=True))
        return out if self.shards.manifest["cond_tuple"] else out[0]

    def part(self, pool: int, part: int, slots: range) -> Batch:
        """Step `part` of pool `pool` for `slots`, ordered as an online rollout of those slots."""
        cfg, K, dev = self.cfg, self.cfg.K, self.cfg.device
        key = (self.seed, pool, part)  # the filter's uniforms follow these draws in each stream
        *_, gens = rollout_inputs(cfg, self.n_prompts, self.data_shape, key, slots)
        if pool != self._pool:
            self._pool, self._rec, self.cond_table = pool, self.shards[pool], {}
        rec = self._rec
        lo, hi = slots.start * K, slots.stop * K  # this rank's trajectories
        T = hi - lo

        def mine(k: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            """This rank's trajectories of a time-major [steps·T_all, ...] record."""
            v = rearrange(rec[k][part], "(n T) ... -> n T ...", T=rec["prompt"].shape[1])
            return rearrange(v[:, lo:hi], "n T ... -> (n T) ...").to(device=dev, dtype=dtype)

        x_t, t = mine("x_t", torch.float32), mine("t")
        v_u, v_c = mine("v_u", torch.float32), mine("v_c", torch.float32)
        prompt, w, score = (rec[k][part][lo:hi].to(dev) for k in ("prompt", "w", "score"))
        traj = torch.arange(T, device=dev).repeat(len(t) // T)
        # dx_t/dt = σ_d·F, rebuilt one time step at a time (the shapes of the rollout's calls)
        sd, at = cfg.sigma_d, [slice(i, i + T) for i in range(0, len(t), T)]
        dxdt = torch.cat([sd * guided(x_t[i] / sd, t[i], v_u[i], v_c[i], w) for i in at])
        n_cond = sum(k.startswith("cond/") for k in rec)
        for j in slots:  # each slot's prompt → its conditioning
            self.cond_table[int(rec["prompt"][part][j * K])] = tuple(
                rec[f"cond/{i}"][part][j].to(dev) for i in range(n_cond)
            )
        keep = filter_keep(score, gens, cfg)
        return dict(x_t=x_t, t=t, dxdt=dxdt, prompt=prompt[traj], w=w[traj], keep=keep[traj])


# -------------------------------------------------------------------------------------------- main
def parser() -> Parser:
    """`bank.py build`'s own flags; every other flag is train.py's (config.parser)."""
    usage = "python bank.py build --out BANK [--pools P] [--dtype D] [train.py flags of the pairs]"
    p = Parser(description=__doc__.split("\n")[0], usage=usage)
    p.add_argument("command", choices=["build"], help="build (or continue) a bank")
    p.add_argument("--out", required=True, help="the bank's folder (created; a rerun continues it)")
    pools = "pools to hold (default 0: for --steps)"
    p.add_argument("--pools", type=int, default=0, within=">= 0", help=pools)
    dtype = "storage of states and velocities (default: fp32, bit-identical; fp16/bf16: half)"
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=dtype)
    return p


def main(argv: list[str] | None = None) -> int:
    rank, local_rank, world = parallel.ranks()
    try:
        a, rest = parser().parse_known_args(argv)
        cfg = config.parse_args([*rest, "--out", a.out])
        config.validate(cfg, run_dir=False)
        # this rank's device (cuda: cuda:LOCAL_RANK), made current; the process group joined
        cfg = dataclasses.replace(cfg, device=parallel.init(cfg.device, local_rank, world))
        if cfg.method != "tbcm" or cfg.bank:
            drop = f"drop {flag('method')} scm and {flag('bank')}"
            raise UsageError(f"a bank holds TBCM trajectory pairs: {drop}")
        pools = a.pools or -(-cfg.steps // cfg.pool_steps)  # >= 1: validate's --steps, --pool-steps
        set_threads(cfg.threads)
        stats = build(cfg, Path(a.out), pools, a.dtype, rank, world)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({"bank": a.out, "pools": pools, **stats}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
