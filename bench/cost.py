"""Training cost of TBCM vs the sCM baseline per optimiser step, each variant in its own process (Tab. 3 analogue).

Both variants train on the same number of pairs per step (prompts × K × (N − 1)); a step's time is the median of
the per-step wall times logged after a warm-up, and memory is the process's peak RSS (honest per variant).
    python bench/cost.py --config tiny-sana      # the tiny random Sana pipeline (DC-AE + Gemma-2 + transformer)
    python bench/cost.py --config digits
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # train.py flags shared by both variants
    "tiny-sana": ["--backbone", "sana", "--tiny", "--resolution", "64", "--N", "8", "--prompts", "2", "--K", "2",
                  "--pool-steps", "1", "--n-eval", "4", "--eval-teacher-steps", "4"],
    "digits": ["--backbone", "digits", "--N", "16", "--prompts", "4", "--K", "2", "--pool-steps", "1",
               "--n-eval", "200"],
}


def image_folder(root: Path, n: int = 16) -> Path:
    """Random RGB images with same-name captions, the sCM baseline's data on Sana."""
    import numpy as np
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a random picture number {i}\n")
    return folder


def measure(flags: list[str], method: str, steps: int, warmup: int, out: Path, cache: str) -> dict:
    """One train.py process; per-step time from log.jsonl, peak RSS from metrics.json."""
    cmd = [sys.executable, "train.py", *flags, "--method", method, "--steps", str(steps), "--log-every", "1",
           "--ckpt-every", str(10**6), "--out", str(out), "--overwrite", "--cache-dir", cache]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    walls = [json.loads(ln)["wall_s"] for ln in (out / "log.jsonl").read_text().splitlines()]
    step_s = statistics.median(b - a for a, b in zip(walls[warmup:], walls[warmup + 1:]))
    m = json.loads((out / "metrics.json").read_text())
    pairs = m["train"]["pairs_per_s"] * m["train"]["wall_s"] / m["train"]["steps"]  # pairs per step
    return {"step_s": step_s, "time_per_pair_s": step_s / pairs, "pairs_per_step": pairs,
            "peak_rss_mb": m["train"]["peak_rss_mb"], "stages": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny-sana")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="logged steps ignored (first JVP sets up forward AD)")
    p.add_argument("--cache-dir", default="runs")
    p.add_argument("--json", default="", help="default bench/results/cost_<config>.json")
    a = p.parse_args()
    flags = list(CONFIGS[a.config])
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for method in ("scm", "tbcm"):
            extra = ["--images", str(image_folder(Path(tmp)))] if method == "scm" and "sana" in a.config else []
            variants[method] = measure([*flags, *extra], method, a.steps, a.warmup, Path(tmp) / method,
                                       a.cache_dir)
    res = {"config": {"name": a.config, "flags": flags, "steps": a.steps, "warmup": a.warmup},
           "variants": variants,
           "ratios": {"tbcm_over_scm_time_per_pair": variants["tbcm"]["time_per_pair_s"]
                      / variants["scm"]["time_per_pair_s"],
                      "tbcm_over_scm_peak_memory": variants["tbcm"]["peak_rss_mb"] / variants["scm"]["peak_rss_mb"]}}
    path = Path(a.json or ROOT / "bench" / "results" / f"cost_{a.config}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
