"""evaluate.py offline: FID against the Fréchet distance of metrics.py, CLIP score against a direct
call of the CLIP model, the student's schedules against sampler.default_times, bad input, and a
tiny Sana run end to end (a random CLIP folder and a random feature network, nothing downloaded)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evaluate
import train
from metrics import frechet_distance
from sampler import default_times

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog", "a green tree"]


class FeatureNet(nn.Module):
    """A small random feature network: uint8 images [B, 3, H, W] → features [B, 16]."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(in_channels, 8, 3, 2), nn.Linear(32, 16)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.conv(x.float() / 255).tanh(), 2)
        return self.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class InceptionLike(FeatureNet):
    """FeatureNet called as NVIDIA's Inception is: its features only with return_features=True,
    other numbers (logits) without."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = self.features(x)
        return f if return_features else f.flip(1) ** 2


def images(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """n random uint8 images [n, 3, side, side] with a smooth part, so that CLIP and FID vary."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g).repeat_interleave(side // 4, -1)
    base = base.repeat_interleave(side // 4, -2)
    return (255 * (0.7 * base + 0.3 * torch.rand(n, 3, side, side, generator=g))).to(torch.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP folder built offline: CLIPModel from a small CLIPConfig, a CLIPTokenizer
    from a letters-only vocabulary, CLIPImageProcessor at 32 px, all by save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab |= {c: len(vocab), c + "</w>": len(vocab) + 1}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    crop = dict(height=32, width=32)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = small | dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=small | dict(image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(root / "clip")
    return str(root / "clip")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Sana run (tests/test_sana_train.py's pattern), a prompts file, reference images in
    two subfolders, a TorchScript feature network and one whose first layer takes 1 channel."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    for i, image in enumerate(images(6, 1, side=64)):
        (root / "refs" / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "refs" / f"part{i % 2}/{i}.png")
    for name, net in (("inception.pt", InceptionLike()), ("gray.pt", InceptionLike(1))):
        torch.jit.script(net).save(str(root / name))
    args = "--backbone sana --tiny --steps 2 --N 4 --n-eval 4 --eval-teacher-steps 4".split()
    assert train.main([*args, "--cache-dir", str(root / "cache"), "--out", str(root / "run")]) == 0
    names = dict(run="run", prompts="prompts.txt", refs="refs", inception="inception.pt")
    return {k: str(root / v) for k, v in (names | dict(gray="gray.pt")).items()}


def test_fid_is_the_frechet_distance_zero_against_itself_and_grows_with_a_shift():
    """torchmetrics' FID through fid_metric = metrics.frechet_distance of the net's features;
    a set against itself is 0 (≤ 1e-6), and FID grows with a brightness shift of the images."""
    net, x = FeatureNet(), images(40, 0)
    fid = evaluate.fid_metric("", net, 32, "cpu")
    fid.update(x, real=True)
    got = []
    for shift in (0, 8, 24, 64):
        fid.update((x.int() + shift).clamp(0, 255).to(torch.uint8), real=False)
        got.append(float(fid.compute()))
        fid.reset()  # the real statistics stay
    assert abs(got[0]) <= 1e-6 and all(a < b for a, b in zip(got, got[1:], strict=False))
    y = (x.int() + 24).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        expected = frechet_distance(net(x).double(), net(y).double())
    assert got[2] == pytest.approx(expected, rel=1e-6)


def test_fid_weights_load_a_torchscript_inception_with_return_features(files):
    """--fid-weights FILE: a TorchScript Inception-like network, called with return_features=True,
    gives the FID of its features network given as a module."""
    x, y = images(12, 2), images(12, 3)
    values = []
    scripted = evaluate.fid_metric(files["inception"], None, 32, "cpu")
    for fid in (scripted, evaluate.fid_metric("", FeatureNet(), 32, "cpu")):
        fid.update(x, real=True)
        fid.update(y, real=False)
        values.append(float(fid.compute()))
    assert values[0] == pytest.approx(values[1], rel=1e-9) and values[0] > 0


def test_clip_score_is_a_direct_call_of_the_model(clip_dir):
    """CLIPScore on the local folder = max(100·mean cos(E_image, E_prompt), 0) from CLIPModel's
    projected embeddings of the processor's inputs (torchmetrics clips the mean at 0)."""
    from transformers import CLIPModel, CLIPProcessor

    x = images(3, 4)
    clip = evaluate.clip_metric(clip_dir, "cpu")
    clip.update(list(x), PROMPTS)
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        e_i = model.get_image_features(
            **processor(images=list(x), return_tensors="pt")
        ).pooler_output
        text = processor(text=PROMPTS, return_tensors="pt", padding=True)
        e_t = model.get_text_features(**text).pooler_output
    mean = 100 * float(nn.functional.cosine_similarity(e_i, e_t).mean())
    assert float(clip.score / clip.n_samples) == pytest.approx(mean, rel=1e-5)  # before the clip
    assert float(clip.compute()) == pytest.approx(max(mean, 0), abs=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sprint_schedule_is_the_samplers(k):
    """App. E: SCMScheduler's times for sprint_times(k, t_mid) are default_times(k, t_mid)."""
    from diffusers import SCMScheduler

    scheduler = SCMScheduler()
    scheduler.set_timesteps(**evaluate.sprint_times(k, 1.0))
    np.testing.assert_allclose(scheduler.timesteps.numpy(), default_times(k, 1.0), atol=1e-7)


def bad_cases(files: dict, tmp) -> dict[str, list[str]]:
    """Name → the flags of a bad input (besides --out)."""
    (tmp / "no_student").mkdir(parents=True)
    (tmp / "no_student" / "config.json").write_text(json.dumps({"backbone": "sana"}))
    (tmp / "toy").mkdir()
    (tmp / "toy" / "config.json").write_text(json.dumps({"backbone": "digits"}))
    (tmp / "empty").mkdir()
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp / "state_dict.pth")
    good = ["--run", files["run"], "--prompts-file", files["prompts"]]
    fid = ["--ref-images", files["refs"], "--fid-weights", files["inception"]]
    return {
        "no run": ["--run", str(tmp / "nothing"), "--prompts-file", files["prompts"]],
        "no student": ["--run", str(tmp / "no_student"), "--prompts-file", files["prompts"]],
        "a toy run": ["--run", str(tmp / "toy"), "--prompts-file", files["prompts"]],
        "no prompts": ["--run", files["run"], "--prompts-file", str(tmp / "none.txt")],
        "no clip folder": [*good, "--clip", str(tmp / "nothing")],
        "no image folder": [*good, "--ref-images", str(tmp / "nothing"), "--fid-weights", "x"],
        "no images": [*good, "--ref-images", str(tmp / "empty"), *fid[2:]],
        "refs without weights": [*good, "--ref-images", files["refs"]],
        "weights of another shape": [*good, *fid[:3], files["gray"]],
        "a state dict": [*good, *fid[:3], str(tmp / "state_dict.pth")],
        "no such weights": [*good, *fid[:3], str(tmp / "no.pt")],
        "one sample": [*good, *fid, "--n", "1"],
        "steps 0": [*good, "--steps", "1,0"],
        "an abbreviation": [*good, "--prec", "bf16"],
        "no teacher folder": [*good, "--teacher", str(tmp / "nothing")],
    }


def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, tmp_path, capsys):
    """Each bad input: exit status 2, one line `error: …`, no --out folder."""
    for name, args in bad_cases(files, tmp_path / "cases").items():
        out = tmp_path / name.replace(" ", "_")
        assert evaluate.main([*args, "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert not out.exists(), name


def test_help_names_every_flag_and_its_default(capsys):
    """--help: every flag with a help text that gives its default (or says it is required)."""
    with pytest.raises(SystemExit):
        evaluate.parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    for flag, _, text in evaluate.FLAGS:
        assert flag in shown and ("(default" in text or "(required)" in text), flag


def test_tiny_sana_run_end_to_end(files, clip_dir, tmp_path):
    """`python evaluate.py` on a tiny Sana run's student and teacher@N → PNGs and eval.json with
    CLIP score and FID (each with its n) per sampler and the conditions; in-process with a feature
    module and --batch 1, the same student@1 images up to round-off."""
    out = tmp_path / "eval"
    args = ["--run", files["run"], "--prompts-file", files["prompts"], "--n", "4"]
    fid = ["--ref-images", files["refs"], "--fid-weights", files["inception"]]
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *args, *fid, "--clip", clip_dir]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    e = json.loads((out / "eval.json").read_text())
    c = e["conditions"]
    assert (c["precision"], c["resolution"], c["n"], c["seed"]) == ("fp32", 64, 4, 0)
    assert c["checkpoint_step"] == 2 and c["n_ref"] == 6 and len(c["student_sha256"]) == 64
    assert c["fid_weights"] == files["inception"] and c["clip"] == clip_dir
    assert list(e["samplers"]) == ["teacher@N", "student@1", "student@2", "student@4"]
    for name, r in e["samplers"].items():
        assert r["steps"] == (4 if name == "teacher@N" else int(name[-1]))
        assert r["clip_score"]["n"] == r["fid"]["n"] == 4
        assert 0 <= r["clip_score"]["value"] <= 100 and math.isfinite(r["fid"]["value"])
        assert sorted(p.name for p in (out / name).iterdir()) == [f"0000{i}.png" for i in range(4)]
    assert e["samplers"]["student@1"]["solver"] == "SCMScheduler"
    again = tmp_path / "again"
    more = ["--teacher-steps", "0", "--steps", "1", "--batch", "1", "--out", str(again)]
    assert evaluate.main([*args, *fid[:2], *more], fid_net=FeatureNet()) == 0
    e = json.loads((again / "eval.json").read_text())
    assert list(e["samplers"]) == ["student@1"] and e["conditions"]["fid_net"] == "FeatureNet"
    for i in range(4):  # the noise is per sample: batching moves a pixel by round-off at most
        a, b = (np.array(Image.open(d / "student@1" / f"0000{i}.png"), int) for d in (out, again))
        assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999
