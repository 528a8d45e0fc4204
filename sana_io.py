"""Sana user input, where bad input becomes a one-line SanaInputError naming the flag as the command
line spells it: the SanaPipeline folder and what its config JSONs say (the teacher's own resolution,
Sana-Sprint's time feed), the prompts file, images with same-name captions, image loading
(Sana-Sprint preprocessing), quiet loading of diffusers / transformers folders."""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
TEACHER_REPO = "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_teacher_diffusers"
LAYOUT = (
    "expected a local SanaPipeline folder (model_index.json + transformer/ text_encoder/ "
    "tokenizer/ vae/ scheduler/), e.g. the Sana-Sprint teacher from the Hugging Face hub: "
    f"`huggingface-cli download {TEACHER_REPO} --local-dir DIR`"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# --tiny without --prompts-file: a few prompts so that a smoke run needs no file at all.
TINY_PROMPTS = (
    "a red apple on a white table",
    "a blue car in the rain",
    "a black cat asleep",
    "a field of yellow flowers",
)


class SanaInputError(ValueError):
    """Missing or malformed Sana input (folder, prompts, images); the message is one line."""


def check_folder(folder: str | Path) -> Path:
    """diffusers SanaPipeline layout: model_index.json + five subfolders, else SanaInputError."""
    folder = Path(folder)
    missing = [f"{sub}/" for sub in SUBFOLDERS if not (folder / sub).is_dir()]
    missing += [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    if missing:
        raise SanaInputError(f"{folder}: missing {' '.join(missing)}; {LAYOUT}")
    return folder


def config_json(folder: str | Path, sub: str) -> dict | None:
    """`folder/sub/config.json` (scheduler: scheduler_config.json) as a dict, None if unreadable;
    read without loading any weights."""
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    try:
        return json.loads((Path(folder) / sub / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def own_resolution(folder: str | Path) -> int | None:
    """SanaPipeline's default image side: transformer sample_size × vae_scale_factor, which
    diffusers sets to 2^(len(vae.config.encoder_block_out_channels) − 1); absent keys take the
    classes' defaults (sample_size 32; AutoencoderDC's 6 stages). None if a config is unreadable."""
    tr, vae = config_json(folder, "transformer"), config_json(folder, "vae")
    if tr is None or vae is None:
        return None
    stages = len(vae.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024)))
    return int(tr.get("sample_size", 32)) * 2 ** (stages - 1)


def check_sprint_teacher(folder: str | Path) -> None:
    """Sana-Sprint's time feed, read from the configs before anything loads: SanaPipeline feeds
    num_train_timesteps × timestep_scale × s, which must be s (sana.make_student refuses it too)."""
    tr, sched = config_json(folder, "transformer"), config_json(folder, "scheduler") or {}
    if tr is None:
        raise SanaInputError(f"{folder}: no readable transformer/config.json; {LAYOUT}")
    n, ts = sched.get("num_train_timesteps", 1000), tr.get("timestep_scale", 1.0)
    if not math.isclose(n * ts, 1.0):
        raise SanaInputError(
            f"--pretrained {folder}: its transformer sees timestep {n * ts:g}·s (timestep_scale "
            f"{ts:g} × {n} train timesteps), a stock Sana; TBCM starts from a Sana-Sprint teacher, "
            "which sees s itself (its dense time embedding keeps the JVP stable): fetch "
            f"{TEACHER_REPO} beforehand (`huggingface-cli download {TEACHER_REPO} --local-dir DIR`)"
        )
    if tr.get("guidance_embeds"):
        raise SanaInputError(
            f"--pretrained {folder}: the transformer has a guidance embedding (a distilled "
            f"student?); start from the teacher's SanaPipeline folder, e.g. {TEACHER_REPO}"
        )


def read_prompts(path: str | Path) -> list[str]:
    """TBCM official code: a UTF-8 .txt file, one prompt per line; blank lines are skipped."""
    fix = "pass a UTF-8 text file with one prompt per line"
    path = Path(path)
    if not path.is_file():
        raise SanaInputError(f"--prompts-file {path}: no such file; {fix}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is not part of the first prompt
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:  # NUL is valid UTF-8 but never in a text file
        raise SanaInputError(f"--prompts-file {path}: binary or not UTF-8; {fix}")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SanaInputError(f"--prompts-file {path}: no prompts (only blank lines); {fix}")
    return prompts


def image_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Sana-Sprint data layout: images with a same-name UTF-8 .txt caption → (paths, captions)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SanaInputError(f"{folder}: no such folder of images with same-name .txt captions")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SanaInputError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}) with .txt captions")
    captions = []
    for path in paths:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise SanaInputError(f"{path}: no caption file {caption.name} beside it")
        try:
            captions.append(caption.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as e:
            raise SanaInputError(f"{caption}: not UTF-8 text; save the caption as UTF-8") from e
    return paths, captions


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Sana-Sprint preprocessing: shorter side → resolution (bicubic), crop, [−1, 1] [3, H, W]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise SanaInputError(f"{path}: cannot read the image ({type(e).__name__})") from e
    scale = resolution / min(image.size)
    w = max(resolution, round(image.width * scale))
    h = max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8
    return x.float() / 127.5 - 1


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


def check_input(cfg: Any) -> tuple[list[str], list[Path], list[str]]:
    """train.py's sana flags (cfg duck-typed: pretrained, tiny, resolution, max_sequence_length,
    method, images, prompts_file) → (prompts, image paths, captions); nothing is loaded."""
    if bool(cfg.pretrained) == bool(cfg.tiny):
        raise SanaInputError(
            "--backbone sana takes one of --pretrained DIR (a local SanaPipeline folder) or "
            "--tiny (a tiny random pipeline, which is what no --pretrained means), not both"
        )
    if cfg.resolution <= 0 or cfg.resolution % 32:  # SanaSprintPipeline.check_inputs
        raise SanaInputError(f"--resolution {cfg.resolution}: must be a positive multiple of 32")
    if cfg.max_sequence_length < 0:
        raise SanaInputError("--max-sequence-length must be >= 0 (0: 300, or 16 with --tiny)")
    if cfg.method == "scm" and not cfg.images:
        raise SanaInputError(
            "--method scm on sana needs --images DIR (images with same-name .txt "
            "captions); --method tbcm needs prompts only"
        )
    if cfg.method == "tbcm" and cfg.images:
        raise SanaInputError("--images is for --method scm; --method tbcm needs prompts only")
    if cfg.prompts_file:
        prompts = read_prompts(cfg.prompts_file)  # SanaInputError, message as it is
    elif cfg.method == "scm":
        prompts = []  # the captions are the prompts
    elif cfg.tiny:
        prompts = list(TINY_PROMPTS)
    else:
        raise SanaInputError(
            "--backbone sana needs --prompts-file F (UTF-8 text, one prompt per line)"
        )
    if cfg.pretrained:  # SanaInputError, message as it is; before Gemma or the DC-AE load
        check_folder(cfg.pretrained)
        check_sprint_teacher(cfg.pretrained)
    try:
        paths, captions = image_folder(cfg.images) if cfg.images else ([], [])
    except ValueError as e:  # SanaInputError included
        raise SanaInputError(f"--images {e}") from e
    return prompts, paths, captions
