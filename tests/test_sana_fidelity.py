"""sana.py as diffusers runs Sana by default, on a tiny random pipeline (CPU): prompts encoded with
the complex human instruction (SanaSprintPipeline.__call__), the uncond of SanaPipeline's CFG, the
fp32 cross-attention under bf16 autocast, and Eqs. 3–4's JVP in float64."""

import copy
import inspect
import math
import types

import pytest
import torch
import torch.nn.functional as nnf
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import backbones
import lora
import sana
import sana_tiny
from config import parse_args
from loss import jvp_cs_dF_dt
from trigflow import SIGMA_D, TrigFlow

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red cat", "A Dog!", "a photograph of an astronaut riding a horse " * 8]  # 352 chars


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The --cache-dir holding the tiny pipeline, built once (backbones finds it there too)."""
    cache = tmp_path_factory.mktemp("cache")
    sana_tiny.cached_folder(cache)
    return cache


@pytest.fixture(scope="module")
def parts(cache):
    return sana.load_sana(sana_tiny.cached_folder(cache), "cpu", torch.float32)


def _pipe(parts, cls):
    return cls(parts.tokenizer, parts.text_encoder, None, None, None)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b))


def _student_F(parts, lora_rank: int = 0):
    """TrigFlow(student, 0.1) with JVP-safe cross-attention; the guidance embedding perturbed
    (lora_rank > 0: a LoRA student, lora.SANA_TARGETS, its B perturbed too). Seeded
    (make_student's guidance MLP starts random): about 1 in 30 random students has a ReLU input of
    the linear attention within eps = 1e-5 of its kink, where central differences err."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        student = sana.make_student(parts.transformer, parts.timestep_scale)
        torch.nn.init.normal_(student.time_embed.guidance_embedder.linear_2.weight, std=0.05)
        v = sana.jvp_safe(sana.SanaVelocity(student, 1.0))
        if lora_rank:
            lora.add_lora(v, lora_rank, 0.0, lora.SANA_TARGETS)
            for name, p in v.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
    return student, TrigFlow(v, guidance_scale=0.1)


def _inputs(parts, dtype=torch.float32):
    """cond (instruction on, L = 16), w, and (x, t, dx_t/dt) for two samples."""
    embeds, mask = sana.encode_prompts(parts, PROMPTS[:2], 16, instruction=True)
    g = torch.Generator().manual_seed(2)
    x, dxdt = (torch.randn(2, 4, 8, 8, generator=g, dtype=dtype) for _ in range(2))
    t, w = torch.tensor([0.4, 1.2], dtype=dtype), torch.tensor([4.0, 5.0], dtype=dtype)
    return (embeds.to(dtype), mask), w, x, t, dxdt


@pytest.mark.parametrize("L", [300, 8])
def test_encode_prompts_equals_sprint_pipeline(parts, L):
    """encode_prompts = SanaSprintPipeline.encode_prompt bit for bit: with __call__'s default
    complex_human_instruction, and with None (--plain-prompts). The instruction's window: BOS +
    the instruction's last token + the prompt's first L − 2 tokens, all seen in its context."""
    from diffusers import SanaPipeline, SanaSprintPipeline

    chi = inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"]
    assert sana.complex_human_instruction() == chi.default
    assert chi.default == inspect.signature(SanaPipeline.__call__).parameters[chi.name].default
    assert len(parts.tokenizer.encode("\n".join(chi.default))) == 1058  # the byte tokenizer's
    pipe = _pipe(parts, SanaSprintPipeline)
    ours = {}
    for instruction, given in ((True, chi.default), (False, None)):
        ours[instruction] = sana.encode_prompts(parts, PROMPTS, L, instruction=instruction)
        with torch.no_grad():
            ref = pipe.encode_prompt(
                PROMPTS, device="cpu", max_sequence_length=L, complex_human_instruction=given
            )
        for a, b in zip(ours[instruction], ref, strict=True):
            assert a.shape[:2] == (3, L) and torch.equal(a, b)
    (e_chi, m_chi), (e, m) = ours[True], ours[False]
    # the kept window starts at the instruction's last token (here its trailing "▁", one token
    # per character): one token more than the plain prompt's, up to L
    assert torch.equal(m_chi.sum(1), (m.sum(1) + 1).clamp(max=L)) and not m[1].all()
    assert m[2].all()  # the long prompt fills L
    # every kept token after BOS (Gemma is causal) sees the instruction
    assert (e_chi - e)[:, 1:].abs().amax(-1)[m[:, 1:].bool()].min() > 0


def test_empty_prompt_equals_pipeline_negative(parts):
    """empty_prompt = SanaPipeline.encode_prompt's negative_prompt "" under CFG, instruction on for
    the prompts (the pipeline drops it for the negative): the uncond of teacher CFG."""
    from diffusers import SanaPipeline

    chi = sana.complex_human_instruction()
    for L in (300, 8):
        with torch.no_grad():
            _, _, neg, neg_mask = _pipe(parts, SanaPipeline).encode_prompt(
                PROMPTS[:2],
                do_classifier_free_guidance=True,
                negative_prompt="",
                device="cpu",
                max_sequence_length=L,
                complex_human_instruction=chi,
            )
        embeds, mask = sana.empty_prompt(parts, L)
        assert embeds.shape[:2] == (1, L) and int(mask.sum()) == 1  # BOS only
        assert torch.equal(neg, embeds.expand(2, -1, -1))
        assert torch.equal(neg_mask, mask.expand(2, -1))
        with_chi = sana.encode_prompts(parts, [""], L, instruction=True)
        assert not torch.equal(with_chi[0], embeds)  # so the instruction would have mattered


def test_plain_prompts_reach_sana_teacher(cache, tmp_path):
    """--plain-prompts: SanaTeacher.cond encodes without the instruction; by default with it. The
    uncond is "" without it either way (SanaPipeline)."""
    teachers = {}
    for plain in (False, True):
        argv = ["--backbone", "sana", "--tiny", "--cache-dir", str(cache), "--out", str(tmp_path)]
        teachers[plain] = backbones.build(parse_args(argv + ["--plain-prompts"] * plain))
    conds = {plain: bb.cond(torch.tensor([0, 1])) for plain, bb in teachers.items()}
    bb = teachers[False]
    assert bb.cfg.plain_prompts is False and teachers[True].cfg.plain_prompts is True
    assert not torch.equal(conds[False][0], conds[True][0])
    for plain, (embeds, mask) in conds.items():
        ref = sana.encode_prompts(bb.parts, bb.prompt_names[:2], bb.L, instruction=not plain)
        assert torch.equal(embeds, ref[0]) and torch.equal(mask, ref[1])
        assert torch.equal(teachers[plain].uncond[0], sana.empty_prompt(bb.parts, bb.L)[0])


def test_matmul_attention_equals_sdpa(parts):
    """MatmulAttnProcessor = diffusers' SanaAttnProcessor2_0 (SDPA) on a masked cross-attention,
    in float32 and in float64 (kept: agreement to 1e-12, which a float32 core could not reach)."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(2, 64, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    bias = torch.zeros(2, 1, 16)
    bias[0, :, 5:] = -10000.0  # SanaTransformer2DModel's (1 − mask)·(−10000)
    attn = parts.transformer.transformer_blocks[0].attn2
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        a = torch.nn.Module.to(copy.deepcopy(attn), dtype)
        args = (h.to(dtype), c.to(dtype), bias.to(dtype))
        with torch.no_grad():
            ours, ref = sana.MatmulAttnProcessor()(a, *args), SanaAttnProcessor2_0()(a, *args)
        assert ours.dtype == dtype and _rel(ours, ref) < tol


def test_matmul_attention_core_fp32_under_bf16_autocast():
    """Under bf16 autocast, softmax(q·kᵀ/√d + mask)·v runs in float32 (the official code's fp32
    attention): from the same bf16 q, k, v it matches a float64 reference to < 1e-5, where the same
    formula in bf16 errs > 1e-3. Projections are identities here, so the output is the core's."""
    from diffusers.models.attention_processor import Attention

    B, N, Lc, H, d = 2, 64, 16, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H * d, generator=g).bfloat16() for n in (N, Lc, Lc))
    bias = torch.zeros(B, 1, Lc)
    bias[0, :, 5:] = -10000.0
    attn = types.SimpleNamespace(
        to_q=lambda _: q,
        to_k=lambda _: k,
        to_v=lambda _: v,
        norm_q=None,
        norm_k=None,
        heads=H,
        prepare_attention_mask=Attention(
            query_dim=H * d, heads=H, dim_head=d
        ).prepare_attention_mask,
        to_out=[torch.nn.Identity(), torch.nn.Identity()],
        rescale_output_factor=1.0,
    )

    def core(q, k, v, bias):  # [B, N, H·d]
        q, k, v = (a.view(B, -1, H, d).transpose(1, 2) for a in (q, k, v))
        p = (q @ k.transpose(-2, -1) / math.sqrt(d) + bias[:, None]).softmax(dim=-1)
        return (p @ v).transpose(1, 2).reshape(B, -1, H * d)

    ref = core(q.double(), k.double(), v.double(), bias.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sana.MatmulAttnProcessor()(
            attn, torch.zeros(B, N, H * d), torch.zeros(B, Lc, H * d), bias
        )
        low = core(q, k, v, bias)
    assert ours.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert _rel(ours, ref) < 1e-5 and _rel(low, ref) > 1e-3


def test_jvp_under_bf16_autocast(parts):
    """torch.func.jvp (loss.jvp_cs_dF_dt) through the JVP-safe student under bf16 autocast: finite
    and within bf16 accuracy of the float32 JVP (and not equal to it: autocast is on)."""
    _, F = _student_F(parts)
    cond, w, x, t, dxdt = _inputs(parts)
    f = lambda x_, t_: F(x_, t_, cond, w)  # noqa: E731
    _, dF = jvp_cs_dF_dt(f, x, t, dxdt, SIGMA_D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, dF_bf16 = jvp_cs_dF_dt(f, x, t, dxdt, SIGMA_D)
    assert torch.isfinite(dF_bf16).all() and 1e-5 < _rel(dF_bf16, dF) < 3e-2


class FloatDtypes(TorchFunctionMode):
    """Records the dtype of every floating-point tensor any torch function returns."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_leaves(out)
        self.seen |= {a.dtype for a in leaves if torch.is_tensor(a) and a.is_floating_point()}
        return out


def _timestep_embedding(
    timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=1e4
):
    """diffusers get_timestep_embedding (0.42.1, even dims) in timesteps' dtype, not float32."""
    dtype, half = torch.promote_types(timesteps.dtype, torch.float32), embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device)
    emb = timesteps[:, None].to(dtype) * torch.exp(exponent / (half - downscale_freq_shift))[None]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def _rms_norm(self, hidden_states):
    """diffusers RMSNorm.forward (0.42.1, CPU path, ≥ fp32 inputs) without the float32 variance."""
    x = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
    x = x if self.weight is None else x * self.weight
    return x if getattr(self, "bias", None) is None else x + self.bias


def _linear_attn(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    """diffusers SanaLinearAttnProcessor2_0 (0.42.1) without its .float() on q, k, v."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    q = q if attn.norm_q is None else attn.norm_q(q)
    k = k if attn.norm_k is None else attn.norm_k(k)
    q = nnf.relu(q.transpose(1, 2).unflatten(1, (attn.heads, -1)))
    k = nnf.relu(k.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3))
    v = nnf.pad(v.transpose(1, 2).unflatten(1, (attn.heads, -1)), (0, 0, 0, 1), value=1.0)
    out = (v @ k) @ q
    out = (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).flatten(1, 2).transpose(1, 2)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_float64_jvp_matches_central_difference(parts, monkeypatch, lora_rank):
    """Eqs. 3–4 through the Sana student (full, or a LoRA student) in float64: jvp_cs_dF_dt = the
    central difference of the same F along the same tangent (eps 1e-5) to ≤ 1e-6 relative, once
    diffusers' three float32 casts are patched here (float32 ops before, none after; in float32
    the patches change nothing)."""
    from diffusers.models import embeddings
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    from diffusers.models.normalization import RMSNorm

    student, F = _student_F(parts, lora_rank)
    cond32, w32, x32, t32, _ = _inputs(parts)
    with torch.no_grad():
        F32 = F(x32, t32, cond32, w32)
    cond, w, x, t, dxdt = _inputs(parts, torch.float64)
    f = lambda x_, t_: F(x_, t_, cond, w)  # noqa: E731
    torch.nn.Module.to(student, torch.float64)
    with FloatDtypes() as stock, torch.no_grad():
        f(x, t)
    assert stock.seen == {torch.float32, torch.float64}  # stock diffusers drops to float32

    monkeypatch.setattr(embeddings, "get_timestep_embedding", _timestep_embedding)
    monkeypatch.setattr(RMSNorm, "forward", _rms_norm)
    monkeypatch.setattr(SanaLinearAttnProcessor2_0, "__call__", _linear_attn)
    with FloatDtypes() as patched, torch.no_grad():
        out = f(x, t)
    assert patched.seen == {torch.float64} and out.dtype == torch.float64
    _, cs_dF_dt = jvp_cs_dF_dt(f, x, t, dxdt, SIGMA_D)
    _, fd = jvp_cs_dF_dt(f, x, t, dxdt, SIGMA_D, fd_eps=1e-5)
    assert cs_dF_dt.dtype == torch.float64 and _rel(cs_dF_dt, fd) <= 1e-6

    torch.nn.Module.to(student, torch.float32)
    with torch.no_grad():
        assert torch.equal(F(x32, t32, cond32, w32), F32)
