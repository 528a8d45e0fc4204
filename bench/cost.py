"""Training cost of TBCM vs the sCM baseline (Tab. 3, Fig. 4 analogues), and of TBCM from an offline bank.

Each variant trains in its own process (honest peak memory) at equal pairs per optimiser step (prompts × K ×
(N − 1)): sCM reads K·(N − 1) images per prompt slot, DC-AE-encodes them and encodes their captions; TBCM
encodes one prompt per slot and rolls the teacher out K times; "bank" reads the same pairs as TBCM from a bank
built beforehand (bank.py; its build speed is reported apart) with no teacher, text encoder or DC-AE loaded.
Text encodings are not cached across steps here (train.py caches them, which only pays with few prompts): the
realistic case is a prompt set far larger than any cache, where Sana-Sprint encodes every caption it uses.

Per variant: the mean optimiser-step time after warm-up, time per pair, peak RSS (and the peak above the
interpreter's floor after `import torch`, which compresses ratios at small scale), and a Fig. 4-style breakdown:
per stage its time per step and its dynamic memory (the largest RSS rise while it runs). Stages: data loading,
VAE encoding, text encoding, teacher (rollout or CFG velocity), JVP, optimiser; the rest of a step is student
forward+backward (with loss, clipping, EMA, logging). Also: text encoding per pair vs K, the JVP in student
forward-pass equivalents, and 1-step student vs N-step teacher sampling throughput.
    python bench/cost.py --config small-sana      # the paper's setting at reduced width (512 px), ~15 min
    python bench/cost.py --quick                  # small-sana at 256 px, fewer steps: ≤ 5 min
    python bench/cost.py --config tiny-sana       # or digits
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SANA = ["--backbone", "sana", "--pool-steps", "1", "--filter-mode", "off", "--n-eval", "2"]
CONFIGS = {  # train.py flags shared by every variant; sana configs get --prompts-file (and --images for sCM)
    "small-sana": [*SANA, "--resolution", "512", "--N", "8", "--prompts", "1", "--K", "2",
                   "--max-sequence-length", "300"],
    "tiny-sana": [*SANA, "--tiny", "--resolution", "64", "--N", "8", "--prompts", "2", "--K", "2"],
    "digits": ["--backbone", "digits", "--N", "16", "--prompts", "4", "--K", "2", "--pool-steps", "1"],
}
VARIANTS = ("scm", "tbcm", "bank")
STAGES = ("data", "vae_encode", "text_encode", "teacher", "jvp", "optimizer")


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ worker
class Stages:
    """Wraps functions so that, once `active`, each call adds its wall time to a stage and records the
    stage's largest RSS rise (a sampling thread reads RSS every millisecond)."""

    def __init__(self, sync):
        self.sync, self.active, self.current = sync, False, None
        self.time, self.mem = defaultdict(float), defaultdict(float)
        self._entry = self._peak = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            if self.current is not None:
                self._peak = max(self._peak, rss_mb())
            time.sleep(0.001)

    def wrap(self, owner, attr: str, stage: str):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            if not self.active or self.current is not None:  # warm-up, or nested in another stage
                return fn(*a, **k)
            self.current, self._entry = stage, rss_mb()
            self._peak, t0 = self._entry, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.time[stage] += time.perf_counter() - t0
                self.mem[stage] = max(self.mem[stage], max(self._peak, rss_mb()) - self._entry)
                self.current = None

        setattr(owner, attr, timed)


def worker(variant: str, flags: list[str], steps: int, warmup: int) -> dict:
    """Train `warmup + steps` steps of one variant in this process; the measurements as a dict."""
    import tempfile

    import torch

    if "sana" in flags:  # the libraries' own footprint is not training memory (a GPU would not see it)
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    floor = rss_mb()  # the interpreter with torch (and diffusers), before any model is built
    import backbones
    import bank
    import loss
    import train

    out = tempfile.mkdtemp(prefix=f"cost-{variant}-")
    cfg = train.parse_args([*flags, "--steps", str(warmup + steps), "--log-every", "1",
                            "--ckpt-every", str(10**6), "--out", out, "--overwrite"])
    cuda = cfg.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stages = Stages(sync)
    t0 = time.perf_counter()
    bb = bank.BankBackbone(cfg, bank.Bank(cfg.bank, cfg.device)) if cfg.bank else backbones.build(cfg)
    load_s, base = time.perf_counter() - t0, rss_mb()
    # the stages (module attributes are what the loop looks up at call time)
    stages.wrap(backbones, "load_image", "data")
    stages.wrap(backbones, "encode_images", "vae_encode")
    stages.wrap(backbones, "encode_prompts", "text_encode")
    stages.wrap(bank.Bank, "part", "data")
    stages.wrap(train, "rollout", "teacher")
    stages.wrap(train, "forward_pairs", "teacher")
    stages.wrap(loss, "tangent_dF", "jvp")
    if cfg.backbone != "sana" and not cfg.bank:
        stages.wrap(bb, "real_data", "data")
    make_pool = train.make_pool

    def uncached_pool(cfg_, bb_, *a, **k):  # every prompt encoded afresh (see the module docstring)
        getattr(bb_, "_cache", {}).clear()
        return make_pool(cfg_, bb_, *a, **k)

    train.make_pool = uncached_pool
    ends: list[float] = []

    class TimedAdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            if stages.active:
                t = time.perf_counter()
                r = super().step(*a, **k)
                sync()
                stages.time["optimizer"] += time.perf_counter() - t
            else:
                r = super().step(*a, **k)
            ends.append(time.perf_counter())
            stages.active = len(ends) >= warmup
            return r

    torch.optim.AdamW = TimedAdamW
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train.train(cfg, bb, Path(out))
    n = len(ends) - warmup
    step_s = (ends[-1] - ends[warmup - 1]) / n
    pairs = cfg.prompts * cfg.K * (cfg.N - 1)
    per_step = {s: stages.time[s] / n for s in STAGES}
    per_step["student_fwd_bwd"] = max(step_s - sum(per_step.values()), 0.0)
    peak = peak_rss_mb()
    res = {"step_s": step_s, "time_per_pair_s": step_s / pairs, "pairs_per_step": pairs,
           "peak_rss_mb": peak, "rss_floor_mb": floor, "rss_after_load_mb": base,
           "peak_above_floor_mb": peak - floor, "load_s": load_s, "steps_measured": n,
           "stages": {s: {"s_per_step": per_step[s], "share": per_step[s] / step_s,
                          "dynamic_mem_mb": stages.mem.get(s, 0.0)} for s in per_step}}
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


# -------------------------------------------------------------------------------------- preparation
def prepare(config: str, work: Path, resolution: int) -> dict[str, list[str]]:
    """Inputs per variant: a prompts file of distinct prompts, captioned random images (sCM), the small
    pipeline (built once), and the flags each variant adds."""
    import numpy as np
    from PIL import Image

    flags = list(CONFIGS[config])
    if config == "small-sana":
        import sana

        folder = work / "pipeline"
        if not (folder / "model_index.json").exists():
            with sana.quiet_loading():
                sana.build_tiny_pipeline(folder, size="small")
        flags += ["--pretrained", str(folder)]
        flags[flags.index("--resolution") + 1] = str(resolution)
    extra = {"scm": ["--method", "scm"], "tbcm": [], "bank": []}
    if "sana" in config:
        colours = ["red", "blue", "green", "golden", "pale", "dark", "bright", "striped"]
        things = ["cat", "house", "river", "mountain", "car", "tree", "bird", "city"]
        places = ["at dawn", "in the rain", "on a hill", "by the sea", "in winter", "at night"]
        prompts = [f"a {c} {t} {p}, photo {i}" for i, (c, t, p) in
                   enumerate((c, t, p) for c in colours for t in things for p in places)]
        (work / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        images, res = work / f"images-{resolution}", int(flags[flags.index("--resolution") + 1])
        if not images.exists():
            images.mkdir(parents=True)
            rng = np.random.default_rng(0)
            for i in range(32):
                Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(images / f"{i}.png")
                (images / f"{i}.txt").write_text(f"{prompts[i * 11 % len(prompts)]}, image {i}\n")
        flags += ["--prompts-file", str(work / "prompts.txt")]
        extra["scm"] += ["--images", str(images)]
    return {v: [*flags, *extra[v]] for v in VARIANTS} | {"base": flags}


def run_worker(variant: str, flags: list[str], steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--warmup", str(warmup),
           "--flags", json.dumps(flags)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode:
        sys.exit(f"error: the {variant} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- extras
def extras(flags: list[str], Ks=(1, 2, 4, 8)) -> dict:
    """In this process: text encoding per pair vs K, the JVP in forward-pass equivalents, sampling."""
    import torch

    import backbones
    import train
    from loss import tangent_dF
    from sampler import consistency_sample, default_times
    from trajectory import reference_route, rollout
    from trigflow import TrigFlow

    cfg = train.parse_args([*flags, "--out", "/tmp/unused"])
    bb = backbones.build(cfg)

    def median_s(fn, reps=3, warm=True):
        if warm:
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    res = {}
    if cfg.backbone == "sana":
        names = iter(range(10**6))
        enc = median_s(lambda: backbones.encode_prompts(bb.parts, [f"a prompt number {next(names)}"], bb.L))
        pairs = cfg.N - 1
        res["text_encode"] = {"s_per_prompt": enc, "scm_s_per_pair": enc,  # one caption per pair
                              "tbcm_s_per_pair_by_K": {K: enc / (K * pairs) for K in Ks}}
    P = cfg.prompts * cfg.K * (cfg.N - 1)
    g = torch.Generator().manual_seed(0)
    x_t = cfg.sigma_d * torch.randn((P, *bb.data_shape), generator=g)
    t = torch.rand(P, generator=g) * 1.5 + 0.02
    dxdt = cfg.sigma_d * torch.randn((P, *bb.data_shape), generator=g)
    prompt = torch.arange(P) % bb.n_prompts
    cond, w = bb.cond(prompt), torch.full((P,), cfg.cfg_scales[0])
    F = TrigFlow(bb.student, guidance_scale=cfg.guidance_scale)

    def fwd():
        with torch.no_grad():
            F(x_t / cfg.sigma_d, t, cond, w)

    def fwd_bwd():
        F(x_t / cfg.sigma_d, t, cond, w).square().mean().backward()

    f = median_s(fwd)
    jvp = median_s(lambda: tangent_dF(lambda x, s: F(x, s, cond, w), x_t / cfg.sigma_d, t, dxdt,
                                      cfg.sigma_d))
    fb = median_s(fwd_bwd)
    res["jvp"] = {"batch": P, "forward_s": f, "jvp_s": jvp, "fwd_bwd_s": fb,
                  "jvp_in_forwards": jvp / f, "fwd_bwd_in_forwards": fb / f}
    B, N = min(P, 8), cfg.eval_teacher_steps
    z = cfg.sigma_d * torch.randn((B, *bb.data_shape), generator=g)
    route, times = reference_route(N, cfg.shift), default_times(1, cfg.t_mid)
    with torch.no_grad():
        teacher = median_s(lambda: rollout(bb.teacher, z, route, bb.cond(prompt[:B]), w[:B], cfg.sigma_d),
                           reps=1, warm=False)
        student = median_s(lambda: consistency_sample(lambda x, s: F(x, s, cond[:B] if not isinstance(
            cond, tuple) else tuple(c[:B] for c in cond), w[:B]), z, times, cfg.sigma_d, None))
    res["sampling"] = {"batch": B, "teacher_steps": N, "teacher_nfe": 2 * N,
                       "teacher_samples_per_s": B / teacher, "student_1step_samples_per_s": B / student,
                       "speedup": teacher / student}
    return res


# -------------------------------------------------------------------------------------------- main
def table(res: dict) -> str:
    v = res["variants"]
    rows = ["| | " + " | ".join(v) + " |", "|---" * (len(v) + 1) + "|"]
    rows.append("| time per pair (ms) | " + " | ".join(f"{x['time_per_pair_s'] * 1e3:.1f}" for x in v.values())
                + " |")
    rows.append("| step (s) | " + " | ".join(f"{x['step_s']:.2f}" for x in v.values()) + " |")
    rows.append("| peak RSS (MB) | " + " | ".join(f"{x['peak_rss_mb']:.0f}" for x in v.values()) + " |")
    rows.append("| peak above floor (MB) | " + " | ".join(f"{x['peak_above_floor_mb']:.0f}" for x in v.values())
                + " |")
    for s in (*STAGES, "student_fwd_bwd"):
        rows.append(f"| {s}: s/step (dyn. MB) | " + " | ".join(
            f"{x['stages'][s]['s_per_step']:.3f} ({x['stages'][s]['dynamic_mem_mb']:.0f})" for x in v.values())
            + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small-sana")
    p.add_argument("--quick", action="store_true", help="small-sana at 256 px, 2 measured steps (≤ 5 min)")
    p.add_argument("--steps", type=int, default=0, help="measured steps per variant (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=0, help="steps not measured (default 2, quick 1; the "
                   "first JVP sets up forward AD)")
    p.add_argument("--resolution", type=int, default=0, help="small-sana image side (default 512, quick 256)")
    p.add_argument("--work", default="runs/cost", help="pipeline, images and banks are kept here")
    p.add_argument("--json", default="", help="default bench/results/cost_<config>[_quick].json")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, json.loads(a.flags), a.steps, a.warmup)))
        return
    steps, warmup = a.steps or (2 if a.quick else 5), a.warmup or (1 if a.quick else 2)
    resolution = a.resolution or (256 if a.quick else 512)
    work = ROOT / a.work / f"{a.config}-{resolution}"
    work.mkdir(parents=True, exist_ok=True)
    flags = prepare(a.config, work, resolution)
    # the bank: exactly the pairs TBCM rolls out in the measured run (one pool per step)
    bank_dir = work / "bank"
    shutil.rmtree(bank_dir, ignore_errors=True)  # built afresh: its speed is measured
    t = time.perf_counter()
    p_build = subprocess.run([sys.executable, "bank.py", "build", "--out", str(bank_dir), "--pools",
                              str(warmup + steps), *flags["tbcm"]], cwd=ROOT, capture_output=True,
                             text=True, check=False)
    if p_build.returncode:
        sys.exit(f"error: bank build failed:\n{p_build.stderr[-3000:]}")
    build = json.loads(p_build.stdout.strip().splitlines()[-1]) | {"wall_with_load_s": time.perf_counter() - t}
    flags["bank"] = [*flags["tbcm"], "--bank", str(bank_dir)]
    variants = {}
    for v in VARIANTS:
        print(f"{a.config}: {v} ...", file=sys.stderr, flush=True)
        variants[v] = run_worker(v, flags[v], steps, warmup)
    print(f"{a.config}: extras ...", file=sys.stderr, flush=True)
    ex = extras(flags["tbcm"])
    s, tb, bk = variants["scm"], variants["tbcm"], variants["bank"]
    res = {"config": {"name": a.config, "resolution": resolution if "sana" in a.config else None,
                      "flags": flags["base"], "steps_measured": steps, "warmup": warmup,
                      "threads": os.cpu_count()},
           "variants": variants, "bank_build": build, "extras": ex,
           "ratios": {"tbcm_over_scm_time_per_pair": tb["time_per_pair_s"] / s["time_per_pair_s"],
                      "tbcm_over_scm_peak_memory": tb["peak_rss_mb"] / s["peak_rss_mb"],
                      "tbcm_over_scm_peak_above_floor": tb["peak_above_floor_mb"] / s["peak_above_floor_mb"],
                      "bank_over_scm_peak_memory": bk["peak_rss_mb"] / s["peak_rss_mb"],
                      "bank_over_scm_peak_above_floor": bk["peak_above_floor_mb"] / s["peak_above_floor_mb"],
                      "bank_over_tbcm_time_per_pair": bk["time_per_pair_s"] / tb["time_per_pair_s"]}}
    name = f"cost_{a.config}" + ("_quick" if a.quick else "")
    path = Path(a.json or ROOT / "bench" / "results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    md = table(res) + "\n\nratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()) + "\n"
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
