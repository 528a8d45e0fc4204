"""Every number on a command line is finite and in range: each bad value of a table (entry point,
flag, value) exits 2 with one line `error: …` naming the flag and writes nothing; every float field
of Config refuses nan; +inf passes only where it means no limit (--grad-clip inf: no clipping)."""

import dataclasses
import math
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cli import names, options, python, shown

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cost
import cost_compose
import cost_worker
import quality

import backbones
import bank
import config
import train
from analysis import common, equivalent_noise, pair_sources, predicted_x0, sampling_schemes, tsne

HINTS = typing.get_type_hints(config.Config)
FLOATS = [f.name for f in dataclasses.fields(config.Config) if HINTS[f.name] is float]
NUMBERS = [f.name for f in dataclasses.fields(config.Config) if HINTS[f.name] in (int, float)]
# train.py: one value out of range per numeric field, as a reader of its help would mistype it
OUT_OF_RANGE = dict(
    N="1",
    shift="0",
    P_std="0",
    prompts="0",
    K="0",
    pool_steps="0",
    cfg_scales="1,-1",
    eval_w="-1",
    guidance_scale="-0.1",
    H="-1",
    S_r="-1",
    T_r="-1",
    r_final="1.5",
    c="0",
    t_min="1.6",
    sigma_d="0",
    filter_threshold="0",
    lr="0",
    grad_clip="0",
    ema_decay="1",
    steps="0",
    fd_eps="0",
    n_eval="1",
    eval_teacher_steps="0",
    t_mid="0",
    eval_batch="0",
    log_every="0",
    sample_every="-1",
    ckpt_every="0",
    max_bad_steps="0",
    seed="-1",
    accum_steps="0",
    threads="-1",
    teacher_steps="-1",
    resolution="0",
    max_sequence_length="-1",
    vae_batch="0",
    lora_rank="0",
    lora_alpha="-1",
    lora_lr="-1",
)
TRAIN = [(config.flag(k), v) for k, v in OUT_OF_RANGE.items()]
TRAIN += [("--seed", "4294967296"), ("--shift", "-1"), ("--P-std", "-1"), ("--t-mid", "1.6")]
TRAIN += [("--cfg-scales", s) for s in ("1,nan", "inf", "1,-inf", "1,,2")]
TRAIN += [(config.flag(k), v) for k in FLOATS for v in ("nan", "inf", "-inf")]
TRAIN = [(f, v) for f, v in TRAIN if (f, v) != ("--grad-clip", "inf")]  # no clipping
TRAIN += [("--N", "nan"), ("--steps", "inf"), ("--lr", "1e-4x")]

# the other entry points: (module, flag, value); each also takes train.py's flags (after -- where
# the script has its own flags first), one each here
ANALYSIS = [
    (equivalent_noise, "--w", "1,nan"),  # a sweep of CFG scales
    (equivalent_noise, "--w", "1,-1"),
    (predicted_x0, "--w", "nan"),  # one CFG scale
    (predicted_x0, "--w", "inf"),
    (predicted_x0, "--w", "-1"),
    (tsne, "--shift", "0"),
    (tsne, "--shift", "nan"),
    (tsne, "--seed", "-1"),
    (tsne, "--resolution", "0"),
    (tsne, "--teacher-steps", "-1"),
    (equivalent_noise, "--n", "1"),
    (equivalent_noise, "--N", "1"),
    (equivalent_noise, "--n", "nan"),
    (predicted_x0, "--N", "1"),
    (predicted_x0, "--steps", "8,1"),
    (predicted_x0, "--steps", "8,nan"),
    (predicted_x0, "--n", "0"),
    (predicted_x0, "--routes", "0"),
    (predicted_x0, "--ref-N", "1"),
    (predicted_x0, "--prompt", "-1"),
    (sampling_schemes, "--N", "1"),
    (sampling_schemes, "--draws", "0"),
    (sampling_schemes, "--P-mean", "nan"),
    (sampling_schemes, "--P-mean", "-inf"),
    (sampling_schemes, "--P-std", "0"),
    (sampling_schemes, "--P-std", "inf"),
    (tsne, "--n", "9"),
    (tsne, "--N", "1"),
    (tsne, "--times", "1,nan"),
    (tsne, "--times", "2"),
    (tsne, "--times", "-0.1"),
    (tsne, "--k", "0"),
    (pair_sources, "--trajectories", "0"),
    (pair_sources, "--N", "1"),
    (pair_sources, "--P-mean", "inf"),
    (pair_sources, "--P-std", "0"),
    (pair_sources, "--arrows", "-1"),
    (pair_sources, "--draws", "0"),
    (pair_sources, "--w", "-1"),
]
BENCH = [
    (cost, "--steps", "0"),
    (cost, "--steps", "nan"),
    (cost, "--warmup", "-1"),
    (cost, "--resolution", "100"),
    (cost, "--resolution", "32"),
    (cost, "--lr", "inf"),
    (cost_worker, "--steps", "0"),
    (cost_worker, "--warmup", "-1"),
    (cost_worker, "--shift", "0"),
    (quality, "--seeds", "-1"),
    (quality, "--seeds", "nan"),
    (quality, "--jobs", "0"),
    (quality, "--cfg-scales", "1,nan"),
    (bank, "--pools", "-1"),
    (bank, "--pools", "nan"),
    (bank, "--sigma-d", "nan"),
]


OWN = {  # the bench scripts' own flags; the rest of a command line after -- is train.py's
    cost: options(cost.parser()),
    quality: options(quality.parser()),
    cost_worker: {"--steps", "--warmup", "--extras"},
}


class Accepted(Exception):
    """A bad value got past the checks: the work would start here."""


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Whatever starts the work (a teacher, an analysis' output, a bench's runs) raises Accepted,
    so that a value slipping through fails at once instead of training."""

    def stop(*_, **__):
        raise Accepted

    starts = [(backbones, "build"), (common, "write"), (quality, "gather"), (cost, "prepare")]
    starts += [(cost_compose, "main_paper"), (cost_worker, "measure"), (cost_worker, "extras")]
    for module, name in starts:
        monkeypatch.setattr(module, name, stop)


def refused(main, argv: list[str], flag: str, tmp_path: Path, capsys) -> None:
    """main(argv) returns 2, prints one line `error: …` naming flag, and writes nothing."""
    assert main(argv) == 2, f"{argv} was accepted"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and names(err[0], flag), err
    assert not list(tmp_path.iterdir()), f"{argv} wrote {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("flag,value", TRAIN)
def test_train_refuses(flag, value, tmp_path, capsys):
    """train.py FLAG=VALUE: exit 2, one line naming the flag, no run directory and no cache."""
    argv = [f"{flag}={value}", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    refused(train.main, argv, flag, tmp_path, capsys)


def script_argv(module, flag: str, value: str, tmp: Path) -> list[str]:
    """The module's command line with FLAG=VALUE (train.py's flags after the script's own and --),
    every output under tmp."""
    bad = [f"{flag}={value}"]
    if module is bank:
        return ["build", "--out", str(tmp / "bank"), *bad, "--cache-dir", str(tmp / "c")]
    if module not in OWN:  # analysis/: train.py's flags are not taken
        return [*bad, "--out", str(tmp / "out"), "--cache-dir", str(tmp / "c")]
    out = {cost: ["--work", str(tmp / "w"), "--json", str(tmp / "cost.json")], cost_worker: []}
    out[quality] = ["--runs", str(tmp / "runs"), "--results", str(tmp / "results")]
    return [*bad, *out[module]] if flag in OWN[module] else [*out[module], "--", *bad]


@pytest.mark.parametrize("module,flag,value", ANALYSIS + BENCH)
def test_script_refuses(module, flag, value, tmp_path, capsys):
    """analysis/, bench/ and bank.py: FLAG=VALUE exits 2, one line naming it, nothing written."""
    refused(module.main, script_argv(module, flag, value, tmp_path), flag, tmp_path, capsys)


@pytest.mark.parametrize("name", FLOATS)
def test_every_float_field_refuses_nan(name):
    """Each float field of Config: nan on the command line is refused as it is parsed, and a
    Config holding nan (a bank's manifest, a preset) is refused by validate; both name the flag."""
    with pytest.raises(config.UsageError) as parsed:
        config.parse_args([f"{config.flag(name)}=nan"])
    with pytest.raises(config.UsageError) as checked:
        config.validate(dataclasses.replace(config.Config(), **{name: math.nan}), run_dir=False)
    assert names(str(parsed.value), config.flag(name)), parsed.value
    assert names(str(checked.value), config.flag(name)), checked.value


def test_every_number_has_a_range():
    """validate checks every numeric field of Config (RANGES), and the table above tries each."""
    numeric = {*NUMBERS, "cfg_scales"}
    assert set(config.RANGES) == numeric
    assert set(OUT_OF_RANGE) == numeric - {"P_mean"}  # P_mean: any finite number


def test_inf_only_where_it_means_no_limit():
    """+inf passes where RANGES allows it, and that flag's help says what inf means."""
    unlimited = [k for k in FLOATS if config.holds(config.RANGES[k], math.inf)]
    assert unlimited == ["grad_clip"]
    cfg = config.parse_args(["--grad-clip", "inf"])
    config.validate(cfg, run_dir=False)
    assert cfg.grad_clip == math.inf and "inf: no clipping" in config.field_help()["grad_clip"]


def test_defaults_and_presets_in_range():
    """The defaults and every backbone's preset pass validate's ranges."""
    for backbone in ("digits", "toy2d", *config.PRESETS):
        cfg = config.parse_args(["--backbone", backbone])
        bad = [k for k, s in config.RANGES.items() if not config.holds(s, getattr(cfg, k))]
        assert not bad, f"{backbone}: {bad}"


def test_holds():
    """The range forms: >= a, > a, finite, and intervals with π/2 or inf as an end."""
    assert config.holds(">= 2", 2) and not config.holds(">= 2", 1)
    assert not config.holds("> 0", 0) and not config.holds("> 0", math.inf)
    assert config.holds("(0, inf]", math.inf) and not config.holds("(0, inf]", 0)
    assert config.holds("[0, π/2)", 0) and not config.holds("[0, π/2)", math.pi / 2)
    assert config.holds(">= 0", (0, 1.5)) and not config.holds(">= 0", [1, -1])
    assert not any(config.holds(s, math.nan) for s in ("finite", ">= 0", "(-inf, inf]"))


def test_parser_float_flags_are_finite():
    """config.Parser: `type=float` refuses nan and ±inf, `within=` names the flag it checks."""
    p = config.Parser()
    p.add_argument("--x", type=float, default=1.0, within="> 0")
    assert p.parse_args(["--x", "2"]).x == 2.0
    for value, message in (("nan", "argument --x: nan is not"), ("0", "--x must be > 0")):
        with pytest.raises(config.UsageError, match=message):
            p.parse_args([f"--x={value}"])


END_TO_END = [  # the cases, as a new user runs them
    ("train.py", "--lr", "nan"),  # a traceback from AdamW's constructor
    ("train.py", "--shift", "0"),  # trained and exited 0
    ("bank.py", "--sigma-d", "nan"),
    ("bench/quality.py", "--cfg-scales", "1,nan"),
]


def test_end_to_end(tmp_path):
    """`python <script> FLAG VALUE`: exit 2, one stderr line `error: …` naming the flag, nothing
    written (processes in parallel: each pays for importing torch)."""
    out = {
        "train.py": ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")],
        "bank.py": ["build", "--out", str(tmp_path / "bank"), "--cache-dir", str(tmp_path / "c")],
        "bench/quality.py": ["--runs", str(tmp_path / "r"), "--results", str(tmp_path / "j"), "--"],
    }
    runs = [[s, *out[s], flag, value] for s, flag, value in END_TO_END]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda argv: python(*argv), runs))
    for (_, flag, _), r in zip(END_TO_END, answers, strict=True):
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1, shown(r)
        assert lines[0].startswith("error: ") and names(lines[0], flag), shown(r)
    assert not list(tmp_path.iterdir())
