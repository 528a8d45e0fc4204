"""train.py --backbone sana end to end on a tiny random pipeline (CPU): run directory, exported
SanaSprintPipeline, the sCM baseline on an image folder, bf16, resume, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import backbones
import config
import sana
import sana_io
import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog"]
CAPTIONS = ["a red cat", "a green tree", "noise"]  # the first is also in the prompts file
FAST = [
    "--backbone",
    "sana",
    "--tiny",
    "--N",
    "4",
    "--n-eval",
    "4",
    "--eval-teacher-steps",
    "4",
    "--resolution",
    "64",
    "--log-every",
    "1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prompts file (with a blank line) and an image folder with same-name .txt captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n", encoding="utf-8")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 64), (48, 72)]
    for i, (caption, size) in enumerate(zip(CAPTIONS, sizes, strict=True)):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return {
        "prompts": str(root / "prompts.txt"),
        "images": str(images),
        "root": root,
        "cache": str(root / "cache"),
    }  # the tiny pipeline is built once, here


def run(args: list[str], files, tmp_path) -> int:
    return train.main(
        [*FAST, "--cache-dir", files["cache"], "--prompts-file", files["prompts"], *args]
    )


def test_tbcm_run_directory_and_sprint_student(files, tmp_path):
    """train.py's run directory on sana: metrics.json schema (paired_mse_to_teacher, finite),
    samples.png, and a student/ folder that SanaSprintPipeline.from_pretrained loads and samples in
    one step."""
    from diffusers import SanaSprintPipeline

    out = tmp_path / "run"
    assert run(["--steps", "4", "--out", str(out)], files, tmp_path) == 0
    for name in ("config.json", "metrics.json", "samples.png", "training.png", "log.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert not list(out.glob("**/model_index.json"))[1:]  # only student/ holds a pipeline
    assert [p.name.startswith("sana-tiny-") for p in Path(files["cache"]).iterdir()] == [True]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"] == "sana" and m["method"] == "tbcm" and m["train"]["steps"] == 4
    assert m["train"]["nan_skipped"] == 0
    ev = m["eval"]
    assert ev["distance_name"] == "paired_mse_to_teacher" and ev["data"] == {"distance": 0.0}
    for k in ("teacher@N", "student@1", "student@2", "student@4"):
        assert set(ev[k]) == {"distance", "alignment", "nfe", "samples_per_s"}
        assert all(math.isfinite(v) for v in ev[k].values()), ev[k]
        assert -1 <= ev[k]["alignment"] <= 1 + 1e-6 and ev[k]["distance"] >= 0
    assert ev["teacher@N"]["distance"] == 0 and ev["teacher@N"]["alignment"] == pytest.approx(1)
    assert ev["teacher@N"]["nfe"] == 8 and ev["student@1"]["nfe"] == 1

    pipe = SanaSprintPipeline.from_pretrained(out / "student")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds
    image = pipe(
        prompt=PROMPTS[0],
        num_inference_steps=1,
        intermediate_timesteps=None,
        height=64,
        width=64,
        use_resolution_binning=False,
        max_sequence_length=16,
        complex_human_instruction=None,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


@pytest.fixture(scope="module")
def scm_bb(files):
    """The sCM backbone: prompts file + image folder."""
    cfg = config.parse_args(
        [
            *FAST,
            "--method",
            "scm",
            "--images",
            files["images"],
            "--prompts-file",
            files["prompts"],
            "--cache-dir",
            files["cache"],
        ]
    )
    return backbones.build(cfg)


def test_backbone_prompts_cond_and_real_data(scm_bb, files):
    """Captions join the prompt table; cond encodes each prompt once (cached, = encode_prompts);
    real_data VAE-encodes on every call and returns each image's latent with its caption's index."""
    bb = scm_bb
    assert bb.prompt_names == [*PROMPTS, *CAPTIONS[1:]]
    assert bb.data_shape == (4, 8, 8) and bb.black.shape == (1, 4, 8, 8)

    calls = []
    hook = bb.parts.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    embeds, mask = bb.cond(torch.tensor([1, 3, 1, 1]))
    assert len(calls) == 2 and embeds.shape == (4, 16, 32) and mask.shape == (4, 16)
    bb.cond(torch.tensor([3, 1]))
    hook.remove()
    assert len(calls) == 2  # cached
    ref = sana.encode_prompts(bb.parts, [bb.prompt_names[3]], 16, instruction=True)
    torch.testing.assert_close(embeds[1:2], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(mask[1:2], ref[1], rtol=0, atol=0)

    encodes, encode = [], bb.parts.vae.encode
    bb.parts.vae.encode = lambda x: encodes.append(len(x)) or encode(x)
    try:
        gen = torch.Generator().manual_seed(0)
        x0, prompt = bb.real_data(5, gen)
        bb.real_data(5, gen)
    finally:
        del bb.parts.vae.encode
    assert sum(encodes) == 10  # no latent cache: the cost sCM pays every step
    paths, captions = sana_io.image_folder(files["images"])
    latents = sana.encode_images(
        bb.parts, torch.stack([sana_io.load_image(p, 64) for p in paths]), 8
    )
    assert x0.shape == (5, 4, 8, 8) and prompt.dtype == torch.long
    for x, p in zip(x0, prompt.tolist(), strict=True):
        torch.testing.assert_close(
            x, latents[captions.index(bb.prompt_names[p])], rtol=1e-4, atol=1e-5
        )


def test_backbone_evaluate_and_images(scm_bb):
    """evaluate: MSE and mean per-sample cosine to the teacher's samples; to_images: [−1, 1]."""
    bb = scm_bb
    ref = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert bb.evaluate(ref, None, ref) == {"distance": 0.0, "alignment": pytest.approx(1)}
    other = -2 * ref
    r = bb.evaluate(other, None, ref)
    assert r["distance"] == pytest.approx(float((9 * ref**2).mean()))
    assert r["alignment"] == pytest.approx(-1)
    images = bb.to_images(ref)
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, 2 * sana.decode(bb.parts, ref) - 1)


def test_scm_on_image_folder(files, tmp_path):
    """--method scm --images DIR runs end to end."""
    out = tmp_path / "run"
    assert (
        run(
            ["--method", "scm", "--images", files["images"], "--steps", "2", "--out", str(out)],
            files,
            tmp_path,
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "scm" and math.isfinite(m["eval"]["student@1"]["distance"])


def test_bf16_autocast(files, tmp_path):
    """--precision bf16: autocast passes (teacher rollout, JVP, student) run and stay finite."""
    out = tmp_path / "run"
    assert run(["--precision", "bf16", "--steps", "2", "--out", str(out)], files, tmp_path) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["nan_skipped"] == 0
    logs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logs)


def test_resume_is_bit_identical(files, tmp_path):
    """2 steps, then --resume to 3 == 3 steps uninterrupted: same student, EMA, optimiser (CPU)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["--steps", "3", "--ckpt-every", "2", "--out", str(a)], files, tmp_path) == 0
    assert run(["--steps", "2", "--ckpt-every", "2", "--out", str(b)], files, tmp_path) == 0
    assert (
        run(["--steps", "3", "--ckpt-every", "2", "--out", str(b), "--resume"], files, tmp_path)
        == 0
    )
    ta = load_file(a / "checkpoints" / "step-0000003" / "tensors.safetensors")
    tb = load_file(b / "checkpoints" / "step-0000003" / "tensors.safetensors")
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    strip = [
        [
            {k: v for k, v in json.loads(ln).items() if k != "wall_s"}
            for ln in (d / "log.jsonl").read_text().splitlines()
        ]
        for d in (a, b)
    ]
    assert strip[0] == strip[1]


@pytest.mark.parametrize(
    "case",
    [
        "pretrained_missing",
        "pretrained_no_transformer",
        "prompts_missing",
        "prompts_empty",
        "prompts_binary",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, files, tmp_path):
    """train.py's bad-input contract: exit 2, one line `error: …` (saying what to pass), no run
    directory."""
    root = files["root"]
    no_tr = tmp_path / "no_transformer"  # a SanaPipeline layout without transformer/
    for sub in ("text_encoder", "tokenizer", "vae", "scheduler"):
        (no_tr / sub).mkdir(parents=True)
    (no_tr / "model_index.json").write_text("{}")
    (root / "empty.txt").write_text("\n  \n\n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    args = {
        "pretrained_missing": [
            "--pretrained",
            str(tmp_path / "nowhere"),
            "--prompts-file",
            files["prompts"],
        ],
        "pretrained_no_transformer": [
            "--pretrained",
            str(no_tr),
            "--prompts-file",
            files["prompts"],
        ],
        "prompts_missing": ["--tiny", "--prompts-file", str(root / "missing.txt")],
        "prompts_empty": ["--tiny", "--prompts-file", str(root / "empty.txt")],
        "prompts_binary": ["--tiny", "--prompts-file", str(root / "binary.txt")],
    }[case]
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    p = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--backbone",
            "sana",
            *args,
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert ("--pretrained" in args) == ("SanaPipeline folder" in lines[0])
    assert ("--tiny" in args) == ("one prompt per line" in lines[0])
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--tiny", "--pretrained", "somewhere"],
        ["--tiny", "--method", "scm"],  # no --images
        ["--tiny", "--method", "scm", "--images", "/nonexistent/images"],
        ["--tiny", "--resolution", "48"],
    ],
)
def test_more_bad_input(args, tmp_path, capsys):
    """The same contract in-process for the other sana flags."""
    out = tmp_path / "run"
    assert (
        train.main(
            ["--backbone", "sana", *args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
        )
        == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), lines
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_torchrun_two_processes_match_one(files, tmp_path, torchrun):
    """Data parallel on the tiny pipeline: 2 gloo ranks (one prompt each) draw the pairs of one
    process with the same global batch (2 prompts) and average the same gradient: step 0's gradient
    norm agrees up to summation order, the weights after 3 AdamW steps to within half the learning
    rate (coordinates whose gradient is near zero move by up to lr on rounding noise). CFG
    w ∈ {4, 4.5, 5} keeps the loss away from zero."""
    args = [
        "--steps",
        "3",
        "--prompts",
        "2",
        "--K",
        "1",
        "--pool-steps",
        "1",
        "--filter-mode",
        "off",
        "--ema-decay",
        "0.9",
    ]  # an EMA that lags, so "it trained" is visible
    one, two = tmp_path / "one", tmp_path / "two"
    assert run([*args, "--out", str(one)], files, tmp_path) == 0
    files_ = ["--cache-dir", files["cache"], "--prompts-file", files["prompts"]]
    p = torchrun(["train.py", *FAST, *files_, *args, "--out", str(two)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(one / "checkpoints" / "step-0000003" / "tensors.safetensors")
    b = load_file(two / "checkpoints" / "step-0000003" / "tensors.safetensors")
    moved = [k for k in a if k.startswith("student/") and not torch.equal(a[k], a["ema/" + k[8:]])]
    assert moved  # the student trained
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert diff < 0.5 * 1e-5  # the sana preset's lr
    g1, g2 = (
        [json.loads(ln)["grad_norm"] for ln in (d / "log.jsonl").read_text().splitlines()]
        for d in (one, two)
    )
    assert g1[0] == pytest.approx(g2[0], rel=1e-6) and g1 == pytest.approx(g2, rel=1e-4)
    assert json.loads((two / "metrics.json").read_text())["train"]["processes"] == 2


def test_gradient_checkpointing_changes_nothing(files, tmp_path):
    """--grad-checkpointing recomputes activations in the gradient pass only: the same student after
    2 steps."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["--steps", "2", "--out", str(a), "--no-grad-checkpointing"], files, tmp_path) == 0
    assert run(["--steps", "2", "--out", str(b), "--grad-checkpointing"], files, tmp_path) == 0
    ta = load_file(a / "checkpoints" / "step-0000002" / "tensors.safetensors")
    tb = load_file(b / "checkpoints" / "step-0000002" / "tensors.safetensors")
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta if k.startswith("student/")) < 1e-6
