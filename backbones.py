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
from sana import (CACHED_PROMPTS, MAX_SEQUENCE_LENGTH, TINY_MAX_SEQUENCE_LENGTH, TINY_PROMPTS, VAE_BATCH,
                  SanaFolderError, SanaVelocity, black_latent, check_folder, decode, empty_prompt,
                  encode_images, encode_prompts, export_student, image_folder, jvp_safe, load_image,
                  load_sana, make_student, quiet_loading, read_prompts, tiny_folder, velocity)
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


# ------------------------------------------------------------------------------------------- Sana
def check_input(cfg: Any) -> tuple[list[str], list[Path], list[str]]:
    """train.py's sana flags → (prompts, image paths, captions) or InputError; nothing is loaded."""
    if bool(cfg.pretrained) == bool(cfg.tiny):
        raise InputError("--backbone sana needs exactly one of --pretrained DIR (a local "
                         "SanaPipeline folder) or --tiny (a tiny random pipeline)")
    if cfg.resolution <= 0 or cfg.resolution % 32:  # SanaSprintPipeline.check_inputs
        raise InputError(f"--resolution {cfg.resolution}: must be a positive multiple of 32")
    if cfg.max_sequence_length < 0:
        raise InputError("--max-sequence-length must be >= 0 (0: 300, or 16 with --tiny)")
    if cfg.method == "scm" and not cfg.images:
        raise InputError("--method scm on sana needs --images DIR (images with same-name .txt "
                         "captions); --method tbcm needs prompts only")
    if cfg.method == "tbcm" and cfg.images:
        raise InputError("--images is for --method scm; --method tbcm needs prompts only")
    if cfg.prompts_file:
        try:
            prompts = read_prompts(cfg.prompts_file)
        except ValueError as e:
            raise InputError(str(e)) from e
    elif cfg.method == "scm":
        prompts = []  # the captions are the prompts
    elif cfg.tiny:
        prompts = list(TINY_PROMPTS)
    else:
        raise InputError("--backbone sana needs --prompts-file F (UTF-8 text, one prompt per line)")
    try:
        if cfg.pretrained:
            check_folder(cfg.pretrained)
        paths, captions = image_folder(cfg.images) if cfg.images else ([], [])
    except SanaFolderError as e:
        raise InputError(str(e)) from e
    except ValueError as e:  # from image_folder
        raise InputError(f"--images {e}") from e
    return prompts, paths, captions


class SanaBackbone(Backbone):
    """Sana from a local SanaPipeline folder (--pretrained) or a tiny random one (--tiny).

    Teacher: the FM transformer under CFG against the encoding of "" (Eqs. 5–7); student: the
    Sana-Sprint student (make_student) with JVP-safe cross-attention; data: FM latents [C, h, w].
    Each prompt is encoded once and cached, so its K trajectories reuse it (TBCM Sec. 4.1). Without
    real metrics, evaluation compares each sampler with teacher@N on the same noise and prompts.
    """

    def __init__(self, cfg: Any):
        prompts, self.image_paths, captions = check_input(cfg)  # before anything is loaded
        # the captions join the prompt table; image k has prompt image_prompt[k]
        prompts += [c for c in dict.fromkeys(captions) if c not in prompts]
        self.image_prompt = torch.tensor([prompts.index(c) for c in captions], dtype=torch.long)
        res = cfg.resolution
        # the pipeline: fp32 master weights; bf16 only through train.py's autocast
        try:
            with quiet_loading():
                folder = tiny_folder(cfg.cache_dir) if cfg.tiny else cfg.pretrained
                parts = load_sana(folder, cfg.device, torch.float32)
        except SanaFolderError as e:
            raise InputError(str(e)) from e
        f, tr = parts.vae_scale_factor, parts.transformer
        if res % (f * tr.config.patch_size):
            raise InputError(f"--resolution {res}: must be a multiple of "
                             f"{f * tr.config.patch_size} for this DC-AE and transformer")
        self.L = cfg.max_sequence_length or (
            TINY_MAX_SEQUENCE_LENGTH if cfg.tiny else MAX_SEQUENCE_LENGTH)

        # teacher: CFG against ""
        teacher = TrigFlow(velocity(tr, parts.timestep_scale), uncond=empty_prompt(parts, self.L))
        student = sana_student(tr, parts.timestep_scale, cfg.seed, cfg.grad_checkpointing)
        data_shape = (tr.config.in_channels, res // f, res // f)
        black = black_latent(parts, res, res).to(cfg.device)  # [1, C, h, w]
        super().__init__("sana", teacher, student, data_shape, len(prompts), black, prompts,
                         "paired_mse_to_teacher")
        self.parts, self.device, self.resolution = parts, cfg.device, res
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cond(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TBCM Sec. 4.1: prompt indices [B] → (embeds [B, L, D], mask [B, L]); encoded once."""
        idx = prompt.tolist()
        for i in dict.fromkeys(idx):
            if i not in self._cache:
                # one prompt per call and no autocast: the cache does not depend on the batch or the
                # precision of whichever pass asked first
                with torch.autocast(torch.device(self.device).type, enabled=False):
                    self._cache[i] = encode_prompts(self.parts, [self.prompt_names[i]], self.L)
        embeds = torch.cat([self._cache[i][0] for i in idx]).to(self.device)
        mask = torch.cat([self._cache[i][1] for i in idx]).to(self.device)
        # at most CACHED_PROMPTS encodings: drop the oldest (dicts keep insertion order) not in use
        in_use = set(idx)
        stale = [k for k in self._cache if k not in in_use]
        for k in stale[: max(0, len(self._cache) - CACHED_PROMPTS)]:
            del self._cache[k]
        return embeds, mask

    def real_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sana-Sprint (sCM baseline): n images drawn with replacement, read and DC-AE-encoded on
        every call as its data loader does → (FM latents [n, C, h, w], prompt indices [n])."""
        k = torch.randint(len(self.image_paths), (n,), generator=generator)
        pixels = torch.stack([load_image(self.image_paths[j], self.resolution) for j in k.tolist()])
        x0 = torch.cat([encode_images(self.parts, pixels[i:i + VAE_BATCH])
                        for i in range(0, n, VAE_BATCH)])
        return x0.to(self.device, torch.float32), self.image_prompt[k].to(self.device)

    def evaluate(self, x0: torch.Tensor, prompt: torch.Tensor,
                 ref: torch.Tensor) -> dict[str, float]:
        """Paired error to teacher@N on the same noise and prompts (FM units): distance = MSE over
        all elements; alignment = cosine similarity of each sample with its teacher sample, averaged
        over samples (1 = same direction). teacher@N itself scores 0 and 1."""
        x, y = x0.flatten(1).float(), ref.flatten(1).float()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
        return {"distance": float(((x - y) ** 2).mean()), "alignment": float(cos.mean())}

    def floor(self, n: int) -> dict[str, float]:
        """Paired error of teacher@N with itself: 0 (there is no real data to compare)."""
        return {"distance": 0.0}

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """SanaPipeline decode: FM latents [B, C, h, w] → images in [−1, 1] [B, 3, H, W]."""
        images = [decode(self.parts, x0[i:i + VAE_BATCH]) for i in range(0, len(x0), VAE_BATCH)]
        return 2 * torch.cat(images) - 1

    def export(self, student: torch.nn.Module, folder: Path) -> None:
        """A SanaSprintPipeline folder: the student's transformer with the teacher's other parts."""
        with quiet_loading():
            export_student(student.transformer, self.parts, folder)


def sana_student(tr: Any, timestep_scale: float, seed: int, grad_checkpointing: bool) -> nn.Module:
    """The Sana-Sprint student of teacher transformer `tr`, seeded (its guidance MLP's first layer is random),
    with JVP-safe cross-attention, as a velocity model fed s itself (as SanaSprintPipeline does)."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            transformer = make_student(tr, timestep_scale)
    except ValueError as e:
        raise InputError(str(e)) from e
    if grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    return SanaVelocity(jvp_safe(transformer), 1.0)


def build(cfg) -> Backbone:
    """The backbone named by cfg.backbone (heavy imports only for Sana)."""
    if cfg.backbone in toy.BACKBONES:
        return ToyBackbone(cfg.backbone, cfg.device, cfg.data_dir or None, cfg.cache_dir, cfg.seed,
                           cfg.teacher_steps or None)
    return SanaBackbone(cfg)
