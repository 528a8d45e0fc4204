"""FID and CLIP score of a Sana run's exported student and its teacher, from local folders only.

teacher@N: SanaPipeline with the teacher's own scheduler and CFG (paper Tab. 2); student@k: student/
in SanaSprintPipeline at sampler.default_times (App. E). Sample i has prompt i mod P and noise from
seed + i in every sampler; torchmetrics scores the uint8 images that the PNGs hold."""

import json
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import sana
import sana_io
import sana_tiny
from checkpoint import weights_sha256, write_json
from config import Parser, UsageError, ints
from sampler import default_times

LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics")  # versions in eval.json
FLAGS = [  # flag, argparse keywords, help with the default
    ("--run", dict(required=True), "a train.py run directory of --backbone sana (required)"),
    ("--prompts-file", dict(required=True), "held-out prompts, UTF-8, one per line (required)"),
    ("--ref-images", {}, "FID's reference images, at any depth below it (default: no FID)"),
    ("--clip", {}, "a local CLIPModel + CLIPProcessor folder (default: no CLIP score)"),
    ("--fid-weights", {}, "the TorchScript FID Inception, docs/evaluate.md (default: none)"),
    ("--steps", dict(type=ints, within=">= 1"), "the student's step counts (default: 1,2,4)"),
    ("--teacher-steps", dict(type=int, within=">= 0"), "teacher@N's N, 0: none (default: run's)"),
    ("--teacher", {}, "the teacher's SanaPipeline folder (default: the run's, or its tiny one)"),
    ("--n", dict(type=int, within=">= 0"), "samples per sampler (default 0: one per prompt)"),
    ("--batch", dict(type=int, within=">= 1"), "images per pipeline call (default: 4)"),
    ("--precision", dict(choices=("fp32", "bf16")), "transformers, text encoder (default: fp32)"),
    ("--seed", dict(type=int, within="[0, 4294967295]"), "sample i's noise: seed + i (default: 0)"),
    ("--device", {}, "torch device, e.g. cuda (default: cpu)"),
    ("--out", dict(required=True), "a new or empty folder for the PNGs and eval.json (required)"),
]


def parser() -> Parser:
    """evaluate.py's flags (FLAGS)."""
    p = Parser(description=__doc__.splitlines()[0])
    for flag, kw, text in FLAGS:
        p.add_argument(flag, help=text, **kw)
    p.set_defaults(ref_images="", clip="", fid_weights="", teacher="", steps=(1, 2, 4), n=0)
    p.set_defaults(batch=4, precision="fp32", seed=0, device="cpu")
    return p


def reason(e: Exception) -> str:
    """An exception's last line (TorchScript's says what failed), for a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def read_run(run: Path) -> tuple[dict, int]:
    """A train.py run directory → (its config.json, the training step of its exported student)."""
    if not (run / "config.json").is_file():
        raise UsageError(f"--run {run}: no config.json; pass a train.py run directory")
    cfg = json.loads((run / "config.json").read_text())
    if cfg.get("backbone") != "sana":  # toy runs: metrics.json holds their distances
        raise UsageError(f"--run {run}: a {cfg.get('backbone')} run; evaluate.py takes sana runs")
    if not all((run / f).is_file() for f in ("student/model_index.json", "metrics.json")):
        raise UsageError(f"--run {run}: no student/ or metrics.json (train.py's last writes)")
    return cfg, json.loads((run / "metrics.json").read_text())["train"]["steps"]


class CLIPFeatures(nn.Module):
    """CLIPModel's projected embeddings as tensors, which torchmetrics 1.9's CLIPScore expects
    (transformers 5 returns them in `pooler_output`: Lightning-AI/torchmetrics#3407)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.model.get_text_features(input_ids, attention_mask).pooler_output


def clip_metric(folder: str, device: str) -> nn.Module:
    """torchmetrics' CLIPScore on a local CLIP folder: max(mean over samples of 100·cos(E_image,
    E_prompt), 0), the embeddings of CLIPProcessor's preprocessing of the uint8 images."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not Path(folder).is_dir():
        raise UsageError(f"--clip {folder}: no such folder")
    try:  # local_files_only: nothing is downloaded
        with sana_io.quiet_loading():
            model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UsageError(f"--clip {folder}: no CLIPModel and CLIPProcessor ({reason(e)})") from e
    return CLIPScore(model_name_or_path=lambda: (CLIPFeatures(model), processor)).to(device)


class Inception(nn.Module):
    """NVIDIA's TorchScript FID Inception (StyleGAN2-ADA's and clean-fid's inception-2015-12-05.pt)
    as FID takes a feature network: uint8 images [B, 3, H, W] → pool features [B, 2048]."""

    def __init__(self, path: str):
        super().__init__()
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
            self.net = torch.jit.load(path, map_location="cpu")  # torch 2.13 deprecates jit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, return_features=True)


def fid_metric(weights: str, net: nn.Module | None, resolution: int, device: str) -> nn.Module:
    """torchmetrics' FrechetInceptionDistance, ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) of the
    features of uint8 images: `net`'s, or those of the TorchScript Inception in file `weights`."""
    from torchmetrics.image.fid import FrechetInceptionDistance as FID

    name = f"--fid-weights {weights}" if net is None else type(net).__name__
    try:  # FID finds the feature size from one uint8 image of this size
        net = Inception(weights) if net is None else net
        fid = FID(net, reset_real_features=False, input_img_size=(3, resolution, resolution))
    except Exception as e:  # not TorchScript (docs/evaluate.md), or weights of other shapes
        raise UsageError(f"{name}: no features of {resolution} px images ({reason(e)})") from e
    return fid.to(device)


def sprint_times(k: int, t_mid: float) -> dict:
    """SanaSprintPipeline's arguments whose SCMScheduler times are default_times(k, t_mid)."""
    t = default_times(k, t_mid)  # SCMScheduler: [t[0], t_mid, 0] for k = 2, else linspace
    return dict(num_inference_steps=k, max_timesteps=t[0], intermediate_timesteps={2: t_mid}.get(k))


def load_pipelines(run: Path, teacher: str, dtype: torch.dtype, device: str) -> list:
    """[SanaSprintPipeline of run/student, SanaPipeline of the teacher folder or ""]; the teacher
    shares the student folder's text encoder and DC-AE, which are its own (sana.export_student)."""
    from diffusers import SanaPipeline, SanaSprintPipeline

    kw = dict(dtype={"transformer": dtype, "text_encoder": dtype}, local_files_only=True)
    with sana_io.quiet_loading(), sana.malformed(run / "student"):
        student = SanaSprintPipeline.from_pretrained(run / "student", **kw)
    kw |= dict(tokenizer=student.tokenizer, text_encoder=student.text_encoder, vae=student.vae)
    folder = teacher and sana_io.check_folder(teacher)
    with sana_io.quiet_loading(), sana.malformed(Path(teacher)):
        pipe = folder and SanaPipeline.from_pretrained(folder, **kw)
    return [p and p.to(device) for p in (student, pipe)]


def prepare(a, fid_net: nn.Module | None) -> tuple:
    """Every input checked and loaded before anything is written → (samplers: name → (pipeline,
    its call's arguments), the conditions that change the numbers, CLIPScore, FID, the prompts)."""
    run, out, fid_on = Path(a.run), Path(a.out), bool(a.fid_weights) or fid_net is not None
    cfg, step = read_run(run)
    prompts = sana_io.read_prompts(a.prompts_file)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: not empty; pass a new or empty folder")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device} but CUDA is not available; use --device cpu")
    n, res, kinds = a.n or len(prompts), cfg["resolution"], sana_io.IMAGE_SUFFIXES
    found = Path(a.ref_images).rglob("*") if a.ref_images else ()  # MJHQ-30k: a folder a category
    refs = sorted(p for p in found if p.suffix.lower() in kinds)
    if (fid_on or a.ref_images) and not (fid_on and min(n, len(refs)) >= 2):
        got = f"{len(refs)} in --ref-images {a.ref_images or '(none)'}, --n {n}"
        raise UsageError(f"FID needs --fid-weights, 2 or more reference images and samples ({got})")
    clip = clip_metric(a.clip, a.device) if a.clip else None
    fid = fid_metric(a.fid_weights, fid_net, res, a.device) if fid_on else None
    N = cfg["eval_teacher_steps"] if a.teacher_steps is None else a.teacher_steps
    teacher = (a.teacher or cfg["pretrained"]) if N else ""
    if N and not teacher:  # a --tiny run's teacher: its random pipeline, built offline if absent
        teacher = str(sana_tiny.cached_folder(cfg["cache_dir"]))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.precision]
    student, teacher_pipe = load_pipelines(run, teacher, dtype, a.device)
    for i in tqdm(range(0, len(refs), a.batch), "reference images", disable=not refs):
        try:  # FID's real statistics: each image as sana_io.load_image crops it
            x = torch.stack([sana_io.load_image(p, res) for p in refs[i : i + a.batch]])
        except sana_io.SanaInputError as e:
            raise UsageError(f"--ref-images {e}") from e
        fid.update(((x + 1) * 127.5).round().to(torch.uint8).to(a.device), real=True)
    w, t_mid, L = cfg["eval_w"], cfg["t_mid"], cfg["max_sequence_length"]  # as the run evaluated
    L = L or (sana_tiny.TINY_MAX_SEQUENCE_LENGTH if cfg["tiny"] else sana.MAX_SEQUENCE_LENGTH)
    plain = {"complex_human_instruction": None} if cfg["plain_prompts"] else {}  # as the run
    call = dict(height=res, width=res, guidance_scale=w, max_sequence_length=L, output_type="pt")
    call |= dict(use_resolution_binning=False, **plain)
    samplers = {"teacher@N": (teacher_pipe, call | dict(num_inference_steps=N))} if N else {}
    samplers |= {f"student@{k}": (student, call | sprint_times(k, t_mid)) for k in a.steps}
    conditions = dict(precision=a.precision, resolution=res, n=n, seed=a.seed, checkpoint_step=step)
    conditions |= dict(w=w, t_mid=t_mid, prompts_file=a.prompts_file, ref_images=a.ref_images)
    conditions |= dict(n_ref=len(refs), clip=a.clip, fid_weights=a.fid_weights, teacher=teacher)
    conditions |= dict(fid_net=fid_net and type(fid_net).__name__, device=a.device)
    conditions["student_sha256"] = weights_sha256(student.transformer)
    conditions["versions"] = {m: version(m) for m in LIBRARIES}
    return samplers, conditions, clip, fid, prompts


def sample(name: str, pipe, call: dict, prompts: list[str], a, clip, fid) -> dict:
    """One sampler: samples 0 … n − 1 to <out>/<name>/<i>.png and scored → its eval.json entry."""
    from PIL import Image

    n, folder, wall_s = a.n or len(prompts), Path(a.out) / name, 0.0
    folder.mkdir(parents=True)
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(range(0, n, a.batch), name):
        idx = range(i, min(i + a.batch, n))
        batch = [prompts[j % len(prompts)] for j in idx]
        gens = [torch.Generator(a.device).manual_seed(a.seed + j) for j in idx]
        t0 = time.perf_counter()
        with torch.no_grad():
            images = pipe(prompt=batch, generator=gens, **call).images
        if a.device.startswith("cuda"):
            torch.cuda.synchronize(a.device)  # the device's time, not the launch's
        wall_s += time.perf_counter() - t0
        # [0, 1] → uint8, rounded as diffusers' numpy_to_pil rounds for the PNGs
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        for j, image in zip(idx, images, strict=True):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{j:05d}.png")
        if clip is not None:
            clip.update(list(images.to(a.device)), batch)
        if fid is not None:
            fid.update(images.to(a.device), real=False)
    got = dict(steps=call["num_inference_steps"], solver=type(pipe.scheduler).__name__)
    for key, m in (("clip_score", clip), ("fid", fid)):
        got[key] = None if m is None else {"value": float(m.compute()), "n": n}
    for m in (m for m in (clip, fid) if m is not None):
        m.reset()  # FID keeps the reference statistics (reset_real_features=False)
    shown = [f"{k} {v['value']:.3f} (n {v['n']})" for k, v in got.items() if isinstance(v, dict)]
    print(f"  {name:10s}  {'  '.join(shown)}  {wall_s:.1f} s")
    return got | dict(wall_s=wall_s)


def main(argv: list[str] | None = None, fid_net: nn.Module | None = None) -> int:
    """parse → check and load every input → sample and score each sampler → eval.json. Exit 0;
    2: bad input, nothing written. fid_net: a feature network for FID instead of --fid-weights."""
    try:
        a = parser().parse_args(argv)
        samplers, conditions, clip, fid, prompts = prepare(a, fid_net)
    except (UsageError, sana_io.SanaInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {k: sample(k, p, call, prompts, a, clip, fid) for k, (p, call) in samplers.items()}
    write_json(Path(a.out) / "eval.json", dict(run=a.run, conditions=conditions, samplers=results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: nothing is downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
