"""Sana through diffusers for Eqs. 5–7 (Sec. 5): a local SanaPipeline folder's transformer as the
flow-matching velocity v(x_FM, s, cond) that trigflow.TrigFlow turns into F, prompt encoding, the
Sana-Sprint student, JVP-safe cross-attention, DC-AE encode/decode, the black latent, export.
t ∈ [0, π/2], t = 0 is data, σ_d = 0.5; FM latent = DC-AE latent × scaling_factor; TrigFlow x0 =
σ_d·(FM latent). The transformer sees flow time s ∈ [0, 1] × timestep_scale, never integer-cast.
Over 250 lines: the whole diffusers surface of Sana in one place (loading, the time feed, prompts as
the pipelines encode them, the student, fp32 cross-attention, the DC-AE, export).
"""

import gc
import inspect
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from runtime import ieee_fp32
from sana_io import LAYOUT, TEACHER_REPO, SanaInputError, check_folder

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's and Sana-Sprint's default
VAE_HELD = ("whole", "encoder", "none")  # load_sana's vae: the part of the DC-AE kept resident
CACHED_PROMPTS = 256  # prompt encodings kept (real Sana: 300 × 2304 fp32 ≈ 2.8 MB each)


def complex_human_instruction() -> list[str]:
    """SanaSprintPipeline.__call__'s default complex_human_instruction (SanaPipeline's too), read
    from the installed diffusers: lines that, newline-joined, go before every prompt."""
    from diffusers import SanaSprintPipeline

    call = inspect.signature(SanaSprintPipeline.__call__)
    return list(call.parameters["complex_human_instruction"].default)


@dataclass
class SanaParts:
    """The pieces of a SanaPipeline folder that training needs."""

    transformer: Any  # SanaTransformer2DModel, the flow-matching teacher
    text_encoder: Any  # Gemma2Model
    tokenizer: Any  # GemmaTokenizer
    # AutoencoderDC in float32, or the part training uses: its encoder (sCM), None (TBCM);
    # black_latent, decode and export load the folder's whole DC-AE for the call (dc_ae)
    vae: Any
    # transformer timestep = timestep_scale·s (SanaPipeline: num_train_timesteps × config value)
    timestep_scale: float
    scaling_factor: float  # DC-AE latent × scaling_factor = FM latent
    vae_scale_factor: int  # pixels per latent cell: 2^(len(encoder_block_out_channels) − 1)
    folder: Path  # the SanaPipeline folder, for the DC-AE not held
    device: torch.device


@contextmanager
def malformed(folder: Path) -> Iterator[None]:
    """Whatever the loader raises, the folder is malformed: one SanaInputError naming it."""
    try:
        yield
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SanaInputError(f"{folder}: cannot load ({reason}); {LAYOUT}") from e


def load_sana(
    folder: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    own_memory: bool = False,
    vae: str = "whole",
) -> SanaParts:
    """diffusers SanaPipeline folder → SanaParts (transformer, text encoder in dtype; VAE fp32).
    own_memory: files read, not mapped, and every weight copied (hold_in_memory), for a bench that
    measures the RSS (bench/cost_paper.py on a CPU); off, diffusers' loading as it is.
    vae: "whole"; "encoder" (the decoder dropped: sCM trains on encodings), "none" (TBCM's
    training needs no DC-AE: the black latent, decoding and export load it for the call)."""
    folder = check_folder(folder)
    if vae not in VAE_HELD:
        raise ValueError(f"vae={vae!r}: one of {', '.join(VAE_HELD)}")
    from diffusers import SanaPipeline  # after the layout check: a bad path fails at once

    dtypes = {"transformer": dtype, "text_encoder": dtype, "default": torch.float32}
    with malformed(folder):
        kw = dict(dtype=dtypes, local_files_only=True, disable_mmap=own_memory)  # False: maps
        pipe = SanaPipeline.from_pretrained(folder, vae=None, **kw)
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
    dc_ae = None if vae == "none" else load_vae(folder, device, own_memory)
    if vae == "encoder":
        dc_ae.decoder = None  # 0.6 GB at full size that sCM's training step never calls
    if own_memory:
        hold_in_memory(pipe.transformer, pipe.text_encoder)
    gc.collect()  # the loaders' reference cycles hold their read buffers (1.1 GB at full size)
    # SanaPipeline feeds scheduler timesteps (num_train_timesteps·s) × config.timestep_scale.
    n_train = pipe.scheduler.config.get("num_train_timesteps", 1000)
    return SanaParts(
        transformer=pipe.transformer.to(device).eval().requires_grad_(False),
        text_encoder=pipe.text_encoder.to(device).eval().requires_grad_(False),
        tokenizer=pipe.tokenizer,
        vae=dc_ae,
        timestep_scale=float(n_train * pipe.transformer.config.timestep_scale),
        scaling_factor=float(vae_config["scaling_factor"]),
        # SanaPipeline's vae_scale_factor
        vae_scale_factor=2 ** (len(vae_config["encoder_block_out_channels"]) - 1),
        folder=folder,
        device=torch.device(device),
    )


def load_vae(folder: str | Path, device: torch.device | str, own_memory: bool = False) -> Any:
    """The folder's DC-AE alone (AutoencoderDC), in float32 as Sana's own training code keeps it,
    frozen; own_memory as load_sana."""
    from diffusers import AutoencoderDC

    folder = Path(folder)
    with malformed(folder):
        kw = dict(torch_dtype=torch.float32, local_files_only=True, disable_mmap=own_memory)
        vae = AutoencoderDC.from_pretrained(folder / "vae", **kw)
    if own_memory:
        hold_in_memory(vae)
    return vae.to(device).eval().requires_grad_(False)


@contextmanager
def dc_ae(parts: SanaParts, need: str) -> Iterator[Any]:
    """parts.vae if it holds `need` ("encoder" or "decoder"), else the folder's whole DC-AE,
    loaded for the call and released after it."""
    held = parts.vae is not None and getattr(parts.vae, need, None) is not None
    vae = parts.vae if held else load_vae(parts.folder, parts.device)
    try:
        yield vae
    finally:
        del vae
        if not held:
            gc.collect()  # the loaded DC-AE's reference cycles


def hold_in_memory(*modules: torch.nn.Module) -> None:
    """Every weight of modules in memory of its own, not pages of a mapped file (transformers maps
    Gemma's even when diffusers reads), so that RSS counts them from the start, as device memory
    would."""
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            t.data = t.data.clone()
    gc.collect()  # the mapped files' last references


def load_transformer(
    folder: str | Path, device: torch.device | str, dtype: torch.dtype
) -> tuple[Any, float]:
    """Only the transformer of a SanaPipeline folder (in dtype, as load_sana) and its
    timestep_scale: what training from an offline bank needs to initialise the student; text
    encoder and DC-AE stay on disk."""
    from diffusers import SanaTransformer2DModel

    folder = check_folder(folder)
    with malformed(folder):
        kw = dict(dtype=dtype, local_files_only=True, disable_mmap=True)  # read, not mapped (RSS)
        tr = SanaTransformer2DModel.from_pretrained(folder / "transformer", **kw)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
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

    def forward(
        self, x_fm: torch.Tensor, s: torch.Tensor, cond: tuple, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        tr = self.transformer
        if (guidance is not None) != bool(tr.config.guidance_embeds):
            raise ValueError("pass guidance exactly when the transformer has guidance_embeds")
        prompt_embeds, prompt_attention_mask = cond
        extra = {} if guidance is None else {"guidance": guidance.to(tr.dtype)}
        out = tr(
            x_fm.to(tr.dtype),
            encoder_hidden_states=prompt_embeds.to(tr.dtype),
            encoder_attention_mask=prompt_attention_mask,
            timestep=self.timestep_scale * s,
            return_dict=False,
            **extra,
        )[0]
        return out.to(x_fm.dtype)  # [B, C, h, w]


def encode_prompts(
    parts: SanaParts, prompts: list[str], max_sequence_length: int, *, instruction: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers SanaSprintPipeline.__call__'s encoding: prompts → (embeds [B, L, D], mask [B, L]).
    instruction: complex_human_instruction() before each prompt, as the pipelines and the TBCM code
    do by default; Gemma reads n_chi + L − 2 tokens, BOS + the last L − 1 are kept: the prompt's,
    seen in the instruction's context (from its last token on if the tokenizer splits that off).
    Else (--plain-prompts) the prompt alone, L tokens."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline(parts.tokenizer, parts.text_encoder, None, None, None)  # text only
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=parts.text_encoder.device,
            max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction() if instruction else None,
        )
    return embeds, mask


def empty_prompt(parts: SanaParts, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers SanaPipeline.encode_prompt's negative prompt "" under CFG, the batch-1 uncond of
    teacher CFG: L tokens, never the instruction (whatever --plain-prompts says)."""
    return encode_prompts(parts, [""], max_sequence_length, instruction=False)


def make_student(teacher: Any, timestep_scale: float, dtype: torch.dtype = torch.float32) -> Any:
    """Sana-Sprint student (fp32; a LoRA student's base: the teacher's dtype): the teacher's
    weights + a guidance embedding (fed 0.1·w) at 0.

    diffusers sums guidance_embedder(0.1·w) into the time embedding
    (SanaCombinedTimestepGuidanceEmbeddings). Zeroing its last linear makes the student equal the
    teacher for any w; the first linear stays random so that gradients reach both. Since
    SanaSprintPipeline feeds the student s itself, the teacher must see s too (timestep_scale 1).
    """
    from diffusers import SanaTransformer2DModel

    if not math.isclose(timestep_scale, 1.0):
        raise ValueError(
            f"the teacher sees timestep {timestep_scale:g}·s but SanaSprintPipeline feeds s; start "
            f"from a Sana-Sprint teacher (transformer timestep_scale 0.001), e.g. {TEACHER_REPO}"
        )
    if teacher.config.guidance_embeds:
        raise ValueError(
            "the teacher already has a guidance embedding (a distilled student?); "
            "start from the teacher's SanaPipeline folder"
        )
    config = {**teacher.config, "guidance_embeds": True, "guidance_embeds_scale": 0.1}
    student = SanaTransformer2DModel.from_config(config)
    # AdaLayerNormSingle keeps its time MLP under .emb; the combined embedding at the top level.
    state = {
        k.replace("time_embed.emb.", "time_embed."): p for k, p in teacher.state_dict().items()
    }
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"teacher → student weight map failed: {missing=}, {unexpected=}")
    torch.nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_embed.guidance_embedder.linear_2.bias)
    # fp32 master weights whatever the teacher's dtype. Plain Module.to: diffusers' ModelMixin.to
    # logs a float32-modules warning on any dtype cast.
    return torch.nn.Module.to(student, teacher.device, dtype)


class MatmulAttnProcessor:
    """diffusers SanaAttnProcessor2_0 spelled out so that forward AD works: softmax(q·kᵀ/√d + mask)
    ·v in float32 (float64 kept) with autocast and TF32 off, as the official code casts q, k, v
    "for sCM"."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        B = context.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        d, fp = k.shape[-1] // attn.heads, torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(context.device.type, enabled=False), ieee_fp32():
            # [B, heads, N, d]
            q, k, v = (a.to(fp).view(B, -1, attn.heads, d).transpose(1, 2) for a in (q, k, v))
            mask = None
            if attention_mask is not None:  # additive [B, 1, L] → [B, heads, 1, L], as for SDPA
                mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
                mask = mask.view(B, attn.heads, -1, mask.shape[-1]).to(fp)
            out = self.core(q, k, v, mask).transpose(1, 2).reshape(B, -1, attn.heads * d)
        # back to the input's dtype, as diffusers' processor returns it (bf16 under autocast)
        out = out.to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q·kᵀ/√d + mask)·v on [B, heads, N, d], d^−½ being SDPA's default scale."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return (scores if mask is None else scores + mask).softmax(dim=-1) @ v


class CrossAttnProcessor(MatmulAttnProcessor):
    """The student's cross-attention: MatmulAttnProcessor's fp32 core, by its matmul under forward
    AD (the JVP) and by fused SDPA otherwise (gradient pass, evaluation: autograd then keeps no
    [B, heads, N, L] scores)."""

    # Both passes keep the fp32 core, because F_θ (gradient pass) must equal F⁻ (the JVP's primal)
    # at θ = θ⁻. Measured on the tiny pipeline (28 pairs, 64 px): under bf16 autocast ‖F_θ − F⁻‖
    # is 5.7% of ‖g‖ on average (max 38%; the JVP's own bf16 rounding, also with the matmul in both
    # passes), 8.0% (max 52%) with diffusers' stock bf16 SDPA processor in the gradient pass; in
    # fp32 either gives 6e-6 of ‖g‖ (tests/test_sana_recipe.py::test_cross_attention_policy).
    def core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if fwAD.unpack_dual(q).tangent is not None:  # inside torch.func.jvp
            return super().core(q, k, v, mask)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def jvp_safe(model: torch.nn.Module) -> torch.nn.Module:
    """torch.func.jvp through Sana: every block's cross-attention attn2 → CrossAttnProcessor.

    Forward-mode AD has no rule for fused SDPA kernels, so under it the core is a matmul; Sana's
    linear self-attention (attn1) is JVP-safe as it is and keeps its processor."""
    for block in model.modules():  # a transformer, or a SanaVelocity holding one
        if getattr(block, "attn2", None) is not None:
            block.attn2.set_processor(CrossAttnProcessor())
    return model


def encode_images(parts: SanaParts, images: torch.Tensor, per_call: int) -> torch.Tensor:
    """Images in [−1, 1] [B, 3, H, W] → FM latents (DC-AE latent × scaling_factor) [B, C, h, w],
    `per_call` images per DC-AE call (its activations grow with it)."""
    with dc_ae(parts, "encoder") as vae, torch.no_grad():
        x = [vae.encode(x.to(vae.device, vae.dtype)).latent for x in images.split(per_call)]
    return torch.cat(x) * parts.scaling_factor


def black_latent(parts: SanaParts, height: int, width: int) -> torch.Tensor:
    """TBCM Sec. 4.3: FM latent [1, C, h, w] of the all-black image (pixels −1), height × width."""
    return encode_images(parts, -torch.ones(1, 3, height, width), 1)


def decode(parts: SanaParts, x0_fm: torch.Tensor, per_call: int | None = None) -> torch.Tensor:
    """diffusers SanaPipeline decode + postprocess: FM latents [B, C, h, w] → images in [0, 1],
    `per_call` latents per DC-AE call (default: all), the DC-AE loaded once for them."""
    with dc_ae(parts, "decoder") as vae, torch.no_grad():
        latent = x0_fm.to(vae.device, vae.dtype) / parts.scaling_factor
        images = torch.cat([vae.decode(x).sample for x in latent.split(per_call or len(latent))])
    return (images / 2 + 0.5).clamp(0, 1)


def export_student(student: Any, parts: SanaParts, out_dir: str | Path) -> Path:
    """diffusers SanaSprintPipeline folder: student, teacher's text encoder/tokenizer/VAE, SCM."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    with dc_ae(parts, "decoder") as vae:  # the whole DC-AE (an sCM run holds its encoder only)
        pipe = SanaSprintPipeline(parts.tokenizer, parts.text_encoder, vae, student, SCMScheduler())
        pipe.save_pretrained(out_dir)
    return Path(out_dir)
