"""Many processes under torchrun, one device each: which device a rank takes, the process group, DDP
for the gradient pass, FSDP2 shards, and gradient accumulation's skipped synchronisations.

Every function takes plain values (a device string, modules), never the run's `Config`. Alg. 1's
JVP runs on the plain module, the with-gradient pass through the DDP wrapper, whose backward
averages the gradients over the ranks (forward AD does not pass DDP's hooks; the official codes run
the JVP on `accelerator.unwrap_model` the same way). An FSDP2-sharded module takes both passes
itself: its hooks gather each block's weights before any forward, with or without forward AD.
"""

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) outside torchrun."""
    env = os.environ.get
    return int(env("RANK", "0")), int(env("LOCAL_RANK", "0")), int(env("WORLD_SIZE", "1"))


def rank_device(device: str, local_rank: int, world: int) -> str:
    """The device of this rank: a CPU stays a CPU, `cuda` becomes `cuda:LOCAL_RANK` under torchrun
    (one GPU per rank). An explicit `cuda:N` under torchrun would put every rank on GPU N: refused
    (ValueError), as is any other device type for several processes."""
    d = torch.device(device)
    if world == 1 or d.type == "cpu":
        return device
    if d.type != "cuda":
        raise ValueError(f"--device {device}: several processes run on cpu or cuda")
    if d.index is not None:
        raise ValueError(
            f"--device {device} would put all {world} processes on one GPU; pass --device cuda "
            "(each process takes cuda:LOCAL_RANK)"
        )
    return f"cuda:{local_rank}"


def backend(device: str) -> str:
    """The process group's backend: NCCL for CUDA devices, gloo for CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rng_devices(device: str) -> list[torch.device]:
    """The devices whose RNG `torch.random.fork_rng` saves and restores: this rank's GPU only (by
    default every visible GPU, touching the other ranks' GPUs from every rank); none on a CPU."""
    d = torch.device(device)
    return [d] if d.type == "cuda" else []


def init(device: str, local_rank: int, world: int) -> str:
    """This rank's device (`rank_device`) made current (`torch.cuda.set_device`, before anything
    else touches CUDA) and, with several processes, the process group joined on its backend.
    Returns the device."""
    device = rank_device(device, local_rank, world)
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.set_device(d)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend(device), device_id=d if d.type == "cuda" else None)
    return device


def data_parallel(module: nn.Module, device: str, world: int) -> nn.Module:
    """`module` in DistributedDataParallel for the gradient pass (its backward averages the
    gradients over the ranks, in buckets, overlapped with the backward pass); with one process the
    module itself. The JVP keeps running on `module`: it shares its parameters with the wrapper."""
    if world == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    d = torch.device(device)
    # broadcast_buffers=False: the students' buffers (Fourier frequencies, RoPE tables) are fixed
    # and the same on every rank; broadcasting them at every forward would only cost.
    # gradient_as_bucket_view=True: the gradients are views into DDP's buckets, no second copy.
    # find_unused_parameters and static_graph stay off: every trainable parameter enters F_θ at
    # every step (tests/test_parallel.py trains each backbone under torchrun, which DDP would
    # refuse otherwise) and the graph is rebuilt every step.
    return DDP(
        module,
        device_ids=[d] if d.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


def plain(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the one the JVP runs on); any other module itself."""
    return module.module if isinstance(module, DDP) else module


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated layers of a network: the elements of its outermost ModuleLists (Sana's
    transformer_blocks, the toy MLP's blocks), each FSDP2's unit of gathering."""
    found = []
    for child in module.children():
        found += list(child) if isinstance(child, nn.ModuleList) else blocks(child)
    return found


def shard(module: nn.Module, precision: str = "fp32") -> nn.Module:
    """FSDP2 in place: `fully_shard` on each of `blocks(module)`, then on the root (whatever lies
    outside the blocks), over all ranks. Each rank keeps 1/world of every parameter, gradient and
    optimiser moment; a block's weights are gathered for its forward and backward and freed after.
    precision "bf16": the gathered weights in bf16 for compute, gradients reduced and master weights
    kept in fp32 (FSDP2's MixedPrecisionPolicy). Returns the module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a sharded module returns a view, which an in-place op could write past its
    # backward hook; no pass here writes into a network's output (loss.py forms F − F⁻ − g anew).
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    # bf16: inputs stay as they come (cast_forward_inputs off): autocast casts per op as on one
    # GPU, where casting the root's inputs would round the time s itself to bf16.
    mp = MixedPrecisionPolicy()
    if precision == "bf16":
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
    for block in blocks(module):
        fully_shard(block, mp_policy=mp)
    # the root resharded after its forward too (FSDP2 keeps a root whole until its backward): else
    # after a pass without gradient (the JVP's, a sample) .parameters() would be whole tensors
    return fully_shard(module, mp_policy=mp, reshard_after_forward=True)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is FSDP2-sharded (`shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gradient_sync(modules: list[nn.Module], sync: bool) -> Iterator[None]:
    """The forward and backward pass of a micro-batch: with sync the gradients are averaged over
    the ranks (DDP's all-reduce, FSDP2's reduce-scatter) as usual; without, each rank adds them up
    locally (DDP's no_sync, FSDP2's set_requires_gradient_sync(False)), for all micro-batches of an
    optimiser step but the last."""
    with ExitStack() as stack:
        for m in modules:
            if isinstance(m, DDP) and not sync:
                stack.enter_context(m.no_sync())
            elif is_sharded(m):
                m.set_requires_gradient_sync(sync)
        yield


def unsharded(module: nn.Module, build: Callable[[], nn.Module], keep: bool) -> nn.Module | None:
    """An FSDP2-sharded module whole, on the rank that keeps it: its state gathered from every rank
    (each must call this) into `build()`, a fresh unsharded module of the same kind; the others get
    None. A module that is not sharded is returned as it is, on every rank."""
    if not is_sharded(module):
        return module
    whole = gathered(module.state_dict(), keep)
    if not keep:
        return None
    fresh = build()
    fresh.load_state_dict(whole)
    return fresh


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor's full value (e.g. FSDP2's gradient norm, Replicate), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """`tensors` whole: each FSDP2 shard (a DTensor) gathered over the ranks, one at a time, in the
    dict's order (every rank must call this with the same keys). The rank that keeps them gets the
    whole tensors on the host; the others get {}."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in tensors.items():
        whole = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = whole.detach().cpu()
    return out


def scattered(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]):
    """Whole tensors (read from a checkpoint) cut into this rank's shards where `like` holds a
    DTensor of the same key and shape (a sharded parameter or moment); the rest as they are. Each
    rank cuts its own shard from its own copy (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, v in tensors.items():
        ref = like.get(k)
        if isinstance(ref, DTensor) and tuple(v.shape) == tuple(ref.shape):
            v = v.to(ref.device_mesh.device_type)
            out[k] = distribute_tensor(v, ref.device_mesh, ref.placements, src_data_rank=None)
        else:
            out[k] = v
    return out
