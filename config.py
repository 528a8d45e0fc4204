"""Every knob of a run in one frozen `Config`, the backbone presets, and the command line.

A field's comment is its provenance (paper, official code, Sana-Sprint or ours) and its --help
text, with its default and each preset's value. Flags are the field names (`N` → `--N`), never
abbreviated. Over 250 lines: one or two lines per field and per preset value, each with its source.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

import checkpoint
import parallel
import sana_io


class UsageError(ValueError):
    """Bad input: printed as one line `error: …`, exit status 2, nothing written."""


@dataclass(frozen=True)
class Config:
    """Every knob of a run; defaults are the bundled digits run, PRESETS adapt them per backbone."""

    backbone: Literal["digits", "toy2d", "cifar10", "sana"] = "digits"  # digits: bundled with
    # scikit-learn; toy2d: a 2-D ring; cifar10: --data-dir; sana: --pretrained DIR or --tiny
    method: Literal["tbcm", "scm"] = "tbcm"  # tbcm: pairs from the teacher's trajectories (Eq. 9);
    # scm: the sCM / Sana-Sprint baseline, forward-diffused real data
    scheme: Literal["reference", "logit_normal", "random"] = "reference"  # route times (Sec. 4.2,
    # Fig. 7); the reference route is the best in paper Tab. 4
    N: int = 16  # route length, N − 1 pairs per trajectory (paper Tab. 5; official code: 16)
    shift: float = 2.5  # reference-route shift (official code: Sana's flow-Euler schedule)
    P_mean: float = 0.2  # logit-normal times, log(σ_d tan t) ~ N(P_mean, P_std²), of scm and of
    # --scheme logit_normal (Sana-Sprint; paper Sec. 5.2)
    P_std: float = 1.6  # see --P-mean (Sana-Sprint; paper Sec. 5.2)
    prompts: int = 4  # prompts per optimiser step, over all processes (official code: 1 per GPU)
    K: int = 2  # trajectories per prompt: one text encoding for K rollouts (paper Sec. 4.1)
    pool_steps: int = 8  # ours: roll this many steps' pairs out at once and shuffle them across the
    # steps (1: the official code)
    cfg_scales: tuple[float, ...] = (1.5, 2.0, 2.5)  # teacher CFG scales w, one drawn per
    # trajectory (Sana-Sprint: 4,4.5,5)
    eval_w: float = 2.0  # CFG scale of the teacher and guidance input of the student at evaluation
    guidance_scale: float = 0.1  # the student's guidance embedding sees guidance_scale·w
    # (Sana-Sprint)
    H: int = 400  # r warm-up steps (Alg. 1; Sana-Sprint and TBCM code: 4000 of 20000)
    S_r: int = 1400  # r cool-down start (Alg. 1; TBCM code: 15000)
    T_r: int = 300  # r cool-down length (Alg. 1; TBCM code: 2000)
    r_final: float = 0.75  # r after the cool-down (paper Tab. 6)
    r_direct: bool = False  # warm r up straight to r_final, no cool-down (paper Tab. 7's other arm)
    c: float = 0.1  # tangent normalisation g/(‖g‖ + c) (sCM, Sana-Sprint)
    t_min: float = 0.01  # ours: the prior weight 1/(σ_d tan t) uses max(t, t_min), so that no pair
    # weighs more than about 200 times the average
    sigma_d: float = 0.5  # σ_d, the data std in TrigFlow units (sCM, Sana-Sprint)
    filter_mode: Literal["soft", "hard", "off"] = "soft"  # brightness filter (Sec. 4.3): soft drops
    # with probability 1 − mse/threshold (official code), hard keeps mse ≥ threshold (paper text)
    filter_threshold: float = 0.1  # the filter's MSE threshold to the black latent (digits: a
    # near-empty digit; official code: 1.0 on Sana)
    lr: float = 3e-5  # learning rate of --optimizer, not rescaled (digits, AdamW: 1e-4 and 3e-4
    # drift, 1e-5 is slow; TBCM code: CAME at 1e-5)
    grad_clip: float = 1.0  # gradient norm clip, inf: no clipping (TBCM code: 0.1 on Sana)
    optimizer: Literal["adamw", "came"] = "adamw"  # AdamW, or CAME with the official betas and eps
    # (Sana-Sprint and TBCM configs: CAMEWrapper; optimizers.py)
    ema_decay: float = 0.999  # EMA of the student, the evaluated weights (0: the raw student)
    steps: int = 2000  # optimiser steps (paper: 20000)
    jvp: Literal["jvp", "fd"] = "jvp"  # tangent dF⁻/dt by torch.func.jvp, or by a central finite
    # difference (fd) for networks forward AD cannot pass through
    fd_eps: float = 1e-3  # step of the finite-difference tangent (its error is O(fd_eps²))
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast around network passes; master
    # weights and optimiser stay fp32 (on CUDA, fp32 matmuls and convolutions run in TF32)
    n_eval: int = 2000  # samples per evaluated sampler
    eval_teacher_steps: int = 16  # teacher@N: flow-Euler steps on the reference route, with CFG
    t_mid: float = 0.6  # middle time of 2-step sampling (digits: 0.6 best of 0.6–1.4; TBCM: 1.0)
    eval_batch: int = 2000  # samples per sampler call at evaluation
    log_every: int = 25  # steps between lines of log.jsonl
    sample_every: int = 0  # steps between grids of the evaluated student's 1- and 2-step samples
    # on fixed prompts and noise, samples/step-NNNNNNN.png (0: none)
    tensorboard: bool = False  # log.jsonl's statistics, lr and the sample grids to TensorBoard in
    # tb/ (needs the tensorboard package)
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    max_bad_steps: int = 20  # NaN/Inf steps in a row before the run stops (exit 1)
    seed: int = 0  # seed of every random stream (pairs, initialisation, evaluation noise)
    device: str = "cpu"  # torch device, e.g. cuda (under torchrun each rank takes cuda:LOCAL_RANK)
    accum_steps: int = 1  # ours: micro-batches per optimiser step, its pairs split across them and
    # their gradients added up (the paper's 480 pairs per step on fewer GPUs: docs/parallel.md)
    shard: Literal["none", "fsdp"] = "none"  # under torchrun, none: each process holds the whole
    # student (DDP); fsdp: FSDP2 shards its weights, gradients and optimiser state over them
    threads: int = 1  # intra-op CPU threads, 0: torch's default (one per core); tiny toy nets run
    # fastest on one and stall when threads compete for cores
    out: str = ""  # the run directory (default: runs/<backbone>-<method>)
    cache_dir: str = "runs"  # toy teachers, metric classifiers and tiny pipelines are cached here
    teacher_steps: int = 0  # toy teachers: flow-matching steps (0: toy_teacher.TEACHERS)
    data_dir: str = ""  # cifar10: the folder cifar-10-batches-py (nothing is downloaded)
    pretrained: str = ""  # sana: a local diffusers folder in SanaPipeline layout (without it:
    # the tiny random pipeline, as --tiny)
    prompts_file: str = ""  # sana: UTF-8 text, one prompt per line (--tiny: 4 built-in prompts)
    images: str = ""  # sana --method scm: images with same-name .txt captions
    tiny: bool = False  # sana: a tiny random pipeline with random weights, built offline, for
    # smoke runs; what --backbone sana without --pretrained runs
    resolution: int = 64  # sana: image side in pixels
    grad_checkpointing: bool = False  # sana: recompute activations in the gradient pass (the JVP
    # runs under no_grad, where diffusers skips checkpointing; --no-grad-checkpointing: off)
    max_sequence_length: int = 0  # sana: text tokens per prompt (0: 300 as SanaPipeline; --tiny 16)
    plain_prompts: bool = False  # sana: encode prompts without the complex human instruction
    # prefix that SanaPipeline, SanaSprintPipeline and the TBCM code put before every prompt
    frozen_precision: Literal["fp32", "bf16"] = "fp32"  # sana: dtype of the frozen teacher and
    # text encoder (bf16 as the released checkpoints; the student is always fp32)
    vae_batch: int = 8  # sana: images per DC-AE call (sCM's real images, decoding); sCM's peak
    # memory grows with it (bench/cost.py)
    student: Literal["full", "lora"] = "full"  # full: a trainable copy of the teacher (paper);
    # lora (ours): the teacher's own module plus a LoRA adapter (peft), one copy of the weights
    lora_rank: int = 16  # --student lora: the adapter's rank R
    lora_alpha: float = 0.0  # --student lora: LoRA alpha, the update is scaled by alpha/R (0: R)
    lora_targets: str = ""  # --student lora: comma-separated module-name suffixes to adapt (toy
    # default: every Linear and Conv2d outside the guidance embedding; sana: to_q,to_k,to_v,to_out.0
    # as diffusers' Sana LoRA scripts)
    lora_lr: float = 0.0  # --student lora: the adapter's AdamW learning rate; the guidance
    # embedding and the logvar head keep --lr (0: --lr for all)
    bank: str = ""  # train from an offline bank of pairs (bank.py build): no teacher, text encoder
    # or VAE while training
    resume: bool = False  # continue the run in --out from its latest checkpoint
    overwrite: bool = False  # replace the run in --out


TOY2D, SMALL = "ours: chosen on toy2d", "ours: a CPU-sized run"
OWN = "the teacher's own"  # sana's --resolution, read from --pretrained's configs (sana_case)
PRESETS: dict[str, dict[str, tuple[Any, str]]] = {  # field → (value, where it comes from)
    "toy2d": {
        "N": (8, TOY2D),
        "shift": (1.0, TOY2D),
        "prompts": (8, TOY2D),
        "K": (4, TOY2D),
        "cfg_scales": ((1.0,), "ours: the plain conditional teacher"),
        "eval_w": (1.0, "ours: the plain conditional teacher"),
        "filter_mode": ("off", "ours: a point has no black image"),
        "P_mean": (-0.4, TOY2D),
        "steps": (1500, TOY2D),
        "H": (300, TOY2D),
        "S_r": (1000, TOY2D),
        "T_r": (200, TOY2D),
        "lr": (2e-4, TOY2D),
        "n_eval": (4000, TOY2D),
    },
    "cifar10": {
        "prompts": (2, SMALL),
        "K": (2, SMALL),
        "pool_steps": (4, SMALL),
        "steps": (500, SMALL),
        "n_eval": (500, SMALL),
        "filter_threshold": (0.05, "ours: a near-black CIFAR image"),
    },
    "sana": {
        "N": (16, "official code"),
        "shift": (2.5, "official code"),
        "prompts": (1, "official code: 1 per GPU; under torchrun 1 per process"),
        "K": (1, "official code"),
        "pool_steps": (1, "official code"),
        "cfg_scales": ((4.0, 4.5, 5.0), "Sana-Sprint"),
        "eval_w": (4.5, "Sana-Sprint"),
        "H": (4000, "TBCM code"),
        "S_r": (15000, "TBCM code"),
        "T_r": (2000, "TBCM code"),
        "r_final": (0.75, "paper Tab. 6"),
        "lr": (1e-5, "TBCM code"),
        "grad_clip": (0.1, "TBCM code"),
        "optimizer": ("came", "TBCM and Sana-Sprint configs: CAMEWrapper"),
        "steps": (20000, "paper Tab. 3"),
        "filter_threshold": (1.0, "official code"),
        "n_eval": (16, "ours: a short evaluation"),
        "eval_teacher_steps": (20, "Sana, paper Tab. 2"),
        "t_mid": (1.0, "TBCM code"),
        "ema_decay": (0.0, "TBCM code: no EMA"),
        "eval_batch": (4, "ours: memory"),
        "threads": (0, "torch's default"),
        "resolution": (OWN, "sample_size × DC-AE scale, as SanaPipeline; Sana-Sprint 0.6B: 1024"),
        "grad_checkpointing": (True, "TBCM code"),
    },
}
# sana's preset by case, over PRESETS["sana"] (a flag still wins): on CUDA, the official bf16;
# the tiny pipeline (--tiny, or no --pretrained) at its own size, a smoke run.
SANA_CASES: dict[str, dict[str, tuple[Any, str]]] = {
    "--device cuda": {
        "precision": ("bf16", "TBCM code: bf16 mixed precision"),
        "frozen_precision": ("bf16", "the released teacher's and Gemma-2's dtype"),
    },
    "--shard fsdp": {
        "optimizer": ("adamw", "ours: CAME's factored moments take no FSDP2 shards (optimizers.py)")
    },
    "--tiny": {
        "resolution": (64, "the tiny pipeline's own: 8 × 8 latents, DC-AE f8"),
        "steps": (20, "ours: a smoke run of the tiny pipeline, seconds on a CPU"),
    },
}

# --bank: the fields that define the pairs come from the bank's manifest (a flag contradicting one
# is an error), those saying where the teacher is unless given. BANK_VERSION: the manifest schema.
PAIR_FIELDS = tuple(
    "backbone scheme N shift P_mean P_std prompts K pool_steps cfg_scales sigma_d tiny resolution "
    "max_sequence_length plain_prompts frozen_precision teacher_steps".split()
)
SOURCE_FIELDS = ("pretrained", "prompts_file", "cache_dir", "data_dir")
BANK_VERSION = 2  # 2: plain_prompts and frozen_precision define the pairs


def flag(name: str) -> str:
    """A field's flag as the parser spells it: `N` → `--N`, `P_mean` → `--P-mean`."""
    return "--" + name.replace("_", "-")


def show(v: Any) -> str:
    """A value as it is typed on the command line (tuples comma-separated)."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def field_help() -> dict[str, str]:
    """Each field's comment in the source of Config: on its line, then the comment lines below."""
    out, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"\s*(\w+): [^#]+#\s*(.*)", line)
        if field:
            name = field[1]
            out[name] = field[2]
        elif name and line.strip().startswith("#"):
            out[name] += " " + line.strip().lstrip("# ")
        else:
            name = None
    return out


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations, whose errors raise UsageError (one line, exit 2). Every
    float flag refuses nan and ±inf (`type=float` is `finite`); `within=` names the range (as in
    RANGES) that a flag's value, or each of its values, must lie in."""

    def __init__(self, **kw: Any):
        self.ranges: dict[str, tuple[str, str]] = {}  # dest → (flag, range)
        super().__init__(allow_abbrev=False, **kw)

    def add_argument(self, *args: Any, within: str = "", **kw: Any) -> argparse.Action:
        """argparse's, with `finite` for `float` and the range `within` checked after parsing."""
        if kw.get("type") is float:
            kw["type"] = finite
        action = super().add_argument(*args, **kw)
        if within:
            self.ranges[action.dest] = ((action.option_strings or [action.dest])[0], within)
        return action

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        a, rest = super().parse_known_args(args, namespace)
        for dest, (name, spec) in self.ranges.items():
            if getattr(a, dest, None) is not None and not holds(spec, getattr(a, dest)):
                self.error(must(name, spec))
        return a, rest

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)

    def parse_before_dashes(self, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
        """This parser's flags before `--`; what follows it (train.py's flags) is returned as is."""
        cut = argv.index("--") if "--" in argv else len(argv)
        return self.parse_args(argv[:cut]), argv[cut + 1 :]


def finite(s: str, inf: bool = False) -> float:
    """A float flag's value: a finite number (with inf: or +inf, where it means no limit)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (math.isfinite(v) or (inf and v == math.inf)):
        raise argparse.ArgumentTypeError(f"{s} is not a finite number" + " or inf" * inf)
    return v


def floats(s: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers, e.g. 1.5,2,2.5."""
    return tuple(finite(v) for v in s.split(","))


def ints(s: str) -> tuple[int, ...]:
    """A comma-separated list of integers, e.g. 8,12,16."""
    return tuple(int(v) for v in s.split(","))


def parser() -> Parser:
    """train.py's flags, one per Config field, with its provenance, default and preset values."""
    p = Parser(
        description="Distil a flow-matching teacher into a 1–4 step student with TBCM "
        "(the paper's Alg. 1) or the sCM baseline."
    )
    hints, helps = typing.get_type_hints(Config), field_help()
    cases = [(f"sana {case}", pr) for case, pr in SANA_CASES.items()]
    for f in fields(Config):
        kind, name = hints[f.name], flag(f.name)
        presets = [
            f"{b}: {show(v[0])} ({v[1]})"
            for b, pr in [*PRESETS.items(), *cases]
            if (v := pr.get(f.name)) and (v[0] != f.default or b.startswith("sana "))
        ]
        text = "; ".join([f"{helps[f.name]} (default: {show(f.default)}", *presets]) + ")"
        text = text.replace("%", "%%")
        if kind is bool:  # --no-<flag> where a preset turns it on
            on = any(pr.get(f.name, (False,))[0] for pr in PRESETS.values())
            action = argparse.BooleanOptionalAction if on else "store_true"
            p.add_argument(name, action=action, default=None, help=text)
        elif typing.get_origin(kind) is Literal:
            p.add_argument(name, choices=typing.get_args(kind), default=None, help=text)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(name, type=floats, default=None, metavar="W1,W2,...", help=text)
        else:  # float: nan and ±inf refused (+inf kept where RANGES allows it: no limit)
            number = partial(finite, inf=holds(RANGES[f.name], math.inf)) if kind is float else kind
            p.add_argument(name, type=number, default=None, help=text)
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line → Config: the flags given, then the backbone's PRESETS, then defaults."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    if given.get("bank"):
        given = from_bank(given)
    backbone = given.get("backbone", Config.backbone)
    preset = values(PRESETS.get(backbone, {}))
    preset |= sana_case(given) if backbone == "sana" else {}
    cfg = Config(**preset | given)
    return cfg if cfg.out else dataclasses.replace(cfg, out=f"runs/{cfg.backbone}-{cfg.method}")


def sana_case(given: dict) -> dict:
    """PRESETS["sana"]'s values that depend on the flags (SANA_CASES): the tiny pipeline without
    --pretrained; else the teacher's own resolution from its configs (if unreadable, the default:
    sana_io.check_input then names what is wrong); one prompt per process; AdamW under FSDP2; bf16
    on CUDA."""
    if given.get("tiny") or not given.get("pretrained"):
        case = {"tiny": True} | values(SANA_CASES["--tiny"])
    else:
        case = {"resolution": sana_io.own_resolution(given["pretrained"]) or Config.resolution}
    cuda = given.get("device", Config.device).startswith("cuda")
    case |= {"prompts": parallel.ranks()[2]}  # the official code's one prompt per GPU
    case |= values(SANA_CASES["--shard fsdp"]) if given.get("shard") == "fsdp" else {}
    return case | (values(SANA_CASES["--device cuda"]) if cuda else {})


def values(preset: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """A preset's values without their sources."""
    return {k: v for k, (v, _) in preset.items()}


def read_bank_manifest(bank: str | Path) -> dict:
    """A bank's manifest.json (bank.py), checked for presence, JSON and schema version."""
    path, build = Path(bank) / "manifest.json", f"`python bank.py build --out {bank}`"
    if not path.is_file():
        raise UsageError(f"--bank {bank}: no manifest.json (build one with {build})")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--bank {bank}: manifest.json is not valid JSON ({e})") from e
    if m.get("version") != BANK_VERSION:
        raise UsageError(
            f"--bank {bank}: bank version {m.get('version')}, this code reads {BANK_VERSION}"
        )
    return m


def from_bank(given: dict) -> dict:
    """`--bank`: the pair-defining fields from the manifest (a flag contradicting one is an error),
    and where the teacher's weights are, unless given."""
    stored = read_bank_manifest(given["bank"])["config"]
    pairs = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    for k in PAIR_FIELDS:
        if k in given and given[k] != pairs[k]:
            raise UsageError(
                f"{flag(k)} {show(given[k])} contradicts the bank's {show(pairs[k])} "
                f"({given['bank']}); drop the flag or build another bank"
            )
    return {**{k: pairs[k] for k in SOURCE_FIELDS}, **given, **{k: pairs[k] for k in PAIR_FIELDS}}


RANGES = {  # field → the range its value (each value of a tuple) must lie in, as `holds` reads it
    name: spec
    for spec, names in {
        ">= 2": "N n_eval",
        ">= 1": "prompts K pool_steps steps eval_teacher_steps eval_batch log_every ckpt_every "
        "max_bad_steps resolution vae_batch lora_rank accum_steps",
        ">= 0": "cfg_scales eval_w guidance_scale H S_r T_r teacher_steps threads "
        "max_sequence_length lora_alpha lora_lr sample_every",
        "> 0": "shift P_std c sigma_d filter_threshold lr fd_eps",
        "(0, inf]": "grad_clip",  # inf: no clipping (clip_grad_norm_ scales by min(1, inf/‖g‖))
        "finite": "P_mean",
        "[0, 1]": "r_final",
        "[0, 1)": "ema_decay",
        "[0, π/2)": "t_min",
        "(0, π/2)": "t_mid",
        "[0, 4294967295]": "seed",  # numpy's and scikit-learn's seeds (t-SNE in analysis/)
    }.items()
    for name in names.split()
}


def holds(spec: str, v: Any) -> bool:
    """v (or each value of a tuple or list) lies in `spec`: ">= a" is [a, inf), "> a" (a, inf),
    "finite" (-inf, inf), or an interval such as "[0, π/2)"; nan lies in none."""
    if isinstance(v, (tuple, list)):
        return all(holds(spec, x) for x in v)
    op, _, a = spec.partition(" ")
    spec = {">=": f"[{a}, inf)", ">": f"({a}, inf)", "finite": "(-inf, inf)"}.get(op, spec)
    lo, hi = (math.pi / 2 if end == "π/2" else float(end) for end in spec[1:-1].split(", "))
    above = lo <= v if spec[0] == "[" else lo < v
    return above and (v <= hi if spec[-1] == "]" else v < hi)


def must(name: str, spec: str) -> str:
    """The message for a value out of range: `--lr must be > 0`, `--t-mid must be in (0, π/2)`."""
    return f"{name} must be {'in ' * (spec[0] in '[(')}{spec}"


def parallel_problems(c: Config) -> list[str]:
    """What torchrun's process count (WORLD_SIZE) and --device, --prompts, --accum-steps, --shard
    cannot do together."""
    f, world = flag, parallel.ranks()[2]
    try:
        parallel.rank_device(c.device, 0, world)
    except ValueError as e:
        return [str(e)]
    bad = [f"{f('prompts')} {c.prompts} must be a multiple of the {world} processes"] * bool(
        c.prompts % world
    )
    pairs = c.prompts // world * c.K * (c.N - 1)  # per process and step
    if c.accum_steps > pairs and not bad:
        bad.append(f"{f('accum_steps')} {c.accum_steps} exceeds the {pairs} pairs per process")
    if c.shard == "fsdp":
        if world < 2:
            bad.append(f"{f('shard')} fsdp shards over processes: start 2 or more with torchrun")
        if c.student == "lora":
            bad.append(f"{f('shard')} fsdp shards a full student; drop {f('student')} lora")
        if c.optimizer == "came":
            keep = "keeps whole-matrix moments; use adamw with"
            bad.append(f"{f('optimizer')} came {keep} {f('shard')} fsdp")
        if c.sample_every:
            bad.append(f"{f('sample_every')} draws on rank 0 alone; drop it with {f('shard')} fsdp")
    return bad


def validate(cfg: Config, run_dir: bool = True) -> None:
    """Ranges, flag combinations and (run_dir) the run directory, before anything is built."""
    f, c = flag, cfg
    bad = [must(f(k), spec) for k, spec in RANGES.items() if not holds(spec, getattr(c, k))]
    bad += [f"{f('resume')} and {f('overwrite')} exclude each other"] * (c.resume and c.overwrite)
    sana_only = "pretrained prompts_file images tiny grad_checkpointing plain_prompts".split()
    if c.backbone != "sana" and any(getattr(c, k) for k in sana_only):
        bad.append(", ".join(map(f, sana_only)) + f" are for {f('backbone')} sana")
    if c.backbone != "sana" and (c.frozen_precision, c.vae_batch) != ("fp32", Config.vae_batch):
        bad.append(f"{f('frozen_precision')} and {f('vae_batch')} are for {f('backbone')} sana")
    if c.backbone == "cifar10" and not c.data_dir:
        bad.append(
            f"cifar10 needs {f('data_dir')} path/to/cifar-10-batches-py (from "
            "https://www.cs.toronto.edu/~kriz/cifar.html; nothing is downloaded)"
        )
    lora = (c.lora_rank, c.lora_alpha, c.lora_targets, c.lora_lr) != (16, 0.0, "", 0.0)
    if c.student != "lora" and lora:
        flags = ", ".join(f(k) for k in ("lora_rank", "lora_alpha", "lora_targets"))
        bad.append(f"{flags} and {f('lora_lr')} need {f('student')} lora")
    if c.student == "lora" and c.frozen_precision == "bf16" and c.precision != "bf16":
        bad.append(
            f"{f('student')} lora on a bf16 base ({f('frozen_precision')} bf16) needs "
            f"{f('precision')} bf16: autocast mixes the bf16 base and the fp32 adapter"
        )
    if c.bank and c.method != "tbcm":
        bad.append(f"{f('bank')} holds TBCM trajectory pairs; drop {f('method')} scm")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        bad.append(f"{f('device')} {c.device} but CUDA is not available; use {f('device')} cpu")
    bad += parallel_problems(c)
    run = Path(c.out)
    if run_dir and c.resume and not checkpoint.latest(run / "checkpoints"):
        bad.append(f"{f('resume')}: no complete checkpoint under {run}/checkpoints")
    if run_dir and (run / "config.json").exists() and not (c.resume or c.overwrite):
        bad.append(
            f"{run} already holds a run; pass {f('resume')} to continue it, "
            f"{f('overwrite')} to replace it, or {f('out')} for a new one"
        )
    if bad:
        raise UsageError(bad[0])
