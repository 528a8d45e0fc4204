"""The stages of `bench/cost.py --config paper-sana` (cost_paper.py runs each in its own process):
one stage of the training step at two batch sizes, prepared outside the measurement, its time and
its memory rise above what was alive at entry: the RSS on a CPU (peak: VmHWM, reset through
/proc/self/clear_refs; weights loaded into memory of their own), the allocator on CUDA.
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from cost_compose import BATCHES, L

import backbones
import optimizers
import sana
import sana_io
from config import Config
from loss import LogvarHead, loss_from_target, scm_target
from runtime import autocast, clock, device_memory_mb, peak_rss_mb, rss_mb, synchronize
from trigflow import TrigFlow


class Meter:
    """Memory in MB: the RSS and its peak on a CPU, the allocator's on CUDA (`cuda_peak`: the
    allocated peak across the resets)."""

    def __init__(self, device: str):
        self.device, self.cuda, self.cuda_peak = device, device.startswith("cuda"), 0.0

    def now(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mb()

    def reset_peak(self) -> None:
        if self.cuda:
            self.cuda_peak = max(self.cuda_peak, self.peak())
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux ≥ 4.0: "5" resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as e:
            raise RuntimeError(f"cannot reset the peak RSS ({e}); run on Linux or CUDA") from e

    def peak(self) -> float:
        if self.cuda:
            synchronize(self.device)
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mb()

    def device_peaks(self) -> dict[str, float]:
        """On CUDA the process's allocator peaks (runtime.device_memory_mb) across the resets: the
        reserved memory only grows (nothing calls empty_cache), so its peak outlives them; {} on a
        CPU."""
        peaks = device_memory_mb(self.device)
        if peaks:
            peaks["max_memory_allocated_mb"] = max(self.cuda_peak, self.peak())
        return peaks

    def probe(self, fn: Callable[[], object]) -> dict:
        """fn's wall time, the CPU time of this process (all its threads: on a shared machine
        steadier than the wall time) and its memory rise above what was alive at entry."""
        entry = self.now()
        self.reset_peak()
        t, cpu = clock(self.device), time.process_time()
        fn()
        s, cpu_s = clock(self.device) - t, time.process_time() - cpu
        return dict(s=s, cpu_s=cpu_s, dynamic_mb=self.peak() - entry)


def inputs_of(cfg: Config, tr_config: Any) -> tuple[Callable, Callable, tuple]:
    """Seeded random tensors on the device, conditioning [b, L, D] of the transformer's caption
    width (values do not matter here), and the latent shape [C, h, w] at cfg.resolution."""
    dev, g = cfg.device, torch.Generator().manual_seed(0)
    vae = json.loads((Path(cfg.pretrained) / "vae" / "config.json").read_text())
    h = cfg.resolution // 2 ** (len(vae["encoder_block_out_channels"]) - 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dev)

    def cond(b: int) -> tuple:
        D = tr_config.caption_channels
        return rand(b, L, D).to(torch.bfloat16), torch.ones(b, L, dtype=torch.long, device=dev)

    return rand, cond, (tr_config.in_channels, h, h)


def stage(name: str, cfg: Config, meter: Meter) -> dict:
    """One stage at BATCHES (after a warm-up at the first): per batch size, seconds and MB. The
    student's stages load only the transformer, the others the pipeline (bf16 as --frozen)."""
    if name in ("jvp", "fwdbwd", "optimizer"):
        return student_stage(name, cfg, meter)
    dev, res = cfg.device, cfg.resolution
    with sana_io.quiet_loading():
        parts = sana.load_sana(cfg.pretrained, dev, torch.bfloat16, own_memory=not meter.cuda)
    rand, cond, latent = inputs_of(cfg, parts.transformer.config)
    if name == "vae":
        run = lambda b, x: sana.encode_images(parts, x, b)  # noqa: E731
        inputs = lambda b: rand(b, 3, res, res).clamp(-1, 1)  # noqa: E731
    elif name == "text":
        prompts = [f"a {c} house by the sea at dawn, photo {i}" for i, c in enumerate("abc")]
        run = lambda b, x: sana.encode_prompts(parts, x, L, instruction=not cfg.plain_prompts)  # noqa: E731
        inputs = lambda b: prompts[:b]  # noqa: E731
    elif name == "teacher":  # CFG: one pass on the doubled batch [uncond, cond]
        F = TrigFlow(sana.SanaVelocity(parts.transformer, parts.timestep_scale), uncond=cond(1))

        @torch.no_grad()
        def run(b: int, x: tuple) -> None:
            with autocast(dev, cfg.precision):
                F(*x)

        def inputs(b: int) -> tuple:
            return rand(b, *latent), rand(b).sigmoid(), cond(b), torch.full((b,), 4.5, device=dev)

    else:
        raise ValueError(f"no stage {name}")

    def make(b: int) -> Callable:
        x = inputs(b)
        return lambda: run(b, x)

    return at_batches(make, cfg, meter)


def student_stage(name: str, cfg: Config, meter: Meter) -> dict:
    """jvp (Alg. 1 lines 13–14), fwdbwd (lines 15–16 and the gradient, checkpointed unless
    --no-grad-checkpointing) or optimizer (cfg.optimizer's step once its state exists) on the fp32
    student."""
    student, _ = backbones.build_student(cfg)
    rand, cond, latent = inputs_of(cfg, student.transformer.config)
    head = LogvarHead().to(cfg.device)
    F_theta = TrigFlow(student.train(), guidance_scale=cfg.guidance_scale)
    params = [q for q in student.parameters() if q.requires_grad] + list(head.parameters())
    hyper = dict(sigma_d=cfg.sigma_d, c=cfg.c)

    def pairs(b: int) -> tuple:
        x, t, d = rand(b, *latent), rand(b).sigmoid() * 1.5, 0.5 * rand(b, *latent)
        return x, t, d, cond(b), torch.full((b,), 4.5, device=cfg.device)

    def jvp(b: int) -> Callable:
        x, t, d, c, w = pairs(b)
        F = lambda x_, t_: F_theta(x_, t_, c, w)  # noqa: E731

        def target() -> None:
            with autocast(cfg.device, cfg.precision):
                scm_target(F, x, t, d, r=1.0, **hyper)

        return target

    def fwdbwd(b: int) -> Callable:
        x, t, d, c, w = pairs(b)
        F = lambda x_, t_: F_theta(x_, t_, c, w)  # noqa: E731
        F_minus, g = rand(b, *latent), rand(b, *latent) / 100

        def step() -> None:
            with autocast(cfg.device, cfg.precision):
                kw = dict(sigma_d=cfg.sigma_d, t_min=cfg.t_min, mask=None, extra={})
                loss, _ = loss_from_target(F, x, t, F_minus, g, head(t), **kw)
            loss.backward()
            for q in params:
                q.grad = None

        return step

    if name == "optimizer":
        opt = optimizers.build([{"params": params}], cfg)
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        opt.step()  # the state exists from here on, as after the first training step
        return dict(by_batch={"1": meter.probe(opt.step)}, warmup=dict(s=0.0))
    make = dict(jvp=jvp, fwdbwd=fwdbwd)[name]
    return at_batches(make, cfg, meter)


def at_batches(make: Callable[[int], Callable], cfg: Config, meter: Meter) -> dict:
    """make(b) → a call on batch b, prepared outside the measurement; one warm-up at BATCHES[0]."""
    warm = meter.probe(make(BATCHES[0]))
    out = {str(b): meter.probe(make(b)) for b in BATCHES}
    return dict(by_batch=out, warmup=warm)
