"""sana.py against diffusers' SanaPipeline / SanaSprintPipeline on a tiny random pipeline (CPU)."""

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import sana
import sana_io
import sana_tiny
from config import parse_args
from trigflow import SIGMA_D, TrigFlow, trig_time, x0_from_F

L = 8  # max_sequence_length: keeps text encoding tiny
PROMPTS = ["a red cat", "A Dog!"]
H = W = 64  # pixels; 8×8 latents (DC-AE f8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sana_tiny.build_pipeline(tmp_path_factory.mktemp("tiny") / "sana")


@pytest.fixture(scope="module")
def parts(tiny):
    return sana.load_sana(tiny, "cpu", torch.float32)


def _student(parts, seed=1):
    """make_student, with the zero-initialised guidance embedding perturbed so guidance matters."""
    student = sana.make_student(parts.transformer, parts.timestep_scale)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(student.time_embed.guidance_embedder.linear_2.weight, std=0.05)
    return student


def _record_kwargs(module, key, store):
    """Forward pre-hook that appends the keyword argument `key` of every call to `store`."""
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: store.append(kwargs[key].detach().clone()), with_kwargs=True
    )


def test_folder_errors(tiny, tmp_path):
    """A missing folder, one without transformer/, an empty transformer/: one-line errors."""
    with pytest.raises(sana_io.SanaInputError, match="transformer/ text_encoder/") as e:
        sana.load_sana(tmp_path / "nowhere", "cpu", torch.float32)
    assert "\n" not in str(e.value) and sana_io.TEACHER_REPO in str(e.value)
    no_tr = tmp_path / "no_transformer"
    shutil.copytree(tiny, no_tr, ignore=lambda d, names: ["transformer"] if d == str(tiny) else [])
    with pytest.raises(sana_io.SanaInputError, match="missing transformer/;"):
        sana.load_sana(no_tr, "cpu", torch.float32)
    (no_tr / "transformer").mkdir()
    with pytest.raises(sana_io.SanaInputError, match="cannot load") as e:
        sana.load_sana(no_tr, "cpu", torch.float32)
    assert "\n" not in str(e.value)


def test_velocity_matches_sana_pipeline(parts, tiny):
    """SanaPipeline (FM Euler, CFG 4.5, 2 steps) ≡ Eq. 9 steps of the Eqs. 5–7 wrapped teacher;
    the transformer gets the same float timestep for each scheduler s; decode = the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny / "scheduler")
    pipe = SanaPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        transformer=parts.transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    kw = dict(
        prompt=PROMPTS,
        guidance_scale=4.5,
        num_inference_steps=2,
        height=H,
        width=W,
        latents=x,
        use_resolution_binning=False,
        max_sequence_length=L,
        complex_human_instruction=None,
    )
    fed = []
    hook = _record_kwargs(parts.transformer, "timestep", fed)
    latent = pipe(**kw, output_type="latent").images
    hook.remove()
    images = pipe(**kw, output_type="pt").images
    s_sched = scheduler.sigmas  # [1, s_1, 0] after the shift
    assert 0 < s_sched[1] < 1 and len(fed) == 2

    v = sana.SanaVelocity(parts.transformer, parts.timestep_scale)
    cond = sana.encode_prompts(parts, PROMPTS, L, instruction=False)
    ours = []
    hook = _record_kwargs(parts.transformer, "timestep", ours)
    for s in s_sched[:-1]:
        v(x, s.expand(2), cond)
    hook.remove()
    for a, b in zip(fed, ours, strict=True):
        assert a.is_floating_point() and b.is_floating_point()
        torch.testing.assert_close(a[:2], b, rtol=1e-6, atol=1e-7)

    # Eq. 9 rollout: x ← cos Δ·x − sin Δ·σ_d·F with t = arctan(s/(1 − s)); CFG on the doubled batch.
    F = TrigFlow(v, uncond=sana.empty_prompt(parts, L))
    w = torch.full((2,), 4.5)
    t, x_t = trig_time(s_sched), SIGMA_D * x
    with torch.no_grad():
        for i in range(len(t) - 1):
            d = t[i] - t[i + 1]
            F_i = F(x_t / SIGMA_D, t[i].expand(2), cond, w)
            x_t = torch.cos(d) * x_t - torch.sin(d) * SIGMA_D * F_i
    torch.testing.assert_close(x_t / SIGMA_D, latent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sana.decode(parts, latent), images, rtol=1e-5, atol=1e-5)


def test_student_equals_teacher_at_init(parts):
    """make_student: zero-initialised guidance embedding ⇒ student(·, g) = teacher(·) for any g."""
    student = sana.make_student(parts.transformer, parts.timestep_scale)
    assert student.config.guidance_embeds and student.config.guidance_embeds_scale == 0.1
    assert student.config.qk_norm == parts.transformer.config.qk_norm == "rms_norm_across_heads"
    assert student.transformer_blocks[0].attn2.norm_q is not None
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9])
    cond = sana.encode_prompts(parts, PROMPTS, L, instruction=False)
    with torch.no_grad():
        v_teacher = sana.SanaVelocity(parts.transformer, parts.timestep_scale)(x, s, cond)
        for g in (torch.tensor([0.0, 0.45]), torch.tensor([1.0, 7.0])):
            v_student = sana.SanaVelocity(student, 1.0)(x, s, cond, g)
            torch.testing.assert_close(v_student, v_teacher, rtol=0, atol=1e-6)
        ema = copy.deepcopy(sana.SanaVelocity(student, 1.0))  # what train.py does with the student
        torch.testing.assert_close(ema(x, s, cond, g), v_teacher, rtol=0, atol=1e-6)
    assert {id(p) for p in ema.parameters()} != {id(p) for p in student.parameters()}
    with pytest.raises(ValueError, match="SanaSprintPipeline feeds s"):
        sana.make_student(parts.transformer, 1000.0)


def test_jvp_safe_matches_forward_and_finite_difference(parts):
    """jvp_safe: same forward; torch.func.jvp of TrigFlow(student) in (x, t) = central FD (fp32)."""
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    student = _student(parts)
    cond, w = sana.encode_prompts(parts, PROMPTS, L, instruction=False), torch.tensor([4.0, 5.0])
    v = sana.SanaVelocity(student, 1.0)
    F = TrigFlow(v, guidance_scale=0.1)
    g = torch.Generator().manual_seed(2)
    x, dx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, dt = torch.tensor([0.4, 1.2]), torch.tensor([0.7, 1.0])
    with torch.no_grad():
        F_sdpa = F(x, t, cond, w)
        sana.jvp_safe(v)
        torch.testing.assert_close(F(x, t, cond, w), F_sdpa, rtol=0, atol=1e-5)
        blocks = student.transformer_blocks
        assert all(isinstance(b.attn2.processor, sana.MatmulAttnProcessor) for b in blocks)
        assert all(isinstance(b.attn1.processor, SanaLinearAttnProcessor2_0) for b in blocks)

        _, dF = torch.func.jvp(lambda x_, t_: F(x_, t_, cond, w), (x, t), (dx, dt))
        eps = 1e-3
        F_plus = F(x + eps * dx, t + eps * dt, cond, w)
        fd = (F_plus - F(x - eps * dx, t - eps * dt, cond, w)) / (2 * eps)
    err = torch.linalg.vector_norm(dF - fd) / torch.linalg.vector_norm(fd)
    assert err < 1e-2, float(err)


def test_export_student_matches_sprint_pipeline(parts, tmp_path):
    """SanaSprintPipeline on the exported folder: each step's σ_d·F is
    σ_d·TrigFlow(SanaVelocity(student, 1), 0.1)(x/σ_d, t, cond, w); guidance fed is 0.1·w;
    1 step: x0 = cos t·x − sin t·σ_d·F."""
    from diffusers import SanaSprintPipeline

    student = _student(parts)
    folder = sana.export_student(student, parts, tmp_path / "student")
    pipe = SanaSprintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(
        prompt=PROMPTS,
        guidance_scale=4.5,
        height=H,
        width=W,
        latents=x,
        output_type="latent",
        intermediate_timesteps=None,
        use_resolution_binning=False,
        max_sequence_length=L,
        complex_human_instruction=None,
    )
    F = TrigFlow(sana.SanaVelocity(student, 1.0), guidance_scale=0.1)
    cond, w = sana.encode_prompts(parts, PROMPTS, L, instruction=False), torch.full((2,), 4.5)

    steps, step = [], pipe.scheduler.step  # record (σ_d·F, t, x_t) as the pipeline passes them

    def record(out, t, x_t, **k):
        steps.append((out, t, x_t))
        return step(out, t, x_t, **k)

    pipe.scheduler.step = record
    guidance = []
    hook = _record_kwargs(pipe.transformer, "guidance", guidance)
    pipe(**kw, num_inference_steps=4, generator=torch.Generator().manual_seed(4))
    hook.remove()
    pipe.scheduler.step = step
    assert [float(t[0]) for _, t, _ in steps] == pytest.approx(np.linspace(1.57080, 0, 5)[:-1])
    torch.testing.assert_close(guidance[0], 0.1 * w)
    with torch.no_grad():
        for out, t, x_t in steps:
            F_t = F(x_t / SIGMA_D, t, cond, w)
            torch.testing.assert_close(SIGMA_D * F_t, out, rtol=1e-5, atol=1e-5)

    # One step from t = 1.57080 (SanaSprintPipeline's max_timesteps, ≈ π/2); x_t = σ_d·latents.
    x0_fm = pipe(**kw, num_inference_steps=1).images
    t = torch.full((2,), 1.57080)
    with torch.no_grad():
        x0 = x0_from_F(SIGMA_D * x, t, F(x, t, cond, w), SIGMA_D)
    torch.testing.assert_close(x0 / SIGMA_D, x0_fm, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(t[0]), math.pi / 2, abs_tol=1e-5)


def test_black_latent_and_image_folder(parts, tmp_path):
    """sCM data (image_folder → load_image → encode_images): resize, crop, [−1, 1], DC-AE ×
    scaling_factor; black: black_latent."""
    from PIL import Image

    Image.new("RGB", (40, 48), (0, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a black square\n")
    noise = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("noise")
    paths, captions = sana_io.image_folder(tmp_path)
    pixels = torch.stack([sana_io.load_image(path, 32) for path in paths])  # [2, 3, 32, 32]
    latents = sana.encode_images(parts, pixels, 8)
    assert torch.allclose(sana.encode_images(parts, pixels, 1), latents, atol=1e-5)  # per call
    assert captions == ["a black square", "noise"] and latents.shape == (2, 4, 4, 4)
    black = sana.black_latent(parts, 32, 32)
    torch.testing.assert_close(latents[:1], black, rtol=1e-5, atol=1e-5)
    vae = parts.vae
    with torch.no_grad():
        raw = vae.encode(-torch.ones(1, 3, 32, 32)).latent
    torch.testing.assert_close(black, raw * vae.config.scaling_factor)
    images = sana.decode(parts, latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_cached_folder_built_once_and_kept(tmp_path, monkeypatch):
    """cached_folder: built under a temporary name, renamed into place; a folder another process
    renamed into place first is kept; a complete folder is not rebuilt."""
    built = []

    def fake_build(out_dir, rival=None, size="tiny"):
        built.append(out_dir)
        (out_dir / "model_index.json").parent.mkdir(parents=True)
        (out_dir / "model_index.json").write_text("ours")
        if rival is not None:  # another process finishes the same folder while we build
            rival.mkdir()
            (rival / "model_index.json").write_text("theirs")

    monkeypatch.setattr(sana_tiny, "build_pipeline", fake_build)
    final = sana_tiny.cached_folder(tmp_path / "a")
    assert built[0].name.startswith(".tmp-") and (final / "model_index.json").read_text() == "ours"
    assert sana_tiny.cached_folder(tmp_path / "a") == final and len(built) == 1
    name = final.name
    monkeypatch.setattr(
        sana_tiny, "build_pipeline", lambda out, size: fake_build(out, rival=tmp_path / "b" / name)
    )
    final = sana_tiny.cached_folder(tmp_path / "b")
    assert (final / "model_index.json").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "b").iterdir()] == [name]  # no temporary left behind


def test_input_errors_are_one_line(tmp_path):
    """read_prompts, image_folder, load_image: SanaInputError (a ValueError) with one-line text."""
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "x.png").write_bytes(b"not a png")
    for bad in (
        lambda: sana_io.read_prompts(tmp_path / "blank.txt"),
        lambda: sana_io.read_prompts(tmp_path / "nowhere.txt"),
        lambda: sana_io.image_folder(tmp_path / "nowhere"),
        lambda: sana_io.image_folder(tmp_path),  # x.png has no x.txt
        lambda: sana_io.load_image(tmp_path / "x.png", 32),
    ):
        with pytest.raises(sana_io.SanaInputError) as e:
            bad()
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_paper_size_shapes_on_the_meta_device():
    """SIZES["paper"], built on the meta device (no memory): the Sana-Sprint 0.6B transformer
    (591.9 M), Gemma-2-2B (2.61 B, vocabulary 256000) in bf16 from the start (never an fp32 copy),
    the DC-AE f32c32 (312.3 M, encoder 153.0 M) in fp32."""
    with torch.device("meta"):
        m = sana_tiny.build_modules(0, "paper")

    def n(module):
        return sum(p.numel() for p in module.parameters())

    assert n(m["transformer"]) == 591_876_896 and m["transformer"].dtype == torch.bfloat16
    assert n(m["text_encoder"]) == 2_614_341_888 and m["text_encoder"].dtype == torch.bfloat16
    assert m["text_encoder"].config.vocab_size == 256000 and m["vae"].dtype == torch.float32
    assert n(m["vae"]) == 312_250_275 and n(m["vae"].encoder) == 153_027_104
    assert m["transformer"].config.sample_size * 32 == 1024  # latents of 1024 px images
    assert torch.get_default_dtype() == torch.float32  # restored after each module


def test_frozen_bf16_teacher_with_an_fp32_student(tmp_path):
    """--frozen-precision bf16: teacher transformer and Gemma in bf16, the DC-AE in fp32, the
    student fp32 master weights equal to the bf16 teacher's, exactly."""
    argv = ["--backbone", "sana", "--tiny", "--cache-dir", str(tmp_path), "--frozen-precision"]
    T = backbones.SanaTeacher(parse_args([*argv, "bf16", "--out", str(tmp_path / "run")]))
    p = T.parts
    assert p.transformer.dtype == p.text_encoder.dtype == torch.bfloat16
    assert p.vae is None and T.cond(torch.tensor([0]))[0].dtype == torch.bfloat16  # TBCM: no DC-AE
    assert sana.load_vae(p.folder, "cpu").dtype == torch.float32 == T.black.dtype
    student = T.student().transformer
    assert all(q.dtype == torch.float32 for q in student.parameters())
    teacher = p.transformer.state_dict()
    for k, v in student.state_dict().items():
        k = k.replace("time_embed.", "time_embed.emb.") if k not in teacher else k
        if "guidance_embedder" not in k:
            assert torch.equal(v, teacher[k].float()), k
    x = torch.randn(1, *T.data_shape)
    v = T.velocity(x, torch.tensor([0.5]), T.cond(torch.tensor([0])))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_load_sana_holds_its_weights_in_memory_of_their_own(tiny, tmp_path):
    """load_sana(own_memory=True) copies every weight out of the safetensors files: RSS (and so
    bench/cost.py's memory) counts them from the start, as a device's allocator would."""
    folder = shutil.copytree(tiny, tmp_path / "copy")
    parts = sana.load_sana(folder, "cpu", torch.bfloat16, own_memory=True)
    assert str(folder) not in Path("/proc/self/maps").read_text()
    assert parts.transformer.dtype == torch.bfloat16 and parts.vae.dtype == torch.float32


def test_training_holds_only_the_dc_ae_half_it_runs(tiny, tmp_path):
    """load_sana(vae=...): "none" (TBCM) holds no DC-AE, "encoder" (sCM) no decoder; encoding,
    the black latent, decoding and the exported pipeline's DC-AE equal the whole DC-AE's, bit for
    bit, the missing half loaded for the call."""
    whole, enc, none = (sana.load_sana(tiny, "cpu", torch.float32, vae=v) for v in sana.VAE_HELD)
    assert none.vae is None and enc.vae.decoder is None and enc.vae.encoder is not None
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = sana.encode_images(whole, images, 2)
    for p in (enc, none):
        assert torch.equal(sana.encode_images(p, images, 2), want)
        assert torch.equal(sana.black_latent(p, 32, 32), sana.black_latent(whole, 32, 32))
        assert torch.equal(sana.decode(p, want), sana.decode(whole, want))
    assert none.vae is None and enc.vae.decoder is None  # still: loaded per call, then dropped
    for name, p in (("enc", enc), ("none", none)):
        out = sana.export_student(sana.make_student(p.transformer, 1.0), p, tmp_path / name)
        got = sana.load_vae(out, "cpu").state_dict()
        assert all(torch.equal(v, got[k]) for k, v in whole.vae.state_dict().items())
    with pytest.raises(ValueError, match="vae='decoder'"):
        sana.load_sana(tiny, "cpu", torch.float32, vae="decoder")
