"""Watching a run on rank 0: a grid of the student's 1- and 2-step samples (App. E) on fixed prompts
and noise every --sample-every steps (samples/step-NNNNNNN.png), and with --tensorboard log.jsonl's
statistics, the learning rate and the grids in tb/. The grids sample the evaluated weights (EMA) as
metrics.evaluate_samplers does, on its first noises and prompts; every draw is from the monitor's
own generators. A step is the number of updates the weights had: log.jsonl's "step", a grid's name.
"""

import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import report
from config import Config, UsageError, flag
from runtime import autocast
from sampler import consistency_sample, default_times
from trigflow import TrigFlow

STEPS = (1, 2)  # the grids' samplers: student@1 and student@2
SCALARS = ("loss", "g_norm", "r", "kept", "grad_norm")  # of a log.jsonl record, besides the bins


class Monitor:
    """train.py's watcher: `step(done, rec)` after each optimiser step, `rec` the log line's record
    (None off log lines: nothing is read then); it draws nothing from a training stream and closes
    its event file after the last step."""

    def __init__(self, cfg: Config, run: Path, rank: int, ema: nn.Module, source: Any, opt: Any):
        self.cfg, self.ema, self.opt, self.writer = cfg, ema, opt, None
        self.every = cfg.sample_every if rank == 0 else 0
        self.teacher = getattr(source, "teacher", None)  # a backbones.Teacher; none from a bank
        if self.every and self.teacher is None:
            note = f"note: {flag('sample_every')}: no grids from {flag('bank')} (no teacher)"
            print(note, file=sys.stderr)
            self.every = 0
        self.samples = run / "samples"
        self.tb = run / "tb" if cfg.tensorboard and rank == 0 else None
        if self.tb:
            try:  # only with --tensorboard: the package is optional
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError(f"{flag('tensorboard')} needs: pip install tensorboard") from e
            self.SummaryWriter = SummaryWriter
        if self.every:
            T, n = self.teacher, cfg.n_eval
            # evaluate_samplers' first noises and prompts (images: as many as samples.png shows)
            n = min(n, 2000 if len(T.data_shape) == 1 else 2 * len(T.prompt_names))
            gen_z = torch.Generator().manual_seed(cfg.seed + 1)
            z = cfg.sigma_d * torch.randn((cfg.n_eval, *T.data_shape), generator=gen_z)[:n]
            prompt = torch.arange(n) % len(T.prompt_names)
            self.z, self.prompt = z.to(cfg.device), prompt.to(cfg.device)
            self.w = torch.full((n,), cfg.eval_w, device=cfg.device)

    def step(self, done: int, rec: dict | None) -> None:
        """After `done` optimiser steps: the log line's scalars (rec), a grid every `every`."""
        if self.tb and (rec is not None or self.every and done % self.every == 0):
            if self.writer is None:  # a resumed run hides the events past its checkpoint
                purge = done - 1 if self.cfg.resume else None
                self.writer = self.SummaryWriter(str(self.tb), purge_step=purge)
        if rec is not None and self.writer is not None:
            s = rec["step"]  # the loss of the weights after s updates
            for k in SCALARS:
                self.writer.add_scalar(k, rec[k], s)
            for i, v in enumerate(rec["loss_by_t_bin"]):  # NaN: an empty bin
                self.writer.add_scalar(f"loss_by_t_bin/{i}", v, s)
            for i, group in enumerate(self.opt.param_groups):
                self.writer.add_scalar("lr" if i == 0 else f"lr/{i}", group["lr"], s)
        if self.every and done % self.every == 0:
            path = self.samples / f"step-{done:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            report.samples_png(path, self.grid(), self.teacher.prompt_names)
            if self.writer is not None:
                img = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3] uint8
                self.writer.add_image("samples", img, done, dataformats="HWC")
        if self.writer is not None:  # on disk at each write: a stopped run loses no line
            self.writer.flush()
            if done == self.cfg.steps:
                self.writer.close()

    @torch.no_grad()
    def grid(self) -> dict[str, torch.Tensor]:
        """student@1 and student@2 of the evaluated weights (App. E), images on the CPU, sampled
        as metrics.evaluate_samplers samples them: its times, noises, re-noise stream, batches."""
        cfg, T, n = self.cfg, self.teacher, len(self.z)
        F_ema = TrigFlow(self.ema, guidance_scale=cfg.guidance_scale)
        shown = {}
        for k in STEPS:
            times = default_times(k, cfg.t_mid)
            gen, xs = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2), []
            for i in range(0, n, cfg.eval_batch):
                chunk = slice(i, i + cfg.eval_batch)
                F = partial(F_ema, cond=T.cond(self.prompt[chunk]), w=self.w[chunk])
                with autocast(cfg.device, cfg.precision):
                    x0 = consistency_sample(F, self.z[chunk], times, cfg.sigma_d, gen)
                xs.append(x0.float() / cfg.sigma_d)  # FM units (data space)
            shown[f"student@{k}"] = T.to_images(torch.cat(xs)).cpu()
        return shown
