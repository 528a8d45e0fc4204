"""Host syncs in the training step: the reads of tensor values a step makes on the host (each a
stall on a GPU), counted on CPU by `HostReads`, and the toy steps/s of train.py at a commit whose
step syncs (`--before`) and at one whose step reads once (`--after`), measured in one run, runs
interleaved, the final tensors compared bit for bit. Writes bench/results/sync_digits.{json,md}.
    python bench/sync.py   # digits: the default run's first 300 steps, 5 runs each; ~4 min, 2 cores
"""

import argparse
import io
import json
import os
import runpy
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "456fe54"  # the last commit whose step reads the host 17 times (loss.py, train.py)
aten = torch.ops.aten
# ops whose result the host must see (.item(), float(), bool(), `if t`) or whose output size
# depends on the values: on a GPU each waits for the queued kernels
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
READS |= {aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
READS |= {aten.repeat_interleave.Tensor, aten.bincount.default, aten.equal.default}
MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # x[mask] (= v)


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values on any device, per optimiser step (a step starts at
    each `Optimizer.zero_grad`, train.py's first call in a step; reads before the first go to
    `setup`), each filed under the innermost line of `root`'s files that made it: the ops of READS,
    boolean-mask indexing, and .tolist() / .numpy() / .cpu(), which read a CPU tensor without an
    op and are therefore patched. Not a read: torch.optim's `_get_value` of a step counter, a host
    tensor (Adam keeps state["step"] on the CPU unless capturable or fused)."""

    PATCHED = ("tolist", "numpy", "cpu")

    def __init__(self, root: Path = ROOT):
        super().__init__()
        self.root, self.setup, self.steps = Path(root), Counter(), []

    @property
    def per_step(self) -> list[int]:
        return [c.total() for c in self.steps]

    def count(self) -> None:
        f, site = sys._getframe(1), "?"
        while f is not None:
            path = Path(f.f_code.co_filename)
            if f.f_code.co_name == "_get_value" and "optim" in path.parts:
                return
            mine = path.is_relative_to(self.root) and "site-packages" not in path.parts
            if mine and path != Path(__file__):
                site = f"{path.relative_to(self.root)}:{f.f_lineno}"
                break
            f = f.f_back
        (self.steps[-1] if self.steps else self.setup)[site] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in MASKED and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in READS or masked:
            self.count()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.saved = {m: getattr(torch.Tensor, m) for m in self.PATCHED}
        self.saved["zero_grad"] = torch.optim.Optimizer.zero_grad

        def read(name):
            def method(t, *a, **k):
                self.count()
                return self.saved[name](t, *a, **k)

            return method

        def zero_grad(opt, *a, **k):
            self.steps.append(Counter())
            return self.saved["zero_grad"](opt, *a, **k)

        for m in self.PATCHED:
            setattr(torch.Tensor, m, read(m))
        torch.optim.Optimizer.zero_grad = zero_grad
        return super().__enter__()

    def __exit__(self, *exc):
        for m in self.PATCHED:
            setattr(torch.Tensor, m, self.saved[m])
        torch.optim.Optimizer.zero_grad = self.saved["zero_grad"]
        return super().__exit__(*exc)


def count_worker(root: Path, out: Path, flags: list[str]) -> None:
    """`root`'s train.py run as `python train.py flags` under HostReads; the reads of each step but
    the last (its bucket holds the final checkpoint and the evaluation) → out."""
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = ["train.py", *flags]
    with HostReads(root) as reads:
        try:
            runpy.run_path(str(root / "train.py"), run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    out.write_text(json.dumps({"setup": reads.setup, "steps": reads.steps[:-1]}))


def sh(cmd: list[str], cwd: Path, log: Path) -> None:
    """A command, single-threaded (fair when jobs share the CPU), its output to `log`, else exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {p.returncode}); see {log}")


def checkout(rev: str, into: Path) -> tuple[Path, str]:
    """The tree of commit `rev` unpacked into `into` (git archive: the repository is not touched);
    returns the tree and the full commit id."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, check=False)  # noqa: E731
    sha, tar = git("rev-parse", "--verify", f"{rev}^{{commit}}"), git("archive", rev)
    if sha.returncode or tar.returncode:
        sys.exit(f"error: no commit {rev} in {ROOT}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as f:
        f.extractall(into / "tree", filter="data")
    return into / "tree", sha.stdout.decode().strip()


def reads_by_kind(steps: list[dict[str, int]], cfg: dict) -> dict[str, dict]:
    """The reads of the steps of each kind: the counts seen and the first such step's reads by
    line. A step saves a checkpoint, else draws a new pool of pairs (pairs.PairPool, every
    pool_steps), else writes a log line, else it is plain."""
    kinds: dict[str, dict] = {}
    for step, sites in enumerate(steps):
        logs, draw = step % cfg["log_every"] == 0, step % cfg["pool_steps"] == 0
        kind = "draw" if draw else "log" if logs else "plain"
        kind = "checkpoint" if (step + 1) % cfg["ckpt_every"] == 0 else kind
        k = kinds.setdefault(kind, {"counts": [], "sites": sites})
        k["counts"] = sorted({*k["counts"], sum(sites.values())})
    return kinds


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(max((run / "checkpoints").glob("step-*")) / "tensors.safetensors")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--before", default=BEFORE, help=f"the commit before (default: {BEFORE})")
    p.add_argument("--after", default="HEAD", help="the commit after (default: HEAD)")
    p.add_argument("--steps", type=int, default=300, help="steps per timed run (default: 300)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per commit (default: 5)")
    p.add_argument("--count-steps", type=int, default=30, help="steps counted (default: 30)")
    p.add_argument("--runs", default="runs/bench/sync", help="runs (default: runs/bench/sync)")
    p.add_argument("--results", default="bench/results", help="the folder of sync_digits.{json,md}")
    p.add_argument("--count-in", help=argparse.SUPPRESS)  # a worker: count in this tree
    p.add_argument("--count-out", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []  # a worker's flags of train.py
    a = p.parse_args(argv[: len(argv) - len(flags) - bool(flags)])
    if a.count_in:
        count_worker(Path(a.count_in), Path(a.count_out), flags)
        return 0
    held = tempfile.TemporaryDirectory(prefix="bench-sync-")  # removed when main returns
    runs, py, tmp = ROOT / a.runs, sys.executable, Path(held.name)
    runs.mkdir(parents=True, exist_ok=True)
    common = ["--overwrite", "--cache-dir", str(ROOT / "runs")]  # one teacher for both
    trees, res = {}, {"steps": a.steps, "repeats": a.repeats}
    for name in ("before", "after"):
        (tmp / name).mkdir()
        trees[name], res[f"{name}_commit"] = checkout(getattr(a, name), tmp / name)
    res["command"] = f"python train.py --steps {a.steps} (the default run's first steps)"
    rate: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(a.repeats):  # interleaved: a drift of the shared CPU hits both commits
        for name, tree in trees.items():
            run = runs / f"{name}-{i}"
            sh(
                [py, "train.py", "--steps", str(a.steps), "--out", str(run), *common],
                tree,
                run.with_suffix(".log"),
            )
            m = json.loads((run / "metrics.json").read_text())
            rate[name].append(m["train"]["steps"] / m["train"]["wall_s"])
            ev = m["eval"].items()
            res[f"eval_{name}"] = {k: v["distance"] for k, v in ev if isinstance(v, dict)}
    ref = final_tensors(runs / "before-0")
    res["final_tensors_bitwise_equal"] = all(
        ref.keys() == t.keys() and all(torch.equal(v, t[k]) for k, v in ref.items())
        for t in (final_tensors(runs / f"{n}-{i}") for n in trees for i in range(a.repeats))
    )
    for name, tree in trees.items():  # counted under the dispatch mode, slow: a few steps
        run, out = runs / f"count-{name}", runs / f"count-{name}.json"
        cmd = [py, __file__, "--count-in", str(tree), "--count-out", str(out), "--"]
        cmd += ["--steps", str(a.count_steps), "--out", str(run), "--n-eval", "100", *common]
        sh(cmd, ROOT, runs / f"count-{name}.log")
        cfg = json.loads((run / "config.json").read_text())
        res[f"reads_{name}"] = reads_by_kind(json.loads(out.read_text())["steps"], cfg)
    res["steps_per_s"] = {n: statistics.median(v) for n, v in rate.items()} | {"runs": rate}
    # the ratio of each pair of runs, side by side in time: what load the CPU's other jobs put on
    # it, both runs of a pair share most of
    res["paired_ratios"] = [a / b for a, b in zip(rate["after"], rate["before"], strict=True)]
    res["ratio_after_over_before"] = statistics.median(res["paired_ratios"])
    out = ROOT / a.results
    out.mkdir(parents=True, exist_ok=True)
    (out / "sync_digits.json").write_text(json.dumps(res, indent=1))
    (out / "sync_digits.md").write_text(markdown(res))
    print(markdown(res), end="")
    return 0


def markdown(res: dict) -> str:
    """The result: host reads per step by kind and the lines that make them, steps/s, their
    ratio, the bit-for-bit check."""
    b, a, sps = res["reads_before"], res["reads_after"], res["steps_per_s"]
    lines = ["| | before | after |", "|---|---|---|"]
    for k in ("plain", "log", "draw"):
        counts = ["/".join(map(str, r[k]["counts"])) if k in r else "–" for r in (b, a)]
        lines.append(f"| host reads, {k} step | {counts[0]} | {counts[1]} |")
    lines.append(
        f"| steps/s (median of {res['repeats']}) | {sps['before']:.2f} | {sps['after']:.2f} |"
    )
    lo, hi = min(res["paired_ratios"]), max(res["paired_ratios"])
    lines.append("")
    lines.append(
        f"steps/s after/before: {res['ratio_after_over_before']:.3f} (median of {res['repeats']} "
        f"pairs of runs, {lo:.3f}–{hi:.3f})"
    )
    lines.append(f"final tensors bit for bit equal: {res['final_tensors_bitwise_equal']}")
    lines.append(
        f"before {res['before_commit'][:7]}, after {res['after_commit'][:7]}: {res['command']}"
    )
    lines += ["", "Where the reads are (the first step of each kind, file:line of that commit):"]
    for name, r in (("before", b), ("after", a)):
        for k in ("plain", "log", "draw"):
            where = ", ".join(f"{site} ×{n}" for site, n in r.get(k, {}).get("sites", {}).items())
            lines.append(f"- {name}, {k} step: {where or 'none'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
