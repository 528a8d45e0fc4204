"""Plumbing that is not in the paper: precision (bf16 autocast, TF32 on CUDA), EMA, threads, ranks
waiting for each other, Ctrl-C, peak memory (the host's RSS; on CUDA the allocator's), device
synchronisation. Devices per rank, DDP and FSDP2: parallel.py.

Every function takes plain values (a device string, a decay), never the run's `Config`, so that any
file may use them.
"""

import copy
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def autocast(device: str, precision: str):
    """The precision of network passes: bf16 autocast if precision is "bf16" (weights, optimiser
    stay fp32), and on CUDA fp32 matmuls and convolutions in TF32 (`allow_tf32`)."""
    allow_tf32(device)
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def tf32_allowed(device: str) -> bool:
    """TF32 (torch's "high" fp32 matmul precision) is allowed on CUDA devices only."""
    return torch.device(device).type == "cuda"


def allow_tf32(device: str) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions if `tf32_allowed(device)`; else untouched."""
    if tf32_allowed(device):
        torch.set_float32_matmul_precision("high")  # torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside (no TF32); the setting outside is restored."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def set_threads(n: int) -> None:
    """Intra-op threads of this process; 0 keeps torch's default (one per core)."""
    if n > 0:
        torch.set_num_threads(n)


def ema_of(model: torch.nn.Module, decay: float) -> torch.nn.Module:
    """The EMA's module: a frozen copy of model, or with decay 0 the model itself (the raw student
    is the evaluated one; no second copy of its weights, as the TBCM code runs without EMA). The
    copy shares the parameters that do not train (a LoRA student's base) with model."""
    if decay == 0:
        return model
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, shared).requires_grad_(False).eval()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of a model's parameters with the usual warm-up: β = min(decay, (1 + k)/(10 + k))."""
    if ema is model:  # decay 0 (ema_of)
        return
    beta = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        if p_ema is not p:  # shared: frozen
            p_ema.lerp_(p, 1 - beta)


def barrier() -> None:
    """Wait for all ranks (nothing in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank0_first(rank: int) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and caches a toy teacher), the other ranks after it.
    Rank 0 releases the others even when its block fails, so that they fail the same way instead of
    hanging."""
    if rank > 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()


@contextmanager
def sigint_flag() -> Iterator[dict[str, bool]]:
    """Ctrl-C sets flag["stop"] instead of raising, so the step ends cleanly; restored on exit."""
    flag = {"stop": False}
    old = signal.signal(signal.SIGINT, lambda *_: flag.update(stop=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB: Linux's VmHWM (ru_maxrss would carry a
    larger parent's peak over fork and exec), elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except OSError:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes


def rss_mb() -> float:
    """Current resident memory of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# what a run reports of a CUDA device's memory, per rank: the caching allocator's peaks in MB
CUDA_MEMORY = ("max_memory_allocated_mb", "max_memory_reserved_mb")


def device_memory_keys(device: str) -> tuple[str, ...]:
    """The device-memory readings a run on `device` reports beside the host's peak RSS: CUDA_MEMORY
    on a CUDA device, none on a CPU (its memory is the RSS)."""
    return CUDA_MEMORY if torch.device(device).type == "cuda" else ()


def device_memory_mb(device: str, world: int | None = None) -> dict:
    """device_memory_keys(device) read now: torch.cuda.max_memory_allocated / max_memory_reserved
    in MB, peaks since the process began (or the last reset_peak_memory_stats); {} on a CPU. The
    allocator keeps them on the host as kernels are queued: reading them waits for nothing. With
    `world`, every rank's, as lists by rank (by_rank: every rank calls it)."""
    if not device_memory_keys(device):
        return {}
    dev = torch.device(device)
    allocated, reserved = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
    peaks = dict(zip(CUDA_MEMORY, (allocated / 2**20, reserved / 2**20), strict=True))
    return peaks if world is None else by_rank(peaks, device, world)


def by_rank(values: dict[str, float], device: str, world: int) -> dict[str, list[float]]:
    """Each rank's `values` (the same keys on every rank), as lists indexed by rank: one all_gather
    of a small tensor, which every rank must join (nothing on a CPU, where values is {})."""
    if world == 1 or not values:
        return {k: [v] for k, v in values.items()}
    mine = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    rows = torch.stack(every).tolist()  # [world, len(values)]
    return {k: [row[i] for row in rows] for i, k in enumerate(values)}


def synchronize(device: str | torch.device) -> None:
    """Wait for the kernels queued on a CUDA device (torch.cuda.synchronize), so that a timer read
    next sees them done; nothing on a CPU, whose work is done when the call returns."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: str | torch.device) -> float:
    """time.perf_counter() once `device` has run what was queued (synchronize): the reading to
    start and end a timed region with."""
    synchronize(device)
    return time.perf_counter()
