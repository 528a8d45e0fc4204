"""Beyond the paper: an offline trajectory bank, so the student trains with the teacher unloaded.

In TBCM the teacher only makes pairs (x_t, t, dx_t/dt) along its own trajectories (Eq. 9, Alg. 1);
the loss needs only the student. `build` rolls the teacher out exactly as `train.py` would online
(same seeds, routes, prompts, CFG scales, noises) and records, per pair, the state x_t, the time t
and the teacher's unconditional and conditional flow-matching velocities v_u, v_c (so dx_t/dt =
σ_d·F is rebuilt bit for bit by `trigflow.guided`, at the rollout's CFG scale), per trajectory the
prompt, w and the brightness filter's distance of its end point (the mask is drawn at training
time), and the prompts' conditioning (text embeddings on Sana).

    python bank.py build --out runs/bank-digits        # the default run's pairs (250 pools)
    python train.py --bank runs/bank-digits --out runs/digits-bank   # no teacher, no text encoder
    torchrun --nproc-per-node 2 bank.py build --out BANK   # rank r writes pools r, r + 2, ...

Layout: BANK/manifest.json (backbone, SHA-256 of the teacher's weights, scheme, N, K, prompts,
pool_steps, CFG scales, seed, shapes, storage dtype) and one BANK/pool-XXXXXX.safetensors per pool
(pool_steps optimiser steps of pairs for every prompt slot). A shard is written under a temporary
name and renamed, so a killed build leaves only whole shards and a rerun continues where it stopped;
each shard's header holds a SHA-256 of its tensors, checked when it is read.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from brightness_filter import black_distance
from trajectory import rollout
from trigflow import TrigFlow, guided

VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Config fields that define the pairs: taken from the manifest by `train.py --bank`, an error if
# contradicted.
PAIR_FIELDS = ("backbone", "scheme", "N", "shift", "P_mean", "P_std", "prompts", "K", "pool_steps",
               "cfg_scales", "sigma_d", "tiny", "resolution", "max_sequence_length", "teacher_steps")
# Fields a training run takes from the manifest unless given (where the teacher's weights are
# found).
SOURCE_FIELDS = ("pretrained", "prompts_file", "cache_dir", "data_dir")


class BankError(ValueError):
    """A missing, incomplete, corrupted or mismatched bank; the message is one line."""


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's tensors in state-dict order (names ignored: a wrapper's prefix does not matter)."""
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a shard's tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def shard_path(bank: Path, pool: int) -> Path:
    return bank / f"pool-{pool:06d}.safetensors"


# ------------------------------------------------------------------------------------------- build
class Recording:
    """A CFG teacher that records its two velocities (v_u, v_c) at every call and returns `guided` of them,
    i.e. exactly what the teacher itself returns (TrigFlow.__call__)."""

    def __init__(self, teacher: TrigFlow):
        self.teacher, self.v_u, self.v_c = teacher, [], []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any, w: torch.Tensor) -> torch.Tensor:
        v_u, v_c = self.teacher.velocities(x, t, cond)
        self.v_u.append(v_u), self.v_c.append(v_c)
        return guided(x, t, v_u, v_c, w)


def record_part(cfg, bb, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One optimiser step's pairs for all prompt slots, as `train.make_pool` rolls them out online."""
    from train import autocast, tbcm_inputs

    route, prompt, w, z, _ = tbcm_inputs(cfg, bb, key, range(cfg.prompts))
    teacher = Recording(bb.teacher)
    cond = bb.cond(prompt)
    with autocast(cfg):
        p = rollout(teacher, z, route, cond, w, cfg.sigma_d)
    slot_cond = bb.cond(prompt[:: cfg.K])  # one row per prompt slot
    slot_cond = slot_cond if isinstance(slot_cond, tuple) else (slot_cond,)
    rec = {"x_t": p.x_t, "t": p.t, "v_u": torch.cat(teacher.v_u[1:]), "v_c": torch.cat(teacher.v_c[1:]),
           "prompt": prompt, "w": w, "score": black_distance(p.x0.float(), bb.black, cfg.sigma_d)}
    return rec | {f"cond/{i}": c for i, c in enumerate(slot_cond)}


def write_shard(path: Path, parts: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> int:
    """Stack a pool's parts (leading dim pool_steps) and write them atomically; returns the file's bytes.
    States and velocities in `dtype`; times, scores, CFG scales and conditioning stay float32."""
    tensors = {}
    for k in parts[0]:
        v = torch.stack([q[k] for q in parts]).detach().cpu()
        if v.is_floating_point():
            v = v.to(dtype if k in ("x_t", "v_u", "v_c") else torch.float32)
        tensors[k] = v.contiguous()
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"sha256": tensors_sha256(tensors)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file this user creates (safetensors writes 0600)
    os.replace(tmp, path)
    return path.stat().st_size


def manifest_for(cfg, bb, dtype: str) -> dict:
    """What the pairs are: enough to refuse a mismatched training run and to rebuild the same bank."""
    c = dataclasses.asdict(cfg)
    return {"version": VERSION, "dtype": dtype, "seed": cfg.seed,
            "teacher_sha256": weights_sha256(bb.teacher.v),
            "config": {k: c[k] for k in PAIR_FIELDS + SOURCE_FIELDS},
            "data_shape": list(bb.data_shape), "n_prompts": bb.n_prompts,
            "pairs_per_pool": cfg.pool_steps * cfg.prompts * cfg.K * (cfg.N - 1),
            "cond_tuple": isinstance(bb.cond(torch.zeros(1, dtype=torch.long, device=cfg.device)), tuple)}


def build(cfg, out: Path, pools: int, dtype: str, rank: int = 0, world: int = 1) -> dict:
    """Roll out pools 0 … pools − 1 (this rank: those ≡ rank mod world) that are not on disk yet."""
    from tqdm import tqdm

    import backbones
    from train import barrier

    if rank > 0:
        barrier()  # rank 0 builds first: toy teachers are trained and cached once
    try:
        bb = backbones.build(cfg)
    finally:
        if rank == 0:
            barrier()
    manifest = manifest_for(cfg, bb, dtype)
    mpath = out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    if mpath.exists():
        if json.loads(mpath.read_text()) != json.loads(json.dumps(manifest)):
            raise BankError(f"{out} holds a bank of other pairs or another teacher; pass a new --out")
    elif rank == 0:
        tmp = mpath.with_name(f".tmp-manifest-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, mpath)
    mine = range(rank, pools, world)
    for tmp in out.glob(".tmp-pool-*"):  # a killed build's partial shard of this rank's pools
        if int(tmp.name[10:16]) in mine:
            tmp.unlink()
    todo = [p for p in mine if not shard_path(out, p).exists()]
    t0, nbytes, pairs = time.perf_counter(), 0, 0
    for pool in tqdm(todo, desc=f"bank rank {rank}", disable=None):
        parts = [record_part(cfg, bb, (cfg.seed, pool, part)) for part in range(cfg.pool_steps)]
        nbytes += write_shard(shard_path(out, pool), parts, DTYPES[dtype])
        pairs += manifest["pairs_per_pool"]
    wall = time.perf_counter() - t0
    return {"pools_written": len(todo), "pairs": pairs, "bytes": nbytes, "wall_s": wall,
            "bytes_per_pair": nbytes / max(pairs, 1), "pairs_per_s": pairs / max(wall, 1e-9)}


# -------------------------------------------------------------------------------------------- read
def read_manifest(bank: str | Path) -> dict:
    path = Path(bank) / "manifest.json"
    if not path.is_file():
        raise BankError(f"--bank {bank}: no manifest.json (build one with `python bank.py build --out {bank}`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BankError(f"--bank {bank}: manifest.json is not valid JSON ({e})") from e
    if m.get("version") != VERSION:
        raise BankError(f"--bank {bank}: bank version {m.get('version')}, this code reads {VERSION}")
    return m


class Bank:
    """Streams a bank's shards in pool order (pool p reads shard p mod n), one shard ahead in a background
    thread: at most two shards are in memory. Each shard is verified against its SHA-256 when read."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path, self.device = Path(path), device
        self.manifest = m = read_manifest(path)
        self.seed, self.K, self.sigma_d = m["seed"], m["config"]["K"], m["config"]["sigma_d"]
        pools = sorted(int(f.name[5:11]) for f in self.path.glob("pool-??????.safetensors"))
        self.n = len(pools)
        if self.n == 0:
            raise BankError(f"--bank {path}: no shards yet (pool-000000.safetensors is missing)")
        if pools != list(range(self.n)):
            gap = min(set(range(pools[-1] + 1)) - set(pools))
            raise BankError(f"--bank {path}: {shard_path(self.path, gap).name} is missing (a build still "
                            "running or killed: rerun bank.py build)")
        self._io = ThreadPoolExecutor(1)
        self._loaded: dict[int, Future] = {}
        self.cond_table: dict[int, tuple[torch.Tensor, ...]] = {}

    def _read(self, shard: int) -> dict[str, torch.Tensor]:
        path = shard_path(self.path, shard)
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                want = (f.metadata() or {}).get("sha256")
        except (SafetensorError, OSError) as e:
            raise BankError(f"{path}: unreadable shard ({e}); rebuild it: delete it and rerun bank.py build") \
                from e
        if want != tensors_sha256(tensors):
            raise BankError(f"{path}: checksum mismatch (corrupted); delete it and rerun bank.py build")
        return tensors

    def shard(self, pool: int) -> dict[str, torch.Tensor]:
        """Pool `pool`'s shard; starts reading the next one."""
        s = pool % self.n
        fut = self._loaded.pop(s, None) or self._io.submit(self._read, s)
        self._loaded = {(s + 1) % self.n: self._io.submit(self._read, (s + 1) % self.n)} if self.n > 1 else {}
        return fut.result()

    def part(self, pool: int, part: int, slots: range):
        """The pairs of `slots` for step `part` of pool `pool`, ordered as an online rollout of those slots
        returns them (time-major): (x_t, t, dxdt, traj, prompt [T], w [T], score [T]), T = len(slots)·K."""
        if part == 0:
            self._rec, self.cond_table = self.shard(pool), {}
        rec, K, dev = self._rec, self.K, self.device
        T_all = rec["prompt"].shape[1]
        lo, hi = slots.start * K, slots.stop * K
        traj = torch.arange(T_all).repeat(rec["t"].shape[1] // T_all)
        sel = (traj >= lo) & (traj < hi)
        x_t, t = rec["x_t"][part][sel].to(dev, torch.float32), rec["t"][part][sel].to(dev)
        v_u, v_c = (rec[k][part][sel].to(dev, torch.float32) for k in ("v_u", "v_c"))
        prompt, w, score = (rec[k][part][lo:hi].to(dev) for k in ("prompt", "w", "score"))
        traj = traj[sel].to(dev) - lo
        # dx_t/dt = σ_d·F, rebuilt one time step at a time (the shapes of the online rollout's
        # calls)
        T, sd = hi - lo, self.sigma_d
        dxdt = torch.cat([sd * guided(x_t[i:i + T] / sd, t[i:i + T], v_u[i:i + T], v_c[i:i + T], w)
                          for i in range(0, len(t), T)])
        n_cond = sum(k.startswith("cond/") for k in rec)
        for j in range(slots.start, slots.stop):  # each slot's prompt → its conditioning
            self.cond_table[int(rec["prompt"][part][j * K])] = tuple(
                rec[f"cond/{i}"][part][j].to(dev) for i in range(n_cond))
        return x_t, t, dxdt, traj, prompt, w, score


class BankBackbone:
    """What `train.train` needs when pairs come from a bank: the student (initialised from the teacher's
    weights, which are then dropped), the conditioning from the bank; no teacher, text encoder or VAE."""

    def __init__(self, cfg, bank: Bank):
        m = bank.manifest
        self.bank, self.n_prompts, self.data_shape = bank, m["n_prompts"], tuple(m["data_shape"])
        self.cond_tuple = m["cond_tuple"]
        needed = -(-cfg.steps // cfg.pool_steps)
        if needed > bank.n:
            print(f"note: {bank.path} holds {bank.n} pools, {cfg.steps} steps need {needed}: its pairs are "
                  f"reused (reshuffled, fresh filter draws) {needed / bank.n:.1f} times", file=sys.stderr)
        if cfg.backbone == "sana":
            from backbones import sana_student
            from sana import load_transformer, tiny_folder

            tr, scale = load_transformer(tiny_folder(cfg.cache_dir) if cfg.tiny else cfg.pretrained, cfg.device)
            check_teacher(tr, m, bank.path)
            self.student = sana_student(tr, scale, cfg.seed, cfg.grad_checkpointing)
        else:
            import toy

            net = toy.train_teacher(cfg.backbone, cfg.data_dir or None, cfg.device, f"{cfg.cache_dir}/teachers",
                                    steps=cfg.teacher_steps or None)
            check_teacher(net, m, bank.path)
            self.student = toy.student_from_teacher(net).to(cfg.device)

    def cond(self, prompt: torch.Tensor) -> Any:
        rows = [self.bank.cond_table[i] for i in prompt.tolist()]
        out = tuple(torch.stack(c) for c in zip(*rows, strict=True))
        return out if self.cond_tuple else out[0]


def check_teacher(net: torch.nn.Module, manifest: dict, path: Path) -> None:
    if weights_sha256(net) != manifest["teacher_sha256"]:
        raise BankError(f"--bank {path} was built from another teacher than the one loaded (weights differ)")


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import train
    from backbones import InputError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="python bank.py build --out BANK "
                                "[--pools P] [--dtype fp32|fp16|bf16] [train.py flags that define the pairs]")
    p.add_argument("command", choices=["build"])
    p.add_argument("--out", required=True, help="the bank's folder (created; a rerun continues it)")
    p.add_argument("--pools", type=int, default=0, help="pools to hold (default: enough for --steps)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage of states, velocities")
    p.error = lambda msg: (_ for _ in ()).throw(train.UsageError(msg))
    rank, world = train.dist_init()
    try:
        a, rest = p.parse_known_args(argv)
        cfg = train.parse_args([*rest, "--out", a.out])
        train.validate_ranges(cfg)
        if cfg.method != "tbcm" or cfg.bank:
            raise train.UsageError("a bank holds TBCM trajectory pairs: drop --method scm and --bank")
        per_pool = cfg.pool_steps
        pools = a.pools or -(-cfg.steps // per_pool)
        if pools < 1:
            raise train.UsageError("--pools must be >= 1")
        stats = build(cfg, Path(a.out), pools, a.dtype, rank, world)
    except (train.UsageError, BankError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({"bank": a.out, "pools": pools, **stats}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
