"""The one teacher interface (`Teacher`) and its kinds: toy teachers (toy_teacher.py) and Sana.

Flow-matching units at this interface (x_s = (1 − s)·x0 + s·ε, v = ε − x0, s ∈ [0, 1]); pairs.py and
metrics.py wrap `velocity` in trigflow.TrigFlow (Eqs. 5–7), so trajectory.py, loss.py and
sampler.py see TrigFlow units only (t = 0 is data, x0 there is σ_d·x0). A prompt is an index.
Over 250 lines: the interface and both implementations, each with a full and a LoRA student.
"""

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

import lora
import metrics
import parallel
import sana
import sana_io
import sana_tiny
import toy
import toy_teacher
from checkpoint import save_module, weights_sha256
from config import Config, UsageError


class Teacher(Protocol):
    """Everything TBCM needs from a teacher: implement it to distil your own (README: your teacher).

    Flow-matching units throughout (data x0, a latent for Sana; x_s = (1 − s)·x0 + s·ε; v = ε − x0).
    """

    # one sample's shape, e.g. (C, h, w) of a latent
    data_shape: tuple[int, ...]
    # prompt index → its text (toy: the class name)
    prompt_names: list[str]
    # the frozen teacher v(x_s [B, ...], s [B], cond, None) → v [B, ...]
    velocity: nn.Module
    # the empty prompt's (null class's) conditioning, batch 1: CFG's unconditional branch
    uncond: Any
    # [1, *data_shape]: the all-black image's data (its latent for Sana), for the brightness filter
    black: torch.Tensor
    # what `evaluate` reports as "distance" (lower is better)
    distance_name: str

    def cond(self, prompt: torch.Tensor) -> Any:
        """Prompt indices [B] → conditioning of batch B (a tensor or a tuple of tensors)."""

    def student(self) -> nn.Module:
        """A new trainable student v(x_s, s, cond, guidance): the teacher's network plus a guidance
        embedding (fed 0.1·w) whose output layer is zero: the teacher at step 0 (Sana-Sprint)."""

    def real_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The sCM baseline only: n real samples [n, *data_shape] and their prompt indices [n]."""

    def evaluate(
        self, x0: torch.Tensor, prompt: torch.Tensor, ref: torch.Tensor
    ) -> dict[str, float]:
        """{"distance", "alignment"} of samples x0 for their prompts (ref: teacher@N's samples)."""

    def floor(self, n: int) -> dict[str, float]:
        """{"distance"} of n real samples against held-out data: the floor (0 without real data)."""

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples → images [B, C, H, W] in [−1, 1], for samples.png."""

    def export(self, student: nn.Module, folder: Path) -> None:
        """Save the distilled student where users load it from."""


class ToyTeacher:
    """toy2d / digits / cifar10: a flow-matching teacher, trained on first use and cached."""

    def __init__(self, cfg: Config):
        name, data_dir = cfg.backbone, cfg.data_dir or None
        try:  # data first: a missing --data-dir fails before anything is trained or written
            x, y, C = toy.load_data(name, "train", data_dir)
        except toy.ToyDataError as e:
            raise UsageError(str(e)) from e
        self.net = self.velocity = toy_net(cfg)
        self.cfg, self.x, self.y, self.device = cfg, x.to(cfg.device), y.to(cfg.device), cfg.device
        self.data_shape, self.prompt_names = tuple(x.shape[1:]), [str(c) for c in range(C)]
        self.uncond = torch.tensor([C], device=cfg.device)  # class C: the null class
        black = torch.zeros(1, *x.shape[1:]) - float(x.dim() > 2)  # images: all −1; 2-D points: 0
        self.black, self.distance_name = black.to(cfg.device), metrics.DISTANCE_NAME[name]
        self._evaluator = None

    def cond(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt

    def student(self) -> nn.Module:
        if self.cfg.student == "lora":  # the teacher's own net; its passes in teacher mode
            student, self.velocity = lora.toy_lora(self.net, self.cfg)
            return student
        return toy_teacher.student_from_teacher(self.net).to(self.device)

    def real_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(len(self.x), (n,), generator=generator).to(self.device)
        return self.x[i], self.y[i]

    def evaluator(self) -> metrics.Evaluator:
        """Built on first use (its classifier is trained once and cached)."""
        if self._evaluator is None:
            c = self.cfg
            cache = f"{c.cache_dir}/classifiers"
            self._evaluator = metrics.Evaluator(
                c.backbone, c.data_dir or None, c.device, cache, c.seed
            )
        return self._evaluator

    def evaluate(self, x0: torch.Tensor, prompt: torch.Tensor, ref: torch.Tensor) -> dict:
        return self.evaluator()(x0, prompt)

    def floor(self, n: int) -> dict[str, float]:
        return self.evaluator().floor(n)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        return x0  # toy data are images in [−1, 1] already (or 2-D points)

    def export(self, student: nn.Module, folder: Path) -> None:
        """The student net (a LoRA student merged), and a LoRA student's adapter beside it."""
        cfg = toy_teacher.TEACHERS[self.cfg.backbone]
        if self.cfg.student == "lora":
            save_module(lora.merged_copy(student), cfg, folder)
            lora.save_adapter(student, folder.with_name(folder.name + "_lora"))
        else:
            save_module(student, cfg, folder)


class SanaTeacher:
    """Sana from a local SanaPipeline folder (--pretrained) or a tiny random one (--tiny).

    CFG against the encoding of "" (Eqs. 5–7 in trigflow); the Sana-Sprint student with JVP-safe
    cross-attention; data: FM latents [C, h, w]. Each prompt is encoded once and cached, so its K
    reuse it (TBCM Sec. 4.1). Without real images, evaluation compares each sampler with teacher@N.
    """

    def __init__(self, cfg: Config):
        try:  # every input is checked before anything is loaded
            prompts, self.image_paths, captions = sana_io.check_input(cfg)
            if cfg.tiny:  # also what --backbone sana without --pretrained runs: say so first
                given = cfg.prompts_file or cfg.images
                said = "the prompts given" if given else f"{len(prompts)} built-in prompts"
                print(
                    f"sana: the tiny random pipeline (random weights, built offline) and {said}, "
                    f"a {cfg.steps}-step smoke run; --pretrained DIR distils a real teacher",
                    flush=True,
                )
            with sana_io.quiet_loading():
                folder = sana_tiny.cached_folder(cfg.cache_dir) if cfg.tiny else cfg.pretrained
                # the DC-AE half training runs: sCM's encoder; none for TBCM (sana.load_sana)
                held = "encoder" if cfg.method == "scm" else "none"
                self.parts = sana.load_sana(folder, cfg.device, frozen_dtype(cfg), vae=held)
        except sana_io.SanaInputError as e:
            raise UsageError(str(e)) from e
        # the captions join the prompt table; image k has prompt image_prompt[k]
        prompts += [c for c in dict.fromkeys(captions) if c not in prompts]
        self.image_prompt = torch.tensor([prompts.index(c) for c in captions], dtype=torch.long)
        f, tr, res = self.parts.vae_scale_factor, self.parts.transformer, cfg.resolution
        if res % (f * tr.config.patch_size):
            raise UsageError(
                f"--resolution {res}: must be a multiple of {f * tr.config.patch_size} for this "
                "DC-AE and transformer"
            )
        self.L = cfg.max_sequence_length or (
            sana_tiny.TINY_MAX_SEQUENCE_LENGTH if cfg.tiny else sana.MAX_SEQUENCE_LENGTH
        )
        self.cfg, self.device, self.resolution, self.prompt_names = cfg, cfg.device, res, prompts
        self.velocity = sana.SanaVelocity(tr, self.parts.timestep_scale)
        self.uncond = sana.empty_prompt(self.parts, self.L)  # CFG against ""
        self.data_shape = (tr.config.in_channels, res // f, res // f)
        self.black = sana.black_latent(self.parts, res, res).to(cfg.device)  # [1, C, h, w]
        self.distance_name = "paired_mse_to_teacher"
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cond(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TBCM Sec. 4.1: prompt indices [B] → (embeds [B, L, D], mask [B, L]), encoded once."""
        idx, instruction = prompt.tolist(), not self.cfg.plain_prompts
        for i in dict.fromkeys(idx):
            # one prompt per call, no autocast: the cache does not depend on the batch or the
            # precision of whichever pass asked first
            if i not in self._cache:
                with torch.autocast(torch.device(self.device).type, enabled=False):
                    name = [self.prompt_names[i]]
                    cond = sana.encode_prompts(self.parts, name, self.L, instruction=instruction)
                    self._cache[i] = cond
        embeds = torch.cat([self._cache[i][0] for i in idx]).to(self.device)
        mask = torch.cat([self._cache[i][1] for i in idx]).to(self.device)
        # oldest first (dicts keep insertion order)
        stale = [k for k in self._cache if k not in set(idx)]
        for k in stale[: max(0, len(self._cache) - sana.CACHED_PROMPTS)]:
            del self._cache[k]
        return embeds, mask

    def student(self) -> nn.Module:
        tr, scale = self.parts.transformer, self.parts.timestep_scale
        if self.cfg.student == "lora":  # one copy: the teacher is the student in teacher mode
            student, self.velocity = lora.sana_lora(tr, scale, self.cfg)
            self.parts.transformer = None
            return student
        return sana_student(tr, scale, self.cfg)

    def real_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sana-Sprint (sCM baseline): n images drawn with replacement, read and DC-AE-encoded on
        every call as its data loader does → (FM latents [n, C, h, w], prompt indices [n])."""
        k = torch.randint(len(self.image_paths), (n,), generator=generator)
        pixels = torch.stack(
            [sana_io.load_image(self.image_paths[j], self.resolution) for j in k.tolist()]
        )
        x0 = sana.encode_images(self.parts, pixels, self.cfg.vae_batch)
        return x0.to(self.device, torch.float32), self.image_prompt[k].to(self.device)

    def evaluate(
        self, x0: torch.Tensor, prompt: torch.Tensor, ref: torch.Tensor
    ) -> dict[str, float]:
        """Paired error to teacher@N on the same noise and prompts: distance = MSE over all
        elements, alignment = mean per-sample cosine similarity (teacher@N scores 0 and 1)."""
        x, y = x0.flatten(1).float(), ref.flatten(1).float()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
        return {"distance": float(((x - y) ** 2).mean()), "alignment": float(cos.mean())}

    def floor(self, n: int) -> dict[str, float]:
        return {"distance": 0.0}  # no real data to compare

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """SanaPipeline decode: FM latents [B, C, h, w] → images [B, 3, H, W] in [−1, 1]."""
        return 2 * sana.decode(self.parts, x0, self.cfg.vae_batch) - 1

    def export(self, student: nn.Module, folder: Path) -> None:
        """A SanaSprintPipeline folder: the student's transformer (a LoRA student merged) with the
        teacher's other parts; a LoRA student's adapter beside it."""
        lora_student = self.cfg.student == "lora"
        merged = lora.merged_copy(student) if lora_student else student
        with sana_io.quiet_loading():
            sana.export_student(merged.transformer, self.parts, folder)
        if lora_student:
            lora.save_adapter(student, folder.with_name(folder.name + "_lora"))


def sana_student(tr: Any, timestep_scale: float, cfg: Config) -> nn.Module:
    """The Sana-Sprint student of transformer `tr`, seeded (its guidance MLP's first layer is
    random), with JVP-safe cross-attention, fed s itself as SanaSprintPipeline does."""
    try:
        with torch.random.fork_rng(devices=parallel.rng_devices(cfg.device)):
            torch.manual_seed(cfg.seed)
            transformer = sana.make_student(tr, timestep_scale)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if cfg.grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    return sana.SanaVelocity(sana.jvp_safe(transformer), 1.0)


def frozen_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the frozen Sana teacher and text encoder (--frozen-precision)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.frozen_precision]


def build(cfg: Config) -> Teacher:
    """The teacher named by cfg.backbone."""
    return ToyTeacher(cfg) if cfg.backbone in toy.BACKBONES else SanaTeacher(cfg)


def build_student(cfg: Config) -> tuple[nn.Module, str]:
    """Only the student, from the teacher's weights (then dropped), and those weights' SHA-256:
    what training from an offline bank needs (no text encoder, no VAE)."""
    if cfg.backbone == "sana":
        try:
            folder = sana_tiny.cached_folder(cfg.cache_dir) if cfg.tiny else cfg.pretrained
            # the teacher's weights as online training holds them: the same student, hash
            tr, scale = sana.load_transformer(folder, cfg.device, frozen_dtype(cfg))
        except sana_io.SanaInputError as e:
            raise UsageError(str(e)) from e
        if cfg.student == "lora":
            student = lora.sana_lora(tr, scale, cfg)[0]
            return student, student.base_sha256
        return sana_student(tr, scale, cfg), weights_sha256(tr)
    net = toy_net(cfg)
    if cfg.student == "lora":
        student = lora.toy_lora(net, cfg)[0]
        return student, student.base_sha256
    return toy_teacher.student_from_teacher(net).to(cfg.device), weights_sha256(net)


def toy_net(cfg: Config) -> nn.Module:
    """The toy teacher's velocity net, trained by flow matching on first use and cached."""
    data_dir, cache, steps = cfg.data_dir or None, f"{cfg.cache_dir}/teachers", cfg.teacher_steps
    return toy_teacher.train_teacher(cfg.backbone, data_dir, cfg.device, cache, steps=steps or None)
