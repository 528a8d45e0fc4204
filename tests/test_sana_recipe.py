"""The `sana` preset as the official TBCM recipe (configs/600M_1024px_tbcm.yaml, paper Sec. 5), the
teacher read from its config JSONs before anything loads, TF32 on CUDA only, and the student's
cross-attention policy (fp32 core: matmul under forward AD, fused SDPA otherwise) on the tiny
pipeline (CPU)."""

import json
from functools import partial

import pytest
import torch

import backbones
import config
import runtime
import sana
import sana_io
import sana_tiny
import train
from loss import scm_target
from pairs import PairPool, TBCMPairs
from trigflow import SIGMA_D, TrigFlow

pytestmark = pytest.mark.usefixtures("one_thread")

# The official config's values (reference facts §2–3), with --pretrained on CUDA.
OFFICIAL = dict(
    method="tbcm",
    scheme="reference",
    N=16,
    shift=2.5,
    prompts=1,  # per GPU
    K=1,
    pool_steps=1,
    cfg_scales=(4.0, 4.5, 5.0),
    guidance_scale=0.1,
    H=4000,
    S_r=15000,
    T_r=2000,
    r_final=0.75,
    c=0.1,
    sigma_d=0.5,
    lr=1e-5,
    optimizer="came",  # CAMEWrapper
    grad_clip=0.1,
    steps=20000,
    filter_mode="soft",
    filter_threshold=1.0,
    ema_decay=0.0,  # no EMA
    t_mid=1.0,
    resolution=1024,
    precision="bf16",
    frozen_precision="bf16",
    grad_checkpointing=True,
    tiny=False,
)


def configs_only(folder, size: str = "paper", **transformer) -> str:
    """A SanaPipeline folder holding only the config JSONs of sana_tiny's `size` shapes (paper:
    the Sana-Sprint 0.6B teacher's), transformer keys overridden; no weights."""
    with torch.device("meta"):
        modules = sana_tiny.build_modules(0, size)
    for sub in sana_io.SUBFOLDERS:
        (folder / sub).mkdir(parents=True)
    for sub in ("transformer", "vae", "scheduler"):
        modules[sub].save_config(folder / sub)
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | transformer))
    (folder / "model_index.json").write_text("{}")
    return str(folder)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return configs_only(tmp_path_factory.mktemp("sprint") / "teacher")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The --cache-dir holding the tiny pipeline, built once."""
    cache = tmp_path_factory.mktemp("cache")
    sana_tiny.cached_folder(cache)
    return str(cache)


def test_preset_is_the_official_recipe(teacher_dir):
    """`--backbone sana --pretrained DIR --prompts-file P --device cuda` is the official config;
    on CPU the same but fp32 (bf16 autocast and bf16 frozen parts are the CUDA case)."""
    argv = ["--backbone", "sana", "--pretrained", teacher_dir, "--prompts-file", "p.txt"]
    cuda = config.parse_args([*argv, "--device", "cuda"])
    assert {k: getattr(cuda, k) for k in OFFICIAL} == OFFICIAL
    cpu = config.parse_args(argv)
    want = OFFICIAL | dict(precision="fp32", frozen_precision="fp32")
    assert {k: getattr(cpu, k) for k in OFFICIAL} == want


def test_resolution_is_the_teachers_own(teacher_dir, cache, tmp_path):
    """transformer sample_size × 2^(DC-AE stages − 1), as SanaPipeline's default height: 1024 for
    the Sana-Sprint 0.6B shapes, 64 for the tiny pipeline (its --tiny preset), 512 at sample_size
    16; a folder without configs gives None (check_input then names the fault)."""
    assert sana_io.own_resolution(teacher_dir) == 1024
    tiny = sana_tiny.cached_folder(cache)
    assert sana_io.own_resolution(tiny) == config.SANA_CASES["--tiny"]["resolution"][0] == 64
    half = configs_only(tmp_path / "half", sample_size=16)
    assert config.parse_args(["--backbone", "sana", "--pretrained", half]).resolution == 512
    assert sana_io.own_resolution(tmp_path / "nowhere") is None


def test_a_flag_wins_over_the_preset(teacher_dir):
    """Every preset value, the CUDA and teacher-dependent ones included, yields to its flag."""
    argv = ["--backbone", "sana", "--pretrained", teacher_dir, "--device", "cuda"]
    argv += ["--precision", "fp32", "--frozen-precision", "fp32", "--no-grad-checkpointing"]
    cfg = config.parse_args([*argv, "--resolution", "512", "--steps", "7", "--N", "8"])
    assert (cfg.precision, cfg.frozen_precision, cfg.grad_checkpointing) == ("fp32", "fp32", False)
    assert (cfg.resolution, cfg.steps, cfg.N) == (512, 7, 8)


def test_help_shows_every_case():
    """--help names each sana case's values with their sources."""
    helps = {a.dest: a.help.replace("%%", "%") for a in config.parser()._actions if a.help}
    assert "sana: the teacher's own (" in helps["resolution"]
    assert "sana --tiny: 64 (" in helps["resolution"] and "sana --tiny: 20 (" in helps["steps"]
    assert "sana --device cuda: bf16 (TBCM code" in helps["precision"]
    assert "sana --device cuda: bf16 (" in helps["frozen_precision"]
    assert "sana: True (TBCM code)" in helps["grad_checkpointing"]


@pytest.mark.parametrize(
    "transformer, says",
    [(dict(timestep_scale=1.0), "timestep 1000·s"), (dict(guidance_embeds=True), "guidance")],
)
def test_wrong_teacher_refused_before_loading(transformer, says, tmp_path, monkeypatch, capsys):
    """A stock Sana (timestep_scale 1: it sees 1000·s) or a distilled student: one line, exit 2,
    read from transformer/config.json before any weights load (text encoder, DC-AE, transformer);
    the line says why and names the Sana-Sprint teacher to fetch."""
    folder = configs_only(tmp_path / "teacher", **transformer)
    (tmp_path / "p.txt").write_text("a cat\n")
    monkeypatch.setattr(sana, "load_sana", lambda *a, **k: pytest.fail("weights loaded"))
    argv = ["--backbone", "sana", "--pretrained", folder, "--prompts-file", str(tmp_path / "p.txt")]
    assert train.main([*argv, "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --pretrained"), lines
    assert says in lines[0] and sana_io.TEACHER_REPO in lines[0]
    assert not (tmp_path / "run").exists()


def test_backbone_sana_alone_is_a_tiny_smoke_run(cache, tmp_path, capsys):
    """`--backbone sana` without --pretrained or --tiny: the tiny random pipeline with its built-in
    prompts, a 20-step smoke run, said in the first printed line; end to end with a few steps."""
    cfg = config.parse_args(["--backbone", "sana"])
    assert (cfg.tiny, cfg.steps, cfg.resolution, cfg.precision) == (True, 20, 64, "fp32")
    assert (cfg.N, cfg.lr, cfg.grad_checkpointing) == (16, 1e-5, True)  # the recipe otherwise
    out = tmp_path / "run"
    argv = ["--backbone", "sana", "--steps", "2", "--N", "4", "--n-eval", "4"]
    argv += ["--eval-teacher-steps", "4", "--cache-dir", cache, "--out", str(out)]
    assert train.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("sana: the tiny random pipeline") and "4 built-in prompts" in first
    assert "a 2-step smoke run" in first and "--pretrained DIR" in first
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 2


def test_tf32_on_cuda_only():
    """TF32 for fp32 matmuls and convolutions is decided by the device alone: CUDA yes, CPU no;
    allowing it on CPU leaves torch's setting as it is, on CUDA sets "high" and cuDNN's flag."""
    assert runtime.tf32_allowed("cuda") and runtime.tf32_allowed("cuda:3")
    assert not runtime.tf32_allowed("cpu") and not runtime.tf32_allowed("meta")
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with runtime.autocast("cpu", "fp32"):
            pass
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.allow_tf32
        runtime.allow_tf32("cuda")  # the flags exist without a GPU
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        with runtime.ieee_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.fixture(scope="module")
def pairs(cache):
    """28 TBCM pairs of the tiny pipeline and the student's F(x, t) with their prompts and w."""
    argv = ["--backbone", "sana", "--cache-dir", cache, "--N", "8", "--prompts", "2", "--K", "2"]
    cfg = config.parse_args(argv)
    teacher = backbones.build(cfg)
    student, source = teacher.student(), TBCMPairs(cfg, teacher)
    b = PairPool(source, cfg, range(cfg.prompts), 0).next(28)
    F = partial(TrigFlow(student, guidance_scale=0.1), cond=source.cond(b["prompt"]), w=b["w"])
    return student, F, b


def test_cross_attention_policy(pairs, monkeypatch):
    """The student's cross-attention core is fp32 in every pass (TF32 off inside), computed by
    the matmul under forward AD (the JVP), by SDPA in the gradient pass and evaluation. F_θ then
    equals the JVP's F⁻ at θ = θ⁻ to fp32 round-off (≤ 1e-6 of ‖F⁻‖); under bf16 autocast it
    differs from F⁻ no more than with the matmul in both passes, and diffusers' stock bf16 SDPA
    processor in the gradient pass would differ by more (sana.CrossAttnProcessor: 8.0% vs 5.7% of
    ‖g‖)."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    student, F, b = pairs
    blocks = [m.attn2 for m in student.modules() if getattr(m, "attn2", None) is not None]
    assert all(type(a.processor) is sana.CrossAttnProcessor for a in blocks)
    seen, core, sdpa = (
        [],
        sana.MatmulAttnProcessor.core,
        torch.nn.functional.scaled_dot_product_attention,
    )

    def matmul(self, *a):
        seen.append(("matmul", torch.get_float32_matmul_precision()))
        return core(self, *a)

    def fused(*a, **k):
        seen.append(("sdpa", torch.get_float32_matmul_precision()))
        return sdpa(*a, **k)

    monkeypatch.setattr(sana.MatmulAttnProcessor, "core", matmul)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fused)
    x, t, dxdt = b["x_t"], b["t"], b["dxdt"]
    norm = lambda z: torch.linalg.vector_norm(z.flatten(1).float(), dim=1)  # noqa: E731

    def mismatch(jvp_proc, grad_proc, precision):
        """‖F_θ − F⁻‖ / ‖g‖ per pair, with these processors in the JVP and the gradient pass."""
        with runtime.autocast("cpu", precision):
            for a in blocks:
                a.set_processor(jvp_proc())
            F_minus, g, _ = scm_target(F, x, t, dxdt, r=1.0, sigma_d=SIGMA_D, c=0.1)
            for a in blocks:
                a.set_processor(grad_proc())
            F_theta = F(x / SIGMA_D, t)
        return norm(F_theta.detach() - F_minus) / norm(g), norm(F_minus) / norm(g)

    try:
        torch.set_float32_matmul_precision("high")
        ours, scale = mismatch(sana.CrossAttnProcessor, sana.CrossAttnProcessor, "fp32")
        assert seen == [("matmul", "highest")] * 2 + [("sdpa", "highest")] * 2
        with torch.no_grad():  # evaluation
            F(x / SIGMA_D, t)
        assert seen[4:] == [("sdpa", "highest")] * 2
    finally:
        torch.set_float32_matmul_precision("highest")
    assert (ours / scale).max() <= 1e-6
    bf16 = {
        name: mismatch(*procs, "bf16")[0].mean()
        for name, procs in {
            "ours": (sana.CrossAttnProcessor, sana.CrossAttnProcessor),
            "matmul": (sana.MatmulAttnProcessor, sana.MatmulAttnProcessor),
            "stock": (sana.MatmulAttnProcessor, SanaAttnProcessor2_0),
        }.items()
    }
    assert bf16["ours"] <= 1.01 * bf16["matmul"] and bf16["stock"] > 1.2 * bf16["matmul"]
