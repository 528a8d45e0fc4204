"""Sana through diffusers (Sec. 5): a local SanaPipeline folder as a flow-matching VelocityModel
(Eqs. 5–7 are applied by trigflow.TrigFlow), the Sana-Sprint student, JVP-safe cross-attention,
SanaSprintPipeline export, and a tiny random pipeline built offline.
t ∈ [0, π/2], t = 0 is data, σ_d = 0.5; FM latent = DC-AE latent × scaling_factor; TrigFlow x0 =
σ_d·(FM latent). The transformer sees flow time s ∈ [0, 1] × timestep_scale, never integer-cast.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trigflow import VelocityModel

SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
TEACHER_REPO = "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_teacher_diffusers"
LAYOUT = (
    "expected a local SanaPipeline folder (model_index.json + transformer/ text_encoder/ "
    "tokenizer/ vae/ scheduler/), e.g. the Sana-Sprint teacher from the Hugging Face hub: "
    f"`huggingface-cli download {TEACHER_REPO} --local-dir DIR`"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SanaFolderError(ValueError):
    """A missing or malformed local Sana diffusers folder; the message is one line."""


@dataclass
class SanaParts:
    """The pieces of a SanaPipeline folder that training needs."""

    transformer: Any  # SanaTransformer2DModel, the flow-matching teacher
    text_encoder: Any  # Gemma2Model
    tokenizer: Any  # GemmaTokenizer
    vae: Any  # AutoencoderDC, kept in float32
    # transformer timestep = timestep_scale·s (SanaPipeline: num_train_timesteps × config value)
    timestep_scale: float
    scaling_factor: float  # DC-AE latent × scaling_factor = FM latent
    vae_scale_factor: int  # pixels per latent cell: 2^(len(encoder_block_out_channels) − 1)


# Random SanaPipeline shapes built offline. "tiny": the smallest that exercises every code path (tests).
# "small": the paper's setting at reduced width and depth (bench/cost.py): the real DC-AE f32c32 topology
# (6 stages, 3 ResBlock + 3 EfficientViT stages, 32 latent channels) at 1/8 width, a Gemma-2-like text
# encoder with 4 layers of width 256 (Gemma-2 2B: 26 × 2304), a Sana transformer with 4 layers of
# width 256 (Sana 0.6B: 28 × 1152).
_DCAE_F32C32 = dict(
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
    decoder_act_fns=("relu",) * 3 + ("silu",) * 3)
SIZES = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16),
        transformer=dict(in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                         attention_head_dim=16, num_cross_attention_heads=2,
                         cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
                         sample_size=8),
        vae=dict(latent_channels=4, attention_head_dim=4,
                 encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                 decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                 encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
                 encoder_qkv_multiscales=((), (), (5,), (5,)),
                 decoder_qkv_multiscales=((), (), (5,), (5,)),
                 encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1))),
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
        transformer=dict(in_channels=32, out_channels=32, num_layers=4, num_attention_heads=8,
                         attention_head_dim=32, num_cross_attention_heads=8,
                         cross_attention_head_dim=32, cross_attention_dim=256, caption_channels=256,
                         sample_size=16),
        vae=dict(latent_channels=32, attention_head_dim=16,
                 encoder_block_out_channels=(16, 32, 64, 64, 128, 128),
                 decoder_block_out_channels=(16, 32, 64, 64, 128, 128), **_DCAE_F32C32)),
}


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Reference §6: a random SanaPipeline with Sana-Sprint-teacher features (SIZES), saved offline."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from diffusers import SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    # Byte-fallback vocabulary: specials, the 256 bytes, a few characters; no merges, no download.
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    shape = SIZES[size]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), max_position_embeddings=4096, attn_implementation="eager",
            **shape["text"]))
        # Sana-Sprint teacher: QK-norm, and timestep_scale 0.001 so that SanaPipeline feeds s
        # (diffusers PR #11150).
        transformer = SanaTransformer2DModel(
            patch_size=1, qk_norm="rms_norm_across_heads", timestep_scale=0.001, **shape["transformer"])
        vae = AutoencoderDC(in_channels=3, downsample_block_type="conv",
                            upsample_block_type="interpolate", scaling_factor=0.41407, **shape["vae"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Sana's flow shift at 1024 px
    SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                 transformer=transformer, scheduler=scheduler).save_pretrained(out_dir)
    return Path(out_dir)


def check_folder(folder: str | Path) -> Path:
    """diffusers SanaPipeline layout: model_index.json + five subfolders, else SanaFolderError."""
    folder = Path(folder)
    missing = [f"{sub}/" for sub in SUBFOLDERS if not (folder / sub).is_dir()]
    missing += [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    if missing:
        raise SanaFolderError(f"{folder}: missing {' '.join(missing)}; {LAYOUT}")
    return folder


def load_sana(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> SanaParts:
    """diffusers SanaPipeline folder → SanaParts (transformer, text encoder in dtype; VAE fp32)."""
    folder = check_folder(folder)
    from diffusers import SanaPipeline  # after the layout check: a bad path fails at once

    # The DC-AE stays in float32, as Sana's own training code keeps it.
    dtypes = {"transformer": dtype, "text_encoder": dtype, "default": torch.float32}
    try:
        pipe = SanaPipeline.from_pretrained(folder, dtype=dtypes, local_files_only=True)
    except Exception as e:  # whatever the loader raises, the folder is malformed
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SanaFolderError(f"{folder}: cannot load ({reason}); {LAYOUT}") from e
    # SanaPipeline feeds scheduler timesteps (num_train_timesteps·s) × config.timestep_scale.
    n_train = pipe.scheduler.config.get("num_train_timesteps", 1000)
    return SanaParts(
        transformer=pipe.transformer.to(device).eval().requires_grad_(False),
        text_encoder=pipe.text_encoder.to(device).eval().requires_grad_(False),
        tokenizer=pipe.tokenizer,
        vae=pipe.vae.to(device).eval().requires_grad_(False),
        timestep_scale=float(n_train * pipe.transformer.config.timestep_scale),
        scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=pipe.vae_scale_factor,
    )


def load_transformer(folder: str | Path, device: torch.device | str) -> tuple[Any, float]:
    """Only the transformer of a SanaPipeline folder (fp32) and its timestep_scale (see load_sana): what training
    from an offline bank needs to initialise the student; text encoder and DC-AE stay on disk."""
    import json

    from diffusers import SanaTransformer2DModel

    folder = check_folder(folder)
    try:
        tr = SanaTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except Exception as e:  # whatever the loader raises, the folder is malformed
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SanaFolderError(f"{folder}: cannot load ({reason}); {LAYOUT}") from e
    scale = float(sched.get("num_train_timesteps", 1000) * tr.config.timestep_scale)
    return tr.to(device).eval().requires_grad_(False), scale


class SanaVelocity(torch.nn.Module):
    """diffusers SanaPipeline / SanaSprintPipeline transformer call as v(x_FM, s, cond, guidance).

    Returns v = ε − x0 for x_s = (1 − s)·x0 + s·ε. The transformer receives timestep_scale·s as a
    float (a teacher: SanaParts.timestep_scale; a student, as SanaSprintPipeline feeds it: 1).
    cond = (prompt_embeds [B, L, D], prompt_attention_mask [B, L]); guidance is the student's 0.1·w
    (None for a teacher, which has no guidance embedding).
    """

    def __init__(self, transformer: Any, timestep_scale: float):
        super().__init__()
        self.transformer, self.timestep_scale = transformer, timestep_scale

    def forward(self, x_fm: torch.Tensor, s: torch.Tensor, cond: tuple,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        tr = self.transformer
        if (guidance is not None) != bool(tr.config.guidance_embeds):
            raise ValueError("pass guidance exactly when the transformer has guidance_embeds")
        prompt_embeds, prompt_attention_mask = cond
        extra = {} if guidance is None else {"guidance": guidance.to(tr.dtype)}
        out = tr(x_fm.to(tr.dtype), encoder_hidden_states=prompt_embeds.to(tr.dtype),
                 encoder_attention_mask=prompt_attention_mask, timestep=self.timestep_scale * s,
                 return_dict=False, **extra)[0]
        return out.to(x_fm.dtype)  # [B, C, h, w]


def velocity(transformer: Any, timestep_scale: float) -> VelocityModel:
    """diffusers SanaPipeline transformer call as a VelocityModel: a SanaVelocity module."""
    return SanaVelocity(transformer, timestep_scale)


def encode_prompts(
    parts: SanaParts, prompts: list[str], max_sequence_length: int = 300,
    complex_human_instruction: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers SanaPipeline.encode_prompt: prompts → (prompt_embeds [B, L, D], mask [B, L])."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=None,
                        transformer=None, scheduler=None)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=parts.text_encoder.device,
            max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction)
    return embeds, mask


def empty_prompt(
    parts: SanaParts, max_sequence_length: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers SanaPipeline negative prompt "": the batch-1 unconditional cond of teacher CFG."""
    return encode_prompts(parts, [""], max_sequence_length)


def make_student(teacher: Any, timestep_scale: float) -> Any:
    """Sana-Sprint student: the teacher's weights + a guidance embedding (fed 0.1·w) at zero.

    diffusers sums guidance_embedder(0.1·w) into the time embedding
    (SanaCombinedTimestepGuidanceEmbeddings). Zeroing its last linear makes the student equal the
    teacher for any w; the first linear stays random so that gradients reach both. Since
    SanaSprintPipeline feeds the student s itself, the teacher must see s too (timestep_scale 1).
    """
    from diffusers import SanaTransformer2DModel

    if not math.isclose(timestep_scale, 1.0):
        raise ValueError(
            f"the teacher sees timestep {timestep_scale:g}·s but SanaSprintPipeline feeds s; start "
            f"from a Sana-Sprint teacher (transformer timestep_scale 0.001), e.g. {TEACHER_REPO}")
    if teacher.config.guidance_embeds:
        raise ValueError("the teacher already has a guidance embedding (a distilled student?); "
                         "start from the teacher's SanaPipeline folder")
    config = {**teacher.config, "guidance_embeds": True, "guidance_embeds_scale": 0.1}
    student = SanaTransformer2DModel.from_config(config)
    # AdaLayerNormSingle keeps its time MLP under .emb; the combined embedding at the top level.
    state = {k.replace("time_embed.emb.", "time_embed."): p
             for k, p in teacher.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"teacher → student weight map failed: {missing=}, {unexpected=}")
    torch.nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.bias)
    # Plain Module.to: diffusers' ModelMixin.to logs a float32-modules warning on any dtype cast.
    return torch.nn.Module.to(student, teacher.device, teacher.dtype)


class MatmulAttnProcessor:
    """diffusers SanaAttnProcessor2_0, softmax(q·kᵀ/√d + mask)·v spelled out: forward AD works."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        B = context.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        d = k.shape[-1] // attn.heads
        # [B, heads, N, d]
        q, k, v = (a.view(B, -1, attn.heads, d).transpose(1, 2) for a in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # SDPA's default scale
        if attention_mask is not None:  # additive bias [B, 1, L] → [B, heads, 1, L], as for SDPA
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
            scores = scores + mask.view(B, attn.heads, -1, mask.shape[-1])
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out.to(q.dtype))) / attn.rescale_output_factor


def jvp_safe(model: torch.nn.Module) -> torch.nn.Module:
    """Reference §5: every Sana block's attn2 → MatmulAttnProcessor; linear attn1 stays as it is."""
    for block in model.modules():  # a transformer, or a SanaVelocity holding one
        if getattr(block, "attn2", None) is not None:
            block.attn2.set_processor(MatmulAttnProcessor())
    return model


def encode_images(parts: SanaParts, images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] [B, 3, H, W] → FM latents (DC-AE latent × scaling_factor) [B, C, h, w]."""
    with torch.no_grad():
        latent = parts.vae.encode(images.to(parts.vae.device, parts.vae.dtype)).latent
    return latent * parts.scaling_factor


def black_latent(parts: SanaParts, height: int, width: int) -> torch.Tensor:
    """TBCM Sec. 4.3: FM latent [1, C, h, w] of the all-black image (pixels −1), height × width."""
    return encode_images(parts, -torch.ones(1, 3, height, width))


def decode(parts: SanaParts, x0_fm: torch.Tensor) -> torch.Tensor:
    """diffusers SanaPipeline decode + postprocess: FM latents [B, C, h, w] → images in [0, 1]."""
    latent = x0_fm.to(parts.vae.device, parts.vae.dtype) / parts.scaling_factor
    with torch.no_grad():
        images = parts.vae.decode(latent).sample
    return (images / 2 + 0.5).clamp(0, 1)


def export_student(student: Any, parts: SanaParts, out_dir: str | Path) -> Path:
    """diffusers SanaSprintPipeline folder: student, teacher's text encoder/tokenizer/VAE, SCM."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    SanaSprintPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                       transformer=student, scheduler=SCMScheduler()).save_pretrained(out_dir)
    return Path(out_dir)


def image_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Sana-Sprint data layout: images with a same-name UTF-8 .txt caption → (paths, captions)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of images with same-name .txt captions")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}) with .txt captions")
    captions = []
    for path in paths:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"{path}: no caption file {caption.name} beside it")
        try:
            captions.append(caption.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as e:
            raise ValueError(f"{caption}: not UTF-8 text; save the caption as UTF-8") from e
    return paths, captions


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Sana-Sprint preprocessing: shorter side → resolution (bicubic), crop, [−1, 1] [3, H, W]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__})") from e
    scale = resolution / min(image.size)
    w = max(resolution, round(image.width * scale))
    h = max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8
    return x.float() / 127.5 - 1


def scm_images_to_latents(
    parts: SanaParts, folder: str | Path, resolution: int, batch_size: int = 8,
) -> tuple[torch.Tensor, list[str]]:
    """sCM baseline data (Sana-Sprint): images + same-name .txt → FM latents [N, C, h, w], captions.

    Each image goes through `load_image` and is encoded by the DC-AE.
    """
    paths, captions = image_folder(folder)
    pixels = [load_image(path, resolution) for path in paths]
    latents = [encode_images(parts, torch.stack(pixels[i:i + batch_size]))
               for i in range(0, len(pixels), batch_size)]
    return torch.cat(latents), captions


# ------------------------------------------------------------------ prompts, quiet loading, tiny cache
# --tiny without --prompts-file: a few prompts so that a smoke run needs no file at all.
TINY_PROMPTS = ("a red apple on a white table", "a blue car in the rain", "a black cat asleep",
                "a field of yellow flowers")
TINY_MAX_SEQUENCE_LENGTH = 16  # --tiny: keeps the tiny Gemma's text encoding short
MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's and Sana-Sprint's default
CACHED_PROMPTS = 256  # prompt encodings kept (real Sana: 300 × 2304 fp32 ≈ 2.8 MB each)
VAE_BATCH = 8  # images per DC-AE encode/decode call


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers / transformers: no progress bars or warnings while loading and saving folders, so
    bad input ends in one `error:` line; their settings are restored afterwards."""
    import diffusers.utils.logging as d_log
    import transformers.utils.logging as t_log

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (d_log, t_log)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()


def tiny_folder(cache_dir: str | Path) -> Path:
    """build_tiny_pipeline (seed 0) once per diffusers/transformers version under cache_dir.

    Shared, not per process: under torchrun transformers' save_pretrained writes on rank 0 only,
    and train.py lets rank 0 build first. Built under a temporary name, then renamed into place.
    """
    import os
    import shutil
    from importlib.metadata import version

    final = Path(cache_dir) / f"sana-tiny-{version('diffusers')}-{version('transformers')}"
    if not (final / "model_index.json").is_file():
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_pipeline(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_prompts(path: str | Path) -> list[str]:
    """TBCM official code: a UTF-8 .txt file, one prompt per line; blank lines are skipped."""
    fix = "pass a UTF-8 text file with one prompt per line"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file; {fix}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is not part of the first prompt
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:  # NUL is valid UTF-8 but never in a text file
        raise ValueError(f"--prompts-file {path}: binary or not UTF-8; {fix}")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts (only blank lines); {fix}")
    return prompts
