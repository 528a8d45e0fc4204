"""Backbones plugged into train.py: a teacher, a student, prompts, real data, the black latent, evaluation.

A backbone hides where these come from (toy nets trained here, or Sana from a local diffusers folder) behind one
small interface, so the TBCM / sCM loop in train.py is the same for every backbone. Data are in flow-matching units
(the TrigFlow x0 is σ_d·that, σ_d = 0.5); a prompt is an index into the backbone's prompt table.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import toy
from trigflow import TrigFlow


class InputError(ValueError):
    """Missing or malformed user input found while building a backbone (exit 2 in train.py)."""


@dataclass
class Backbone:
    """What the training loop needs from a backbone."""

    name: str
    teacher: TrigFlow  # CFG teacher F(x_t/σ_d, t, cond, w)
    student: nn.Module  # trainable velocity net v(x_FM, s, cond, guidance), initialised from the teacher
    data_shape: tuple[int, ...]
    n_prompts: int
    black: torch.Tensor  # the black image's latent in FM units, [1, *data_shape]
    prompt_names: list[str]
    distance_name: str

    def cond(self, prompt: torch.Tensor) -> Any:
        """The conditioning of prompt indices [B] (toy: the class labels themselves)."""
        return prompt

    def real_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """sCM baseline: n real samples (FM units) and their prompt indices."""
        raise NotImplementedError

    def evaluate(self, x0: torch.Tensor, prompt: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        """{"distance", "alignment"} of generated samples x0 (FM units) for their prompts; ref holds the
        teacher's samples from the same noise (backbones without real data compare against it)."""
        raise NotImplementedError

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples (FM units) → images [B, C, H, W] in [−1, 1] for samples.png (toy: already images)."""
        return x0

    def floor(self, n: int) -> dict[str, float]:
        """Real-vs-real distance at n samples."""
        raise NotImplementedError

    def export(self, student: nn.Module, folder: Path) -> None:
        """Save the distilled student (toy: safetensors + JSON; Sana: a SanaSprintPipeline folder)."""
        raise NotImplementedError


class ToyBackbone(Backbone):
    """toy2d / digits / cifar10: a flow-matching teacher trained here (cached), class label = prompt."""

    def __init__(self, name: str, device: str, data_dir: str | None, cache_root: str, seed: int,
                 teacher_steps: int | None = None):
        import metrics

        try:  # data first: a missing --data-dir fails before anything is trained or written
            x, y, C = toy.load_data(name, "train", data_dir)
        except toy.ToyDataError as e:
            raise InputError(str(e)) from e
        net = toy.train_teacher(name, data_dir, device, f"{cache_root}/teachers", steps=teacher_steps)
        black = -torch.ones(1, *x.shape[1:]) if x.dim() > 2 else torch.zeros(1, *x.shape[1:])
        super().__init__(name, TrigFlow(net, uncond=torch.tensor([C], device=device)),
                         toy.student_from_teacher(net).to(device), tuple(x.shape[1:]), C, black.to(device),
                         [str(c) for c in range(C)], metrics.DISTANCE_NAME[name])
        self.x, self.y, self.device = x.to(device), y.to(device), device
        self.evaluator = metrics.Evaluator(name, data_dir, device, f"{cache_root}/classifiers", seed)

    def real_data(self, n, generator):
        i = torch.randint(len(self.x), (n,), generator=generator).to(self.device)
        return self.x[i], self.y[i]

    def evaluate(self, x0, prompt, ref):
        return self.evaluator(x0, prompt)

    def floor(self, n):
        return self.evaluator.floor(n)

    def export(self, student, folder):
        toy.save_module(student, toy.TEACHERS[self.name], folder)


def build(cfg) -> Backbone:
    """The backbone named by cfg.backbone (heavy imports only for Sana)."""
    if cfg.backbone in toy.BACKBONES:
        return ToyBackbone(cfg.backbone, cfg.device, cfg.data_dir or None, cfg.cache_dir, cfg.seed,
                           cfg.teacher_steps or None)
    import sana

    return sana.SanaBackbone(cfg)
