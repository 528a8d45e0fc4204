"""Training cost of TBCM vs the sCM baseline (Tab. 3, Fig. 4 analogues), and of TBCM from an offline bank.

Each variant trains in its own process at equal pairs per optimiser step (prompts × K × (N − 1)): sCM reads
K·(N − 1) captioned images per prompt slot, DC-AE-encodes them and encodes their captions; TBCM encodes one
prompt per slot and rolls the teacher out K times; "bank" reads the same pairs as TBCM from a bank built
beforehand (bank.py; its build speed is reported apart) with no teacher, text encoder or DC-AE loaded. Text
encodings are not cached across steps here (train.py caches them, which only pays with few prompts): the
realistic case is a prompt set far larger than any cache, where Sana-Sprint encodes every caption it uses.

Per variant: the mean optimiser-step time after warm-up, time per pair, and a Fig. 4-style breakdown (per stage:
time per step and dynamic memory, the largest RSS rise while it runs) over data loading, VAE encoding, text
encoding, teacher (rollout or CFG velocity), JVP and optimiser; the rest of a step is the student's forward +
backward (loss, clipping, EMA, logging). Peak memory (VmHWM at the last step, and above the floor of the
interpreter with its libraries) comes from a second run under MALLOC_ENV. Also: text encoding per pair vs K, the
JVP in forward-pass equivalents, 1-step student vs N-step teacher sampling throughput; `--sweep`: peak memory
at several resolutions with a line fitted per variant.
    python bench/cost.py --config small-sana      # the paper's setting at reduced width (512 px), ~6 min
    python bench/cost.py --quick                  # small-sana at 256 px, fewer steps: ~2 min
    python bench/cost.py --sweep 256,512,1024     # peak memory only, ~9 min
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
                   "--max-sequence-length", "300", "--grad-checkpointing"],
    "tiny-sana": [*SANA, "--tiny", "--resolution", "64", "--N", "8", "--prompts", "2", "--K", "2"],
    "digits": ["--backbone", "digits", "--N", "16", "--prompts", "4", "--K", "2", "--pool-steps", "1"],
}
VARIANTS = ("scm", "tbcm", "bank")
# memory runs: glibc returns freed blocks ≥ 64 KB to the OS at once, so RSS follows live tensors (as CUDA's
# allocator statistics would) rather than heap fragments kept from earlier stages; the same for every variant
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
STAGES = ("data", "vae_encode", "text_encode", "teacher", "jvp", "optimizer")


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# ------------------------------------------------------------------------------------------ worker
class Stages:
    """Wraps functions so that, once `active`, each call adds its wall time to a stage and records the
    stage's largest memory rise: RSS (a sampling thread reads it every millisecond), or on CUDA the
    allocator's peak above what was allocated at entry (`cuda_peak` keeps the overall peak across resets)."""

    def __init__(self, sync, cuda: bool = False):
        self.sync, self.cuda, self.active, self.current = sync, cuda, False, None
        self.time, self.mem = defaultdict(float), defaultdict(float)
        self._entry = self._peak = self.cuda_peak = 0.0
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
            if self.cuda:
                import torch

                self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated() / 2**20)
                torch.cuda.reset_peak_memory_stats()
                cuda_entry = torch.cuda.memory_allocated() / 2**20
            self.current, self._entry = stage, rss_mb()
            self._peak, t0 = self._entry, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                self.time[stage] += time.perf_counter() - t0
                rise = (torch.cuda.max_memory_allocated() / 2**20 - cuda_entry if self.cuda
                        else max(self._peak, rss_mb()) - self._entry)
                self.mem[stage] = max(self.mem[stage], rise)
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
    stages = Stages(sync, cuda)
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
    peaks: dict[str, float] = {}

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
            if len(ends) == warmup + steps:  # the training peak (a checkpoint is saved after this)
                peaks["train"] = peak_rss_mb()
                if cuda:
                    peaks["cuda"] = max(stages.cuda_peak, torch.cuda.max_memory_allocated() / 2**20)
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
    peak = peaks["train"]
    res = {"step_s": step_s, "time_per_pair_s": step_s / pairs, "pairs_per_step": pairs,
           "peak_rss_mb": peak, "rss_floor_mb": floor, "rss_after_load_mb": base,
           "peak_above_floor_mb": peak - floor, "load_s": load_s, "steps_measured": n,
           "stages": {s: {"s_per_step": per_step[s], "share": per_step[s] / step_s,
                          "dynamic_mem_mb": stages.mem.get(s, 0.0) if s in STAGES else None}
                      for s in per_step}}  # the student's forward+backward is the rest: no stage of its own
    if cuda:
        res["cuda_peak_mb"] = peaks["cuda"]
    return res


# -------------------------------------------------------------------------------------- preparation
def prepare(config: str, work: Path, resolution: int, pretrained: str = "",
            extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Inputs per variant: a prompts file of distinct prompts, captioned random images (sCM), the small
    pipeline (built once) or the user's, and the flags each variant adds (`extra`: to train.py, for all)."""
    import numpy as np
    from PIL import Image

    flags = list(CONFIGS[config])
    if config == "small-sana":
        import sana

        folder = Path(pretrained) if pretrained else work / "pipeline"
        if not (folder / "model_index.json").exists():
            with sana.quiet_loading():
                sana.build_tiny_pipeline(folder, size="small")
        flags += ["--pretrained", str(folder)]
        flags[flags.index("--resolution") + 1] = str(resolution)
    own = {"scm": ["--method", "scm"], "tbcm": [], "bank": []}
    if "sana" in config:
        colours = ["red", "blue", "green", "golden", "pale", "dark", "bright", "striped"]
        things = ["cat", "house", "river", "mountain", "car", "tree", "bird", "city"]
        places = ["at dawn", "in the rain", "on a hill", "by the sea", "in winter", "at night"]
        prompts = [f"a {c} {t} {p}, photo {i}" for i, (c, t, p) in
                   enumerate((c, t, p) for c in colours for t in things for p in places)]
        (work / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        images, res = work / f"images-{resolution}", int(flags[flags.index("--resolution") + 1])
        if not images.exists():  # written under a temporary name: a killed run leaves no partial folder
            tmp = images.with_name(images.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            rng = np.random.default_rng(0)
            for i in range(32):
                Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
                (tmp / f"{i}.txt").write_text(f"{prompts[i * 11 % len(prompts)]}, image {i}\n")
            tmp.rename(images)
        flags += ["--prompts-file", str(work / "prompts.txt")]
        own["scm"] += ["--images", str(images)]
    flags += extra
    return {v: [*flags, *own[v]] for v in VARIANTS} | {"base": flags}


def run_worker(variant: str, flags: list[str], steps: int, warmup: int, memory: bool = False) -> dict:
    """One variant in a fresh process; with `memory`, under MALLOC_ENV (honest RSS, slower steps)."""
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--warmup", str(warmup),
           "--flags", json.dumps(flags)]
    env = {**os.environ, **(MALLOC_ENV if memory else {}), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if p.returncode:
        sys.exit(f"error: the {variant} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


MEMORY_KEYS = ("peak_rss_mb", "rss_floor_mb", "rss_after_load_mb", "peak_above_floor_mb", "cuda_peak_mb")


def measure(variant: str, flags: list[str], steps: int, warmup: int) -> dict:
    """Times from a run with the default allocator, memory from a second run under MALLOC_ENV (which
    makes every large allocation an mmap, so it would slow the step it measures)."""
    timed = run_worker(variant, flags, steps, warmup)
    mem = run_worker(variant, flags, min(steps, 2), warmup, memory=True)
    for k in MEMORY_KEYS:
        if k in mem:
            timed[k] = mem[k]
    for name, stage in timed["stages"].items():
        stage["dynamic_mem_mb"] = mem["stages"][name]["dynamic_mem_mb"]
    return timed


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

    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)

    def median_s(fn, reps=3, warm=True):
        if warm:
            fn()
        ts = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
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
    dev = cfg.device
    x_t = (cfg.sigma_d * torch.randn((P, *bb.data_shape), generator=g)).to(dev)
    t = (torch.rand(P, generator=g) * 1.5 + 0.02).to(dev)
    dxdt = (cfg.sigma_d * torch.randn((P, *bb.data_shape), generator=g)).to(dev)
    prompt = (torch.arange(P) % bb.n_prompts).to(dev)
    cond, w = bb.cond(prompt), torch.full((P,), cfg.cfg_scales[0], device=dev)
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
    z = (cfg.sigma_d * torch.randn((B, *bb.data_shape), generator=g)).to(dev)
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
def mb(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def table(res: dict) -> str:
    v = res["variants"]
    rows = ["| | " + " | ".join(v) + " |", "|---" * (len(v) + 1) + "|"]
    rows.append("| time per pair (ms) | " + " | ".join(f"{x['time_per_pair_s'] * 1e3:.1f}" for x in v.values())
                + " |")
    rows.append("| step (s) | " + " | ".join(f"{x['step_s']:.2f}" for x in v.values()) + " |")
    rows.append("| peak RSS (MB) | " + " | ".join(f"{x['peak_rss_mb']:.0f}" for x in v.values()) + " |")
    if all("cuda_peak_mb" in x for x in v.values()):
        rows.append("| CUDA peak (MB) | " + " | ".join(f"{x['cuda_peak_mb']:.0f}" for x in v.values()) + " |")
    rows.append("| peak above floor (MB) | " + " | ".join(f"{x['peak_above_floor_mb']:.0f}" for x in v.values())
                + " |")
    for s in (*STAGES, "student_fwd_bwd"):
        rows.append(f"| {s}: s/step (dyn. MB) | " + " | ".join(
            f"{x['stages'][s]['s_per_step']:.3f} ({mb(x['stages'][s]['dynamic_mem_mb'])})" for x in v.values())
            + " |")
    return "\n".join(rows)


def build_bank(work: Path, flags: list[str], pools: int) -> dict:
    """The bank of exactly the pairs TBCM rolls out in a run of `pools` steps (one pool per step), built
    afresh (its speed is measured) by bank.py in its own process."""
    bank_dir = work / "bank"
    shutil.rmtree(bank_dir, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "bank.py", "build", "--out", str(bank_dir), "--pools", str(pools),
                        *flags], cwd=ROOT, capture_output=True, text=True, check=False)
    if p.returncode:
        sys.exit(f"error: bank build failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"wall_with_load_s": time.perf_counter() - t}


# the paper's Tab. 3 (sCM 62.9 GB / 7965 GPU·h, TBCM 22.6 GB / 4640 GPU·h) and issue #7's bank targets
CLAIMS = (("tbcm_over_scm_time_per_pair", 4640 / 7965, "TBCM/sCM training time (Tab. 3: 0.58)"),
          ("tbcm_over_scm_peak_memory", 22.6 / 62.9, "TBCM/sCM peak memory (Tab. 3: 0.36)"),
          ("bank_over_scm_peak_memory", 0.2, "bank/sCM peak memory (target 0.2)"),
          ("bank_over_tbcm_time_per_pair", 1.0, "bank/TBCM time per pair (target < 1)"))


def claim_lines(ratios: dict) -> list[str]:
    return [f"{text}: measured {ratios[key]:.2f}, " + ("reproduced" if ratios[key] <= target
                                                        else "not reproduced at this scale")
            for key, target, text in CLAIMS]


def sweep(resolutions: list[int], work_root: Path, warmup: int, pretrained: str = "",
          extra: tuple[str, ...] = ()) -> dict:
    """Peak memory of the three variants on small-sana at several resolutions (memory runs only), and per
    variant a least-squares line peak_above_floor = a + b·pixels: b_tbcm/b_scm is the ratio that large
    images approach at this width, a the resolution-independent part (weights, optimiser state)."""
    import numpy as np

    rows = []
    for res in resolutions:
        work = work_root / f"small-sana-{res}"
        work.mkdir(parents=True, exist_ok=True)
        flags = prepare("small-sana", work, res, pretrained, extra)
        build_bank(work, flags["tbcm"], warmup + 1)
        flags["bank"] = [*flags["tbcm"], "--bank", str(work / "bank")]
        row = {"resolution": res}
        for v in VARIANTS:
            print(f"sweep {res} px: {v} ...", file=sys.stderr, flush=True)
            m = run_worker(v, flags[v], 1, warmup, memory=True)
            row[v] = {k: m[k] for k in ("peak_rss_mb", "peak_above_floor_mb", "rss_after_load_mb")} | {
                "dynamic_mem_mb": {s: m["stages"][s]["dynamic_mem_mb"] for s in STAGES}}
        rows.append(row)
    px = np.array([r["resolution"] ** 2 for r in rows], dtype=float)
    fits = {}
    for v in VARIANTS:
        b, a = np.polyfit(px, [r[v]["peak_above_floor_mb"] for r in rows], 1)
        fits[v] = {"mb_fixed": a, "mb_per_megapixel": b * 1e6}
    lim = {f"{v}_over_scm_large_images": fits[v]["mb_per_megapixel"] / fits["scm"]["mb_per_megapixel"]
           for v in ("tbcm", "bank")}
    return {"config": "small-sana", "rows": rows, "fits": fits, "limits": lim}


def sweep_table(res: dict) -> str:
    out = ["| resolution | sCM peak (MB) | TBCM | bank | sCM VAE-encode dyn. | TBCM/sCM | bank/sCM |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        s, t, b = (r[v]["peak_rss_mb"] for v in VARIANTS)
        out.append(f"| {r['resolution']} px | {s:.0f} | {t:.0f} | {b:.0f} | "
                   f"{r['scm']['dynamic_mem_mb']['vae_encode']:.0f} | {t / s:.2f} | {b / s:.2f} |")
    f = res["fits"]
    out += ["", "peak above floor ≈ fixed + slope·pixels: " + ", ".join(
        f"{v} {f[v]['mb_fixed']:.0f} MB + {f[v]['mb_per_megapixel']:.0f} MB/Mpx" for v in VARIANTS),
        "ratios approached by large images at this width: " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["limits"].items())]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small-sana")
    p.add_argument("--quick", action="store_true", help="small-sana at 256 px, 2 measured steps (≤ 5 min)")
    p.add_argument("--steps", type=int, default=0, help="measured steps per variant (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=0, help="steps not measured (default 2, quick 1; the "
                   "first JVP sets up forward AD)")
    p.add_argument("--resolution", type=int, default=0, help="small-sana image side (default 512, quick 256)")
    p.add_argument("--sweep", default="", metavar="R1,R2,...", help="small-sana peak memory only, at these "
                   "resolutions (e.g. 256,512,1024), with a line fitted per variant")
    p.add_argument("--pretrained", default="", metavar="DIR", help="small-sana: this local SanaPipeline "
                   "folder instead of the small random one (e.g. the paper's teacher, on a GPU)")
    p.add_argument("--work", default="runs/cost", help="pipeline, images and banks are kept here")
    p.add_argument("--json", default="", help="default bench/results/cost_<config or pretrained>[_quick|_sweep]"
                   ".json")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more train.py flags after --, for every variant "
                   "(e.g. -- --device cuda --precision bf16)")
    a = p.parse_args()
    extra = tuple(x for x in a.extra if x != "--")
    if a.pretrained and a.config != "small-sana":
        p.error("--pretrained is for --config small-sana")
    if a.pretrained and not (Path(a.pretrained) / "model_index.json").exists():
        p.error(f"--pretrained {a.pretrained}: no model_index.json there (a local SanaPipeline folder)")
    if a.worker:
        print(json.dumps(worker(a.worker, json.loads(a.flags), a.steps, a.warmup)))
        return
    steps, warmup = a.steps or (2 if a.quick else 5), a.warmup or (1 if a.quick else 2)
    if a.sweep:
        try:
            resolutions = [int(r) for r in a.sweep.split(",")]
        except ValueError:
            p.error(f"--sweep takes comma-separated integers, got {a.sweep!r}")
        if len(resolutions) < 2 or any(r < 64 or r % 32 for r in resolutions):
            p.error("--sweep needs at least two resolutions, each a multiple of 32 and at least 64")
        res = sweep(resolutions, ROOT / a.work, warmup, a.pretrained, extra)
        md = sweep_table(res) + "\n"
        name = "cost_pretrained_sweep" if a.pretrained else "cost_small-sana_sweep"
    else:
        resolution = a.resolution or (256 if a.quick else 512)
        work = ROOT / a.work / f"{a.config}-{resolution}"
        work.mkdir(parents=True, exist_ok=True)
        flags = prepare(a.config, work, resolution, a.pretrained, extra)
        build = build_bank(work, flags["tbcm"], warmup + steps)
        flags["bank"] = [*flags["tbcm"], "--bank", str(work / "bank")]
        variants = {}
        for v in VARIANTS:
            print(f"{a.config}: {v} ...", file=sys.stderr, flush=True)
            variants[v] = measure(v, flags[v], steps, warmup)
        print(f"{a.config}: extras ...", file=sys.stderr, flush=True)
        ex = extras(flags["tbcm"])
        s, tb, bk = variants["scm"], variants["tbcm"], variants["bank"]
        mem = "cuda_peak_mb" if "cuda_peak_mb" in s else "peak_rss_mb"  # on a GPU, the GPU's memory
        ratios = {"tbcm_over_scm_time_per_pair": tb["time_per_pair_s"] / s["time_per_pair_s"],
                  "tbcm_over_scm_peak_memory": tb[mem] / s[mem],
                  "tbcm_over_scm_peak_above_floor": tb["peak_above_floor_mb"] / s["peak_above_floor_mb"],
                  "bank_over_scm_peak_memory": bk[mem] / s[mem],
                  "bank_over_scm_peak_above_floor": bk["peak_above_floor_mb"] / s["peak_above_floor_mb"],
                  "bank_over_tbcm_time_per_pair": bk["time_per_pair_s"] / tb["time_per_pair_s"]}
        res = {"config": {"name": a.config, "resolution": resolution if "sana" in a.config else None,
                          "flags": flags["base"], "steps_measured": steps, "warmup": warmup,
                          "threads": os.cpu_count(), "peak_memory": mem},
               "variants": variants, "bank_build": build, "extras": ex, "ratios": ratios,
               "claims": claim_lines(ratios)}
        md = (table(res) + "\n\nratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + "\n\n"
              + "\n\n".join(res["claims"]) + "\n")
        name = ("cost_pretrained" if a.pretrained else f"cost_{a.config}") + ("_quick" if a.quick else "")
    path = Path(a.json or ROOT / "bench" / "results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
