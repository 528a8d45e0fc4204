"""parallel.py under 2 gloo ranks for tests/test_parallel.py: FSDP2 shards of the tiny Sana student
(Alg. 1's JVP and gradient pass, accumulation, checkpoint round trips) and DDP on the toy MLP. Each
rank saves what it computed, and the unsharded oracle on its own inputs, to OUT/rank-<r>.pt:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.parallel_ranks OUT
"""

import copy
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import backbones
import config
import parallel
import sana
import sana_tiny
import toy
from loss import loss_from_target, scm_target
from trigflow import SIGMA_D, TrigFlow

L, D = 8, 32  # prompt tokens, the tiny pipeline's caption_channels
R, C, T_MIN = 0.75, 0.1, 0.01  # r (both terms of g), c and t_min of the sana preset


def sana_cond(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [n, L, D], prompt_attention_mask [n, L]), the last two tokens padding."""
    mask = torch.ones(n, L)
    mask[:, -2:] = 0
    return torch.randn(n, L, D, generator=gen), mask


def toy_cond(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(8, (n,), generator=gen)  # labels of toy2d's 8 classes


# each student's data shape (the tiny pipeline's 4 × 8 × 8 latents, toy2d's points), condition
SANA, TOY = ((4, 8, 8), sana_cond), ((2,), toy_cond)


def pairs(seed: int, n: int, kind: tuple) -> dict:
    """n seeded pairs (x_t, t, dx_t/dt) of a student `kind` with a condition and CFG scale w."""
    (shape, cond_of), gen = kind, torch.Generator().manual_seed(seed)
    x_t = SIGMA_D * torch.randn((n, *shape), generator=gen)
    t = 0.1 + 1.3 * torch.rand(n, generator=gen)  # inside (0, π/2)
    dxdt = SIGMA_D * torch.randn((n, *shape), generator=gen)
    w = 4 + torch.rand(n, generator=gen)
    return dict(x_t=x_t, t=t, dxdt=dxdt, cond=cond_of(n, gen), w=w)


def part(b: dict, i: slice) -> dict:
    """Pairs i of a batch (micro-batches)."""
    cut = lambda v: v[i] if isinstance(v, torch.Tensor) else tuple(u[i] for u in v)  # noqa: E731
    return {k: cut(v) for k, v in b.items()}


def alg1_backward(jvp_net: nn.Module, grad_net: nn.Module, b: dict, scale: float = 1.0) -> dict:
    """Alg. 1 lines 13–16 as train.py runs them: F⁻, g by one JVP of `jvp_net`, the loss through
    `grad_net`, scale·loss backward. Returns F⁻, g/(‖g‖ + c) and ‖g‖."""
    F_jvp, F_grad = (
        partial(TrigFlow(net, guidance_scale=0.1), cond=b["cond"], w=b["w"])
        for net in (jvp_net, grad_net)
    )
    x_t, t, dxdt = b["x_t"], b["t"], b["dxdt"]
    F_minus, g, g_norm = scm_target(F_jvp, x_t, t, dxdt, r=R, sigma_d=SIGMA_D, c=C)
    logvar = torch.zeros_like(t)
    loss, _ = loss_from_target(
        F_grad, x_t, t, F_minus, g, logvar, sigma_d=SIGMA_D, t_min=T_MIN, mask=None, extra={}
    )
    (scale * loss).backward()
    return dict(F_minus=F_minus, g=g, g_norm=g_norm)


def grads(net: nn.Module, rank: int) -> dict:
    """The gradients whole (gathered on rank 0; {} elsewhere), then cleared."""
    out = parallel.gathered({k: p.grad for k, p in net.named_parameters()}, keep=rank == 0)
    net.zero_grad(set_to_none=True)
    return out


def local_grads(net: nn.Module) -> dict:
    """This rank's gradients as they are (a plain module's, a DDP module's), then cleared."""
    out = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return out


def counted(block: nn.Module) -> list:
    """The calls of block.forward, recomputations included (forward hooks skip those)."""
    calls, forward = [], block.forward

    def counting(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    block.forward = counting
    return calls


def sana_students(cache: Path, rank: int) -> dict[bool, nn.Module]:
    """The sana preset's student of the tiny pipeline, without and with gradient checkpointing
    (rank 0 builds the pipeline first, as train.py does)."""
    if rank == 0:
        sana_tiny.cached_folder(cache)
    dist.barrier()
    tr, scale = sana.load_transformer(sana_tiny.cached_folder(cache), "cpu", torch.float32)
    out = {}
    for ckpt in (False, True):
        flag = "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"
        cfg = config.parse_args(["--backbone", "sana", "--cache-dir", str(cache), flag])
        out[ckpt] = backbones.sana_student(tr, scale, cfg)
    return out


def sharded_cases(students: dict, rank: int) -> dict:
    """Sharded against unsharded: the same pairs on both ranks, each rank's own, checkpointing."""
    found = parallel.blocks(students[False])
    res = {"blocks": [n for n, m in students[False].named_modules() if any(m is b for b in found)]}
    sharded = {ckpt: parallel.shard(copy.deepcopy(s)) for ckpt, s in students.items()}
    sh = sharded[False]
    res["structure"] = dict(
        root=parallel.is_sharded(sh),
        blocks=[parallel.is_sharded(b) for b in parallel.blocks(sh)],
        plain=parallel.plain(sh) is sh,
        local={k: p.to_local().numel() for k, p in sh.named_parameters()},
        whole={k: p.numel() for k, p in students[False].named_parameters()},
    )
    for case, seed, ckpt in (("same", 0, False), ("own", 1 + rank, False), ("ckpt", 0, True)):
        b = pairs(seed, 2, SANA)
        calls = counted(sharded[ckpt].transformer.transformer_blocks[0])
        got = alg1_backward(sharded[ckpt], sharded[ckpt], b)
        ref = alg1_backward(students[ckpt], students[ckpt], b)
        res[case] = dict(
            got=got,
            ref=ref,
            grad=grads(sharded[ckpt], rank),
            ref_grad=local_grads(students[ckpt]),
            block0_calls=len(calls),
        )
    # FSDP2 accumulation: 4 pairs as 2 micro-batches, no reduce-scatter after the first
    b = pairs(10 + rank, 4, SANA)
    with parallel.gradient_sync([sh], False):
        alg1_backward(sh, sh, part(b, slice(0, 2)), 0.5)
    deferred = all(p.grad is None for p in sh.parameters())
    with parallel.gradient_sync([sh], True):
        alg1_backward(sh, sh, part(b, slice(2, 4)), 0.5)
    alg1_backward(students[False], students[False], b)
    res["accumulate"] = dict(
        deferred=deferred, grad=grads(sh, rank), ref_grad=local_grads(students[False])
    )
    return res


def round_trips(student: nn.Module, out: Path, rank: int) -> dict:
    """Model and AdamW state gathered on rank 0, saved, loaded by every rank and scattered back."""
    sh = parallel.shard(copy.deepcopy(student))
    b = pairs(20, 2, SANA)
    F = partial(TrigFlow(sh, guidance_scale=0.1), cond=b["cond"], w=b["w"])
    x = b["x_t"] / SIGMA_D
    # an optimiser step first, so that moments and weights are not the initial ones
    opt = torch.optim.AdamW(sh.parameters(), lr=1e-3)
    alg1_backward(sh, sh, b)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        F_before = F(x, b["t"])
    state = parallel.gathered(sh.state_dict(), keep=rank == 0)
    moments = {f"{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    saved = parallel.gathered(moments, keep=rank == 0)
    if rank == 0:
        torch.save({"model": state, "opt": saved}, out / "ckpt.pt")
    dist.barrier()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)

    # a differently initialised sharded student loads it; its optimiser is built before any
    # forward, as train.py builds it (tests/test_parallel.py::test_no_grad_forward_keeps_shards)
    other = copy.deepcopy(student)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    other = parallel.shard(other)
    opt_other = torch.optim.AdamW(other.parameters(), lr=1e-3)
    F_other = partial(TrigFlow(other, guidance_scale=0.1), cond=b["cond"], w=b["w"])
    with torch.no_grad():
        F_unloaded = F_other(x, b["t"])
    other.load_state_dict(parallel.scattered(ckpt["model"], like=other.state_dict()))
    with torch.no_grad():
        F_after = F_other(x, b["t"])

    # the next step from the loaded moments, from the live ones, and from fresh ones
    live = opt.state_dict()
    like = {f"{i}/{k}": v for i, s in live["state"].items() for k, v in s.items()}
    flat = parallel.scattered(ckpt["opt"], like=like)
    loaded = {i: {k: flat[f"{i}/{k}"] for k in s} for i, s in live["state"].items()}
    opt_other.load_state_dict({"state": loaded, "param_groups": live["param_groups"]})
    fresh = parallel.shard(copy.deepcopy(student))
    opt_fresh = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh.load_state_dict(parallel.scattered(ckpt["model"], like=fresh.state_dict()))
    after = {}
    b2 = pairs(21, 2, SANA)
    for name, net, o in (
        ("live", sh, opt),
        ("loaded", other, opt_other),
        ("fresh", fresh, opt_fresh),
    ):
        alg1_backward(net, net, b2)
        o.step()
        after[name] = parallel.gathered(net.state_dict(), keep=rank == 0)

    # each rank cuts its shard of the first parameter from its own copy, a tensor filled with r
    k0, p0 = next(iter(sh.state_dict().items()))
    mine = parallel.scattered({k0: torch.full(p0.shape, float(rank))}, like={k0: p0})[k0]
    return dict(
        kept=len(state),
        F_before=F_before,
        F_unloaded=F_unloaded,
        F_after=F_after,
        after=after,
        own_shard=mine.to_local(),
    )


def ddp_cases(rank: int) -> dict:
    """DDP on the toy MLP: one step's gradients, and 2 micro-batches with no sync on the first."""
    torch.manual_seed(0)
    net = toy.MLP((2,), 8, 32, 2)
    ddp = parallel.data_parallel(copy.deepcopy(net), "cpu", 2)
    inner = ddp.module if isinstance(ddp, DDP) else ddp  # the parameters' module
    res = dict(wrapped=isinstance(ddp, DDP), plain=parallel.plain(ddp) is inner)
    b = pairs(30 + rank, 4, TOY)
    alg1_backward(parallel.plain(ddp), ddp, b)
    res["grad"] = local_grads(inner)
    alg1_backward(net, net, b)
    res["ref_grad"] = local_grads(net)
    with parallel.gradient_sync([ddp], False):
        alg1_backward(parallel.plain(ddp), ddp, part(b, slice(0, 2)), 0.5)
    res["first"] = {k: p.grad.detach().clone() for k, p in inner.named_parameters()}
    with parallel.gradient_sync([ddp], True):
        alg1_backward(parallel.plain(ddp), ddp, part(b, slice(2, 4)), 0.5)
    res["accumulated"] = local_grads(inner)
    alg1_backward(net, net, part(b, slice(0, 2)), 0.5)
    res["ref_first"] = local_grads(net)
    return res


def no_grad_forward(rank: int) -> dict:
    """A sharded toy MLP's parameters before and after a forward without gradient (a sample, the
    JVP's primal): whether each is still this rank's shard (a DTensor)."""
    torch.manual_seed(0)
    net = parallel.shard(toy.MLP((2,), 8, 32, 2))
    b = pairs(40 + rank, 3, TOY)
    before = [isinstance(p, DTensor) for p in net.parameters()]
    with torch.no_grad():
        TrigFlow(net, guidance_scale=0.1)(b["x_t"] / SIGMA_D, b["t"], b["cond"], b["w"])
    after = {k: isinstance(p, DTensor) for k, p in net.named_parameters()}
    return dict(before=before, after=after)


def main(out: str) -> int:
    rank, local_rank, world = parallel.ranks()
    parallel.init("cpu", local_rank, world)
    out_dir = Path(out)
    students = sana_students(out_dir / "cache", rank)
    res = dict(world=world, ddp=ddp_cases(rank), no_grad=no_grad_forward(rank))
    res["sana"] = sharded_cases(students, rank)
    res["round_trip"] = round_trips(students[False], out_dir, rank)
    torch.save(res, out_dir / f"rank-{rank}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
