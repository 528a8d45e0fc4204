"""Memory and time as a GPU reads them, checked without a GPU: which readings a device reports,
the synchronisation around timed regions (a no-op on a CPU), the per-rank gather, metrics.json's
train block on a CPU run, and load_sana's default (diffusers' mapped loading, no weight copy)."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cost_stages
import diffusers
from test_train import FAST, cache  # noqa: F401  (the fixture)

import runtime
import sana
import sana_tiny
import train

CPU_TRAIN_KEYS = {"steps", "wall_s", "peak_rss_mb", "pairs_per_s", "filtered_fraction"}
CPU_TRAIN_KEYS |= {"nan_skipped", "processes"}


@pytest.mark.parametrize(
    "device, keys",
    [("cpu", ()), ("cuda", runtime.CUDA_MEMORY), ("cuda:3", runtime.CUDA_MEMORY), ("meta", ())],
)
def test_readings_by_device(device, keys):
    """CUDA: max_memory_allocated and max_memory_reserved; any other device: none (its RSS)."""
    assert runtime.device_memory_keys(device) == keys
    assert runtime.CUDA_MEMORY == ("max_memory_allocated_mb", "max_memory_reserved_mb")


def test_cuda_readings_in_mb(monkeypatch):
    """device_memory_mb reads the allocator's two peaks of the device named, in MB; {} on a CPU,
    where torch.cuda is not touched."""
    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: seen.append(d) or 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: seen.append(d) or 5 * 2**20)
    assert runtime.device_memory_mb("cpu") == runtime.device_memory_mb("cpu", 2) == {}
    assert seen == []
    got = runtime.device_memory_mb("cuda:1")
    assert got == {"max_memory_allocated_mb": 3.0, "max_memory_reserved_mb": 5.0}
    assert seen == [torch.device("cuda:1")] * 2
    assert runtime.device_memory_mb("cuda:1", 1) == {k: [v] for k, v in got.items()}


def test_synchronize_is_a_no_op_on_cpu_and_waits_on_cuda(monkeypatch):
    """runtime.synchronize (and clock, which reads the timer after it) calls
    torch.cuda.synchronize on a CUDA device only."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    runtime.synchronize("cpu")
    runtime.synchronize(torch.device("cpu"))
    assert isinstance(runtime.clock("cpu"), float) and calls == []
    runtime.synchronize("cuda:0")
    t = runtime.clock(torch.device("cuda"))
    assert calls == [torch.device("cuda:0"), torch.device("cuda")] and t > 0


def test_by_rank_gathers_one_small_tensor(monkeypatch):
    """Each rank's values as lists indexed by rank, from one all_gather; one process: its own
    values; no values (a CPU run): no collective at all."""
    gathers = []

    def all_gather(out, mine):
        gathers.append(mine.clone())
        for r, t in enumerate(out):
            t.copy_(mine * (r + 1))

    monkeypatch.setattr(runtime.dist, "all_gather", all_gather)
    values = {"max_memory_allocated_mb": 1.5, "max_memory_reserved_mb": 2.0}
    assert runtime.by_rank(values, "cpu", 1) == {k: [v] for k, v in values.items()}
    assert runtime.by_rank({}, "cpu", 4) == {} and gathers == []
    got = runtime.by_rank(values, "cpu", 3)
    assert got == {"max_memory_allocated_mb": [1.5, 3.0, 4.5], "max_memory_reserved_mb": [2, 4, 6]}
    assert len(gathers) == 1 and gathers[0].dtype == torch.float64


def run_toy(cache, out):  # noqa: F811
    args = ["--backbone", "toy2d", "--steps", "3", "--out", str(out), "--cache-dir", cache]
    assert train.main([*FAST, *args]) == 0
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text())["train"], log


def test_cpu_run_reports_as_a_cpu_reads(cache, tmp_path):  # noqa: F811
    """A CPU run's train block has its keys (peak_rss_mb among them) and no device memory; its
    log lines neither."""
    trained, log = run_toy(cache, tmp_path / "run")
    assert set(trained) == CPU_TRAIN_KEYS and trained["peak_rss_mb"] > 0
    assert len(log) == 3 and all(not set(runtime.CUDA_MEMORY) & set(r) for r in log)


def test_cuda_readings_reach_metrics_and_log(cache, tmp_path, monkeypatch):  # noqa: F811
    """With CUDA's readings (torch.cuda's two peaks patched in, the device taken for CUDA),
    metrics.json's train block carries each as a list by rank, and every log line rank 0's."""
    peaks = {"max_memory_allocated_mb": 7.0, "max_memory_reserved_mb": 8.0}
    monkeypatch.setattr(runtime, "device_memory_keys", lambda device: runtime.CUDA_MEMORY)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 7 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 8 * 2**20)
    trained, log = run_toy(cache, tmp_path / "run")
    assert set(trained) == CPU_TRAIN_KEYS | set(peaks)
    assert {k: trained[k] for k in peaks} == {k: [v] for k, v in peaks.items()}  # one rank
    assert all(r["max_memory_allocated_mb"] == 7.0 for r in log)


def test_load_sana_maps_by_default_and_copies_on_request(tmp_path, monkeypatch):
    """load_sana's default is diffusers' own loading (disable_mmap False, no copy: the weights
    stay pages of the mapped files); sana.hold_in_memory gives them memory of their own."""
    folder = shutil.copytree(sana_tiny.cached_folder(tmp_path / "cache"), tmp_path / "copy")
    real, seen = diffusers.SanaPipeline.from_pretrained, []

    def from_pretrained(cls, *a, **k):
        seen.append(k)
        return real(*a, **k)

    monkeypatch.setattr(diffusers.SanaPipeline, "from_pretrained", classmethod(from_pretrained))
    with monkeypatch.context() as m:
        m.setattr(sana, "hold_in_memory", lambda *modules: pytest.fail("weights copied"))
        parts = sana.load_sana(folder, "cpu", torch.float32)
    assert seen[0]["disable_mmap"] is False
    assert str(folder) in Path("/proc/self/maps").read_text()
    sana.hold_in_memory(parts.transformer, parts.text_encoder, parts.vae)
    assert str(folder) not in Path("/proc/self/maps").read_text()
    sana.load_sana(folder, "cpu", torch.float32, own_memory=True)
    assert seen[1]["disable_mmap"] is True


@pytest.mark.parametrize("device, own_memory", [("cpu", True), ("cuda", False)])
def test_paper_stages_copy_weights_only_where_rss_is_measured(device, own_memory, monkeypatch):
    """bench/cost_paper.py's pipeline stages ask load_sana for memory of their own on a CPU (the
    RSS is measured), not on CUDA (the allocator is)."""
    seen = []

    def load_sana(*a, **k):
        seen.append(k)
        raise StopIteration

    monkeypatch.setattr(cost_stages.sana, "load_sana", load_sana)
    cfg = SimpleNamespace(device=device, resolution=64, pretrained="unused")
    with pytest.raises(StopIteration):
        cost_stages.stage("vae", cfg, cost_stages.Meter(device))
    assert seen == [{"own_memory": own_memory}]
