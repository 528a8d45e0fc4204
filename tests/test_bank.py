"""bank.py: an offline bank reproduces online TBCM training bit for bit, with no teacher or text
encoder loaded for training; builds resume after a kill and shard across processes; bad or
corrupted banks fail clearly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import backbones
import bank
import sana
import train

ROOT = Path(__file__).resolve().parents[1]
# the pairs: a 60-step digits teacher, 2 prompts × 2 trajectories × 3 pairs, 2 steps per pool
PAIRS = [
    "--backbone",
    "digits",
    "--teacher-steps",
    "60",
    "--N",
    "4",
    "--prompts",
    "2",
    "--K",
    "2",
    "--pool-steps",
    "2",
]
RUN = ["--n-eval", "100", "--log-every", "1", "--eval-teacher-steps", "4"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits_bank(cache, tmp_path_factory):
    """3 pools = 6 steps of pairs."""
    out = tmp_path_factory.mktemp("banks") / "digits"
    assert (
        bank.main(["build", "--out", str(out), "--pools", "3", *PAIRS, "--cache-dir", cache]) == 0
    )
    return out


def shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("pool-*.safetensors"))}


def same_shards(a: Path, b: Path) -> bool:
    sa, sb = shards(a), shards(b)
    return sa.keys() == sb.keys() and all(
        sa[n].keys() == sb[n].keys() and all(torch.equal(sa[n][k], sb[n][k]) for k in sa[n])
        for n in sa
    )


def ckpt(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "tensors.safetensors")


def test_bank_run_is_the_online_run_bit_for_bit(digits_bank, cache, tmp_path, monkeypatch):
    """Same seeds → the same student, EMA, optimiser state and losses as online TBCM; the teacher is
    built only after training (for evaluation); resuming a bank run is bit-identical too."""
    online, banked, resumed = tmp_path / "online", tmp_path / "bank", tmp_path / "resumed"
    args = [*RUN, "--cache-dir", cache, "--steps", "6", "--ckpt-every", "3"]
    assert train.main([*PAIRS, *args, "--out", str(online)]) == 0
    events = []
    real_train, real_build = train.train, backbones.build
    monkeypatch.setattr(
        train, "train", lambda *a, **k: (events.append("train"), real_train(*a, **k))[1]
    )
    monkeypatch.setattr(
        backbones, "build", lambda *a, **k: (events.append("build"), real_build(*a, **k))[1]
    )
    # the pair flags may be repeated when they agree with the bank's
    assert train.main([*args, "--bank", str(digits_bank), "--N", "4", "--out", str(banked)]) == 0
    assert events == ["train", "build"]  # no teacher while training
    a, b = ckpt(online, 6), ckpt(banked, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [json.loads(ln)["loss"] for ln in (online / "log.jsonl").read_text().splitlines()]
    assert loss == [
        json.loads(ln)["loss"] for ln in (banked / "log.jsonl").read_text().splitlines()
    ]
    # resume: 3 steps (mid pool 2), then on to 6 from the checkpoint's bank position
    assert (
        train.main([*args, "--bank", str(digits_bank), "--steps", "3", "--out", str(resumed)]) == 0
    )
    assert train.main([*args, "--bank", str(digits_bank), "--out", str(resumed), "--resume"]) == 0
    c = ckpt(resumed, 6)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_build_resumes_after_a_kill_and_shards_across_ranks(
    digits_bank, cache, tmp_path, monkeypatch, torchrun
):
    """A build killed after 2 shards (and a partial third) continues to the same bank as one
    uninterrupted build: nothing lost, nothing duplicated; 2 torchrun ranks write the same shards as
    one process."""
    out = tmp_path / "killed"
    real, written = bank.write_shard, []

    def dies_on_third(path, parts, dtype):
        if len(written) == 2:
            path.with_name(f".tmp-{path.name}-999").write_bytes(b"partial")  # the kill mid-write
            raise KeyboardInterrupt
        written.append(path.name)
        return real(path, parts, dtype)

    monkeypatch.setattr(bank, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        bank.main(["build", "--out", str(out), "--pools", "3", *PAIRS, "--cache-dir", cache])
    assert (
        sorted(p.name for p in out.glob("pool-*"))
        == written
        == ["pool-000000.safetensors", "pool-000001.safetensors"]
    )
    with pytest.raises(
        bank.BankError, match="pool-000001"
    ):  # readers refuse a bank with a gap, not a kill
        (out / "pool-000001.safetensors").rename(out / "pool-000005.safetensors")
        bank.Shards(out)
    (out / "pool-000005.safetensors").rename(out / "pool-000001.safetensors")
    monkeypatch.setattr(bank, "write_shard", lambda *a: (written.append(a[0].name), real(*a))[1])
    assert (
        bank.main(["build", "--out", str(out), "--pools", "3", *PAIRS, "--cache-dir", cache]) == 0
    )
    assert written[2:] == ["pool-000002.safetensors"]  # only the missing one
    assert not list(out.glob(".tmp-*")) and same_shards(out, digits_bank)

    ranks = tmp_path / "ranks"
    build = ["bank.py", "build", "--out", str(ranks), "--pools", "3", *PAIRS, "--cache-dir", cache]
    p = torchrun(build)
    assert p.returncode == 0, p.stderr[-2000:]
    assert same_shards(ranks, digits_bank)


def test_manifest_shard_contents_and_storage_dtype(digits_bank, cache, tmp_path):
    """The manifest describes the pairs; a shard holds both teacher velocities per pair; fp16
    storage halves the states and velocities and moves the first loss by < 1 %."""
    m = json.loads((digits_bank / "manifest.json").read_text())
    assert m["config"]["N"] == 4 and m["config"]["K"] == 2 and m["data_shape"] == [1, 8, 8]
    assert m["pairs_per_pool"] == 2 * 2 * 2 * 3 and len(m["teacher_sha256"]) == 64
    s = load_file(digits_bank / "pool-000000.safetensors")
    assert s["x_t"].shape == s["v_u"].shape == s["v_c"].shape == (2, 12, 1, 8, 8)
    assert s["t"].shape == (2, 12) and s["prompt"].shape == s["w"].shape == s["score"].shape == (
        2,
        4,
    )
    assert not torch.equal(s["v_u"], s["v_c"])  # CFG: the two velocities differ
    half = tmp_path / "fp16"
    assert (
        bank.main(
            [
                "build",
                "--out",
                str(half),
                "--pools",
                "1",
                "--dtype",
                "fp16",
                *PAIRS,
                "--cache-dir",
                cache,
            ]
        )
        == 0
    )
    h = load_file(half / "pool-000000.safetensors")
    assert h["x_t"].dtype == torch.float16 and h["t"].dtype == torch.float32
    assert torch.allclose(h["v_c"].float(), s["v_c"], rtol=1e-3, atol=1e-3)
    size = (half / "pool-000000.safetensors").stat().st_size
    assert size < 0.6 * (digits_bank / "pool-000000.safetensors").stat().st_size
    losses = []
    for b, out in ((digits_bank, "r32"), (half, "r16")):
        assert (
            train.main(
                [
                    *RUN,
                    "--cache-dir",
                    cache,
                    "--steps",
                    "1",
                    "--bank",
                    str(b),
                    "--out",
                    str(tmp_path / out),
                ]
            )
            == 0
        )
        losses.append(json.loads((tmp_path / out / "log.jsonl").read_text())["loss"])
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.01 * abs(losses[0])


def corrupt(b: Path, how: str) -> None:
    shard = b / "pool-000001.safetensors"
    data = bytearray(shard.read_bytes())
    if how == "flipped":
        data[-5] ^= 0xFF  # a byte of the last tensor
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize(
    "how,message", [("flipped", "checksum mismatch"), ("truncated", "unreadable shard")]
)
def test_corrupted_shard_is_a_clear_error(how, message, digits_bank, cache, tmp_path, capsys):
    """A damaged shard, found when the run reaches it, stops the run with one line and exit 2."""
    import shutil

    b = tmp_path / "bank"
    shutil.copytree(digits_bank, b)
    corrupt(b, how)
    capsys.readouterr()
    code = train.main(
        [*RUN, "--cache-dir", cache, "--steps", "6", "--bank", str(b), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and err[-1].startswith("error: ")
        and message in err[-1]
        and "pool-000001" in err[-1]
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--N", "8"], "contradicts the bank"),
        (["--method", "scm"], "drop --method scm"),
        (["--bank-missing"], "no manifest.json"),
    ],
)
def test_bad_bank_flags_exit_2(args, message, digits_bank, cache, tmp_path, capsys):
    b = str(tmp_path / "nowhere") if args == ["--bank-missing"] else str(digits_bank)
    args = [] if args == ["--bank-missing"] else args
    out = tmp_path / "r"
    assert train.main([*RUN, "--cache-dir", cache, "--bank", b, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_another_teacher_is_refused(digits_bank, cache, tmp_path, capsys):
    import shutil

    b = tmp_path / "bank"
    shutil.copytree(digits_bank, b)
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(m | {"teacher_sha256": "0" * 64}))
    assert (
        train.main([*RUN, "--cache-dir", cache, "--bank", str(b), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "another teacher" in capsys.readouterr().err
    # and a build into a bank of other pairs
    assert (
        bank.main(
            [
                "build",
                "--out",
                str(digits_bank),
                "--pools",
                "3",
                *PAIRS,
                "--N",
                "5",
                "--cache-dir",
                cache,
            ]
        )
        == 2
    )
    assert "other pairs" in capsys.readouterr().err


@pytest.mark.parametrize("frozen, student", [("fp32", "full"), ("bf16", "full"), ("fp32", "lora")])
def test_sana_bank_matches_online_without_text_encoder(frozen, student, tmp_path, monkeypatch):
    """Tiny Sana: the bank stores the prompts' embeddings, so training loads only the transformer
    (no Gemma-2, no DC-AE) and ends with the online run's student, bit for bit; also with the
    teacher held in bf16 (whose weights hash as their fp32 copy does: the bank accepts it), and
    with a LoRA student (--student lora) on the transformer's weights, read once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\n", encoding="utf-8")
    pairs = [
        "--backbone",
        "sana",
        "--tiny",
        "--N",
        "4",
        "--prompts",
        "2",
        "--K",
        "2",
        "--pool-steps",
        "1",
        "--resolution",
        "64",
        "--prompts-file",
        str(prompts),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--frozen-precision",
        frozen,
    ]
    run = ["--n-eval", "4", "--eval-teacher-steps", "4", "--log-every", "1", "--steps", "2"]
    run += ["--student", "lora", "--lora-rank", "4"] * (student == "lora")
    b, online, banked = tmp_path / "bank", tmp_path / "online", tmp_path / "banked"
    assert bank.main(["build", "--out", str(b), "--pools", "2", *pairs]) == 0
    assert train.main([*pairs, *run, "--out", str(online)]) == 0
    loaded = []
    real_train, real_load = train.train, sana.load_sana
    monkeypatch.setattr(
        train, "train", lambda *a, **k: (loaded.append("train"), real_train(*a, **k))[1]
    )
    monkeypatch.setattr(
        sana, "load_sana", lambda *a, **k: (loaded.append("pipeline"), real_load(*a, **k))[1]
    )
    assert (
        train.main(
            [*run, "--bank", str(b), "--cache-dir", str(tmp_path / "cache"), "--out", str(banked)]
        )
        == 0
    )
    assert loaded == [
        "train",
        "pipeline",
    ]  # text encoder and DC-AE only for evaluation, after training
    s = load_file(b / "pool-000000.safetensors")
    assert s["cond/0"].shape[:2] == (1, 2) and s["cond/1"].shape[:2] == (
        1,
        2,
    )  # embeddings, masks per slot
    x, y = ckpt(online, 2), ckpt(banked, 2)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_bank_training_under_torchrun_matches_one_process(cache, tmp_path, torchrun):
    """Training from a bank on 2 gloo ranks (DDP; each rank reads its own prompt slots of the
    shards) trains as one process: step 0's gradient norm to rel 1e-6, later steps' to 1e-4, the
    weights after 4 AdamW steps within half the learning rate. One step per pool: a pool's pairs
    are shuffled per rank, so only with one step per pool does each step hold the same pairs."""
    one, two, pairs = tmp_path / "one", tmp_path / "two", tmp_path / "bank"
    per_step = [*PAIRS[:-1], "1", "--cache-dir", cache]  # --pool-steps 1
    assert bank.main(["build", "--out", str(pairs), "--pools", "4", *per_step]) == 0
    flags = ["--bank", str(pairs), "--steps", "4", "--cache-dir", cache, *RUN]
    assert train.main([*flags, "--out", str(one)]) == 0
    p = torchrun(["train.py", *flags, "--out", str(two)])
    assert p.returncode == 0, p.stderr[-2000:]
    g1, g2 = (
        [json.loads(ln)["grad_norm"] for ln in (d / "log.jsonl").read_text().splitlines()]
        for d in (one, two)
    )
    assert g1[0] == pytest.approx(g2[0], rel=1e-6) and g1 == pytest.approx(g2, rel=1e-4)
    a, b = ckpt(one, 4), ckpt(two, 4)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("student/", "head/")))
    assert diff < 0.5 * 3e-5  # the digits default lr
    assert json.loads((two / "metrics.json").read_text())["train"]["processes"] == 2
