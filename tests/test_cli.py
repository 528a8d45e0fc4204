"""The command lines: every flag the code names exists as the parser
spells it; parsers refuse abbreviations and unknown flags with `error: …` and exit status 2;
`--help` shows each field's help, default and preset values."""

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import bank
import config

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_-]*")  # `_` too: `--n_eval` is a misspelling
# Files whose strings (messages, docstrings, f-string parts) name train.py's or bank.py's flags.
FLAG_FILES = [
    "config.py",
    "backbones.py",
    "bank.py",
    "sana_io.py",
    "pairs.py",
    "train.py",
    "checkpoint.py",
    "toy.py",
    "toy_teacher.py",
]
NOT_OURS = {  # flags of other programs that the strings quote
    "--standalone",  # torchrun's, in bank.py's data-parallel build command
    "--nproc-per-node",  # torchrun's, idem
    "--nproc_per_node",  # torchrun's older spelling
    "--local-dir",  # `huggingface-cli download`'s, in sana_io.py's hint for fetching Sana
}
# Script → an abbreviation of one of its long flags that take a value (analysis scripts: --backbone,
# cost.py: --config, quality.py: --table, bank_storage.py: --results). Given no value, a parser that
# accepts it fails on the missing value, naming the full flag, before running anything.
SCRIPTS = {
    "analysis/equivalent_noise.py": "--back",
    "analysis/tsne.py": "--back",
    "analysis/sampling_schemes.py": "--back",
    "analysis/predicted_x0.py": "--back",
    "analysis/pair_sources.py": "--back",
    "bench/cost.py": "--conf",
    "bench/quality.py": "--tab",
    "bench/bank_storage.py": "--res",
}


def python(*args: str) -> subprocess.CompletedProcess:
    """`python <args>` in the repository, as the README has it."""
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def shown(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}, stderr:\n{r.stderr[-1500:]}"


def last_line(r: subprocess.CompletedProcess) -> str:
    return (r.stderr.splitlines() or [""])[-1]


def names(line: str, flag: str) -> bool:
    """The line names exactly this flag (`--n`, not `--n-eval`)."""
    return flag in FLAG.findall(line)


@pytest.fixture(scope="module")
def answers() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(script, flag) → the script's answer, for `--nope` and its abbreviation, run in parallel
    (each process pays for importing torch)."""
    runs = [(s, f) for s in SCRIPTS for f in ("--nope", SCRIPTS[s])]
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(runs, pool.map(lambda run: python(*run), runs), strict=True))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def flag_tokens() -> list[tuple[str, int, str]]:
    """(file, line, --flag) for every flag-like token in a string literal of FLAG_FILES."""
    found = []
    for name in FLAG_FILES:
        path = ROOT / name
        if path.exists():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found += [(name, node.lineno, t) for t in FLAG.findall(node.value)]
    return found


def help_texts() -> dict[str, str]:
    """Field name → its help in train.py's parser, as --help prints it."""
    return {a.dest: (a.help or "").replace("%%", "%") for a in config.parser()._actions}


def forms(value) -> list[str]:
    """How --help may print a value: str, and for a tuple `1.5,2.0,2.5` or its repr."""
    return [",".join(map(str, value)), repr(value)] if isinstance(value, tuple) else [str(value)]


def says(text: str, value: str) -> bool:
    """`value` is in `text` as a whole (2000 is not in 20000, `sana: 1` not in `sana: 16`)."""
    return re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", text) is not None


def preset_value(v):
    """A PRESETS entry is the value, or (value, provenance)."""
    return v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str) else v


def test_named_flags_exist():
    """Messages and docstrings name flags exactly as train.py's or bank.py's parser spells them
    (`--N`, not `--n`)."""
    known = options(config.parser()) | options(bank.parser()) | NOT_OURS
    bad = [f"{f}:{line}: {t}" for f, line, t in flag_tokens() if t not in known]
    assert not bad, "flags in strings that no parser has:\n" + "\n".join(bad)


def test_flag_spelling():
    """config.flag spells a field's flag as the parser does: `--` + the name, `_` → `-`."""
    assert [config.flag(n) for n in ("N", "P_mean", "n_eval")] == ["--N", "--P-mean", "--n-eval"]
    fields = [config.flag(f.name) for f in dataclasses.fields(config.Config)]
    assert set(fields) <= options(config.parser())


def test_train_refuses_abbreviation(tmp_path):
    """`python train.py --n 8` (a prefix of --n-eval) → exit 2, one line `error: …` naming --n,
    nothing written (--steps 0 stops a parser that takes --n for --n-eval before it trains)."""
    run, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    r = python("train.py", "--n", "8", "--out", run, "--cache-dir", cache, "--steps", "0")
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, shown(r)
    refused = lines[0].startswith("error: ") and names(lines[0], "--n")
    assert refused, shown(r)
    assert not list(tmp_path.iterdir())


def test_bank_refuses_abbreviation(tmp_path):
    """`python bank.py build --out X --N 4 --pool 3` (a prefix of --pools) → exit 2, one line
    `error: …` naming --pool, nothing written (--steps 0: a parser taking it does not build)."""
    out, cache = str(tmp_path / "bank"), str(tmp_path / "cache")
    argv = ["build", "--out", out, "--N", "4", "--pool", "3", "--cache-dir", cache, "--steps", "0"]
    r = python("bank.py", *argv)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, shown(r)
    refused = lines[0].startswith("error: ") and names(lines[0], "--pool")
    assert refused, shown(r)
    assert not list(tmp_path.iterdir())


def test_every_option_has_help():
    """--help explains every flag of train.py."""
    bad = [a.option_strings for a in config.parser()._actions if a.option_strings and not a.help]
    assert not bad, f"flags without help text: {bad}"


def test_help_shows_defaults():
    """Each field's help shows its default (`--help` shows each field's provenance)."""
    helps = help_texts()
    bad = [
        f"{config.flag(f.name)} (default {f.default!r}): {helps.get(f.name)!r}"
        for f in dataclasses.fields(config.Config)
        if not any(says(helps.get(f.name, ""), s) for s in forms(f.default))
    ]
    assert not bad, "help texts without their default:\n" + "\n".join(bad)


def test_help_shows_presets():
    """A preset value that differs from the default is in the help as `<backbone>: <value>`."""
    helps, bad = help_texts(), []
    defaults = {f.name: f.default for f in dataclasses.fields(config.Config)}
    for backbone, preset in config.PRESETS.items():
        for k, v in ((k, preset_value(v)) for k, v in preset.items()):
            said = [f"{backbone}: {s}" for s in forms(v)]
            if v != defaults.get(k) and not any(says(helps.get(k, ""), s) for s in said):
                bad.append(f"{config.flag(k)}: no {said[0]!r} in {helps.get(k)!r}")
    assert not bad, "preset values missing from --help:\n" + "\n".join(bad)


def test_train_help_lists_every_field():
    """`python train.py --help` exits 0 and lists every Config field's flag."""
    r = python("train.py", "--help")
    listed = FLAG.findall(r.stdout)
    missing = [config.flag(f.name) for f in dataclasses.fields(config.Config)]
    missing = [flag for flag in missing if flag not in listed]
    assert r.returncode == 0, shown(r)
    assert not missing, f"flags missing from train.py --help: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_refuses_unknown_flag(script, answers):
    """analysis/ and bench/ scripts: an unknown flag → exit 2, last stderr line `error: …`."""
    r = answers[script, "--nope"]
    assert r.returncode == 2, f"{script} --nope: {shown(r)}"
    assert last_line(r).startswith("error:"), f"{script} --nope: {shown(r)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_refuses_abbreviation(script, answers):
    """analysis/ and bench/ scripts parse with allow_abbrev=False: a prefix of a flag → exit 2,
    last stderr line `error: …` naming the prefix as typed (not the flag it abbreviates)."""
    short = SCRIPTS[script]
    r = answers[script, short]
    assert r.returncode == 2, f"{script} {short}: {shown(r)}"
    refused = last_line(r).startswith("error:") and names(last_line(r), short)
    assert refused, f"{script} {short}: {shown(r)}"


def test_toy_backbones_run_on_one_thread_by_default():
    """Tiny toy nets stall when threads compete for cores: one intra-op thread unless --threads says
    otherwise; Sana keeps torch's default (0)."""
    assert config.parse_args([]).threads == 1
    assert config.parse_args(["--backbone", "toy2d"]).threads == 1
    assert config.parse_args(["--threads", "2"]).threads == 2
    assert config.parse_args(["--backbone", "sana", "--tiny"]).threads == 0


def test_flags_override_presets():
    """A flag beats the backbone's preset, the preset beats the default."""
    cfg = config.parse_args(["--backbone", "toy2d", "--lr", "1e-3", "--steps", "7"])
    assert cfg.lr == 1e-3 and cfg.steps == 7 and cfg.N == config.PRESETS["toy2d"]["N"][0]
    assert config.parse_args(["--backbone", "toy2d"]).lr == config.PRESETS["toy2d"]["lr"][0]
