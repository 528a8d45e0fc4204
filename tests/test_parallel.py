"""parallel.py: the device and backend a rank takes, the blocks FSDP2 gathers, and under 2 gloo
ranks (tests/parallel_ranks.py, one torchrun launch) Alg. 1's JVP and gradient through FSDP2 shards
of the tiny Sana student, DDP on the toy MLP, accumulation without synchronisation and the gathered
/ scattered round trips of model and AdamW state, each against one unsharded process.
"""

import pytest
import torch
from torch import nn

import parallel
import toy

REL = 1e-5  # fp32: sharded against unsharded, relative to the oracle's norm


def close(got: dict, want: dict) -> None:
    """Every tensor of `got` within REL of `want`'s, relative to its norm (0 stays exactly 0)."""
    assert got.keys() == want.keys() and got
    for k in want:
        assert (got[k] - want[k]).norm() <= REL * want[k].norm(), k


def mean(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 for k in a}


def test_rank_device_one_gpu_per_rank():
    """`rank_device`: a CPU stays a CPU under any world size; `cuda` under torchrun becomes
    cuda:LOCAL_RANK, alone it stays as given; an explicit GPU (all ranks on one) or another device
    type for several processes is refused in one line naming the flag to pass."""
    assert parallel.rank_device("cpu", 1, 2) == parallel.rank_device("cpu", 0, 1) == "cpu"
    assert parallel.rank_device("cuda", 1, 2) == "cuda:1"
    assert parallel.rank_device("cuda", 3, 8) == "cuda:3"
    assert parallel.rank_device("cuda", 0, 1) == "cuda"
    assert parallel.rank_device("cuda:1", 0, 1) == "cuda:1"
    with pytest.raises(ValueError) as e:
        parallel.rank_device("cuda:0", 1, 2)
    assert "--device cuda " in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--device mps"):
        parallel.rank_device("mps", 0, 2)


def test_backend_rng_devices_and_ranks(monkeypatch):
    """NCCL for any CUDA device, gloo for a CPU; `fork_rng` touches this rank's GPU only, none on a
    CPU; (rank, local rank, world) read from torchrun's variables, (0, 0, 1) without them."""
    assert parallel.backend("cuda") == parallel.backend("cuda:3") == "nccl"
    assert parallel.backend("cpu") == "gloo"
    assert parallel.rng_devices("cpu") == []
    assert parallel.rng_devices("cuda:1") == [torch.device("cuda:1")]
    for k, v in dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8").items():
        monkeypatch.setenv(k, v)
    assert parallel.ranks() == (5, 1, 8)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    assert parallel.ranks() == (0, 0, 1)


def test_blocks_plain_and_data_parallel_of_one_process():
    """`blocks` of the toy MLP are its `blocks` themselves (its Sequentials are no blocks);
    `plain` of an unwrapped module is the module; `data_parallel` wraps nothing with one process
    nor a module with nothing to train (no process group needed)."""
    net = toy.MLP((2,), 8, 16, 3)
    found = parallel.blocks(net)
    assert len(found) == 3 and all(a is b for a, b in zip(found, net.blocks, strict=True))
    assert parallel.plain(net) is net
    assert parallel.data_parallel(net, "cpu", 1) is net
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert parallel.data_parallel(frozen, "cpu", 2) is frozen


@pytest.fixture(scope="module")
def launched() -> dict:
    """The one torchrun launch of tests/parallel_ranks.py, filled by the first test needing it."""
    return {}


@pytest.fixture
def ranks_out(launched, torchrun, tmp_path_factory) -> list[dict]:
    """What ranks 0 and 1 saved (tests/parallel_ranks.py)."""
    if not launched:
        out = tmp_path_factory.mktemp("ranks")
        launched["proc"] = p = torchrun(["-m", "tests.parallel_ranks", str(out)], timeout=240)
        if p.returncode == 0:
            launched["out"] = [torch.load(out / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert launched["proc"].returncode == 0, launched["proc"].stderr[-3000:]
    return launched["out"]


def test_shard_keeps_half_of_every_parameter(ranks_out):
    """`blocks` of the Sana student are its transformer_blocks (not the ModuleLists inside them,
    such as attn.to_out); `shard` makes each of them and the root an FSDP2 module whose ranks hold
    disjoint halves of every parameter; `plain` leaves a sharded module as it is."""
    r0, r1 = (r["sana"] for r in ranks_out)
    assert r0["blocks"] == ["transformer.transformer_blocks.0", "transformer.transformer_blocks.1"]
    s0, s1 = r0["structure"], r1["structure"]
    assert s0["root"] and s0["blocks"] == [True, True] and s0["plain"]
    whole = s0["whole"]
    assert s0["local"].keys() == whole.keys()
    assert all(s0["local"][k] + s1["local"][k] == n for k, n in whole.items())
    assert sum(s0["local"].values()) == sum(s1["local"].values()) == sum(whole.values()) // 2


@pytest.mark.parametrize("case", ["same", "own", "ckpt"])
def test_sharded_jvp_and_gradient_equal_the_unsharded(ranks_out, case):
    """Alg. 1 lines 13–17 through an FSDP2-sharded Sana student: F⁻, g/(‖g‖ + c) and ‖g‖ of
    `scm_target` (one torch.func.jvp) and the gradient of `loss_from_target`, gathered whole, equal
    the unsharded student's to fp32 round-off. "same": both ranks on the same pairs; "own": each
    rank on its own, the gradient the mean of the two ranks' (the reduce-scatter averages);
    "ckpt": gradient checkpointing on, the blocks recomputed in the backward pass."""
    r0, r1 = (r["sana"][case] for r in ranks_out)
    for r in (r0, r1):
        close(r["got"], r["ref"])
    close(r0["grad"], mean(r0["ref_grad"], r1["ref_grad"]))
    assert r1["grad"] == {}  # gathered on rank 0 only
    # the JVP's primal, the forward and (checkpointing) its recomputation
    assert r0["block0_calls"] == (3 if case == "ckpt" else 2)
    if case == "own":  # the ranks' oracles differ: the mean is not either one
        k = "transformer.proj_out.weight"
        assert (r0["ref_grad"][k] - r1["ref_grad"][k]).norm() > 0.1 * r0["ref_grad"][k].norm()


def test_ddp_gradient_is_the_mean_over_ranks(ranks_out):
    """`data_parallel` on the toy MLP, the JVP on `plain` (the wrapped module) and the gradient
    pass through DDP: after backward every rank holds the mean of the two ranks' one-process
    gradients."""
    r0, r1 = (r["ddp"] for r in ranks_out)
    assert r0["wrapped"] and r0["plain"]
    want = mean(r0["ref_grad"], r1["ref_grad"])
    close(r0["grad"], want)
    close(r1["grad"], want)


def test_ddp_no_sync_accumulates_locally(ranks_out):
    """`gradient_sync([ddp], False)` on the first of 2 micro-batches, True on the second (each
    loss × 1/2): after the first each rank holds its own gradient, unreduced (the ranks differ);
    after the second the mean over ranks of the whole batch's gradient."""
    r0, r1 = (r["ddp"] for r in ranks_out)
    close(r0["first"], r0["ref_first"])
    close(r1["first"], r1["ref_first"])
    k = "out.2.weight"
    assert (r0["first"][k] - r1["first"][k]).norm() > 0.1 * r0["first"][k].norm()
    close(r0["accumulated"], mean(r0["ref_grad"], r1["ref_grad"]))
    close(r1["accumulated"], mean(r0["ref_grad"], r1["ref_grad"]))


def test_fsdp_accumulation_equals_the_whole_batch(ranks_out):
    """`gradient_sync([sharded], False)` then True over 2 micro-batches of 2 pairs: no
    reduce-scatter after the first (no shard holds a gradient yet), and after the second the
    gathered gradient equals the mean over ranks of each rank's whole 4-pair batch."""
    r0, r1 = (r["sana"]["accumulate"] for r in ranks_out)
    assert r0["deferred"] and r1["deferred"]
    close(r0["grad"], mean(r0["ref_grad"], r1["ref_grad"]))


def test_state_dict_round_trip(ranks_out):
    """A sharded student's state_dict `gathered` on rank 0 (the others get {}), saved, read back
    by every rank and `scattered` like another sharded student's state_dict: that student's
    forward then equals the first one's bit for bit (before loading it did not)."""
    r0, r1 = (r["round_trip"] for r in ranks_out)
    assert r0["kept"] > 0 and r1["kept"] == 0
    for r in (r0, r1):
        assert torch.equal(r["F_after"], r["F_before"])
        assert (r["F_unloaded"] - r["F_before"]).norm() > 1e-3 * r["F_before"].norm()


def test_adamw_state_round_trip(ranks_out):
    """AdamW's moments after one step, gathered, saved and scattered back into a new optimiser:
    the next step gives bit-identical weights to the live optimiser's; fresh moments would not."""
    after = ranks_out[0]["round_trip"]["after"]
    live, loaded, fresh = after["live"], after["loaded"], after["fresh"]
    assert live.keys() == loaded.keys() and live
    assert all(torch.equal(loaded[k], live[k]) for k in live)
    assert any(not torch.equal(fresh[k], live[k]) for k in live)


def test_scattered_cuts_each_ranks_own_copy(ranks_out):
    """`scattered` cuts rank r's shard from rank r's own copy, with no broadcast from rank 0: each
    rank given a tensor filled with r holds r."""
    for r, out in enumerate(ranks_out):
        shard = out["round_trip"]["own_shard"]
        assert shard.numel() > 0 and torch.equal(shard, torch.full_like(shard, float(r)))


def test_no_grad_forward_keeps_shards(ranks_out):
    """After a forward without gradient (a sample, the JVP's primal) every parameter of a sharded
    toy MLP is still this rank's shard (a DTensor), the same as ahead of that forward."""
    for out in ranks_out:
        r = out["no_grad"]
        assert all(r["before"])
        assert [k for k, sharded in r["after"].items() if not sharded] == []
