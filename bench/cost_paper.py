"""A part of `bench/cost.py --config paper-sana`, in its own process: Tab. 3's memory at the paper's
shapes (sana_tiny.SIZES["paper"], random weights), measured piece by piece. Prints one JSON line.

resident-<variant>: the models each variant holds, then the student's optimiser state (one step
on zero gradients); stage-<name>[-<px>]: one stage of the training step at two batch sizes, its
memory rise above what was alive at entry and its time; direct-<variant>-512: a whole training
step (cost_step.train_steps) with the peak reset after the models are built (-vae8: sCM's
DC-AE 8 images per call, 8 pairs per step, two steps: the second meets the optimiser's state).
The recipe in a name: AdamW and gradient checkpointing unless it says -came (the official
optimiser, optimizers.Came) or -nockpt (--no-grad-checkpointing).
Memory: the RSS on a CPU (peak: VmHWM, reset through /proc/self/clear_refs; the weights in memory
of their own: sana.hold_in_memory), the allocator on CUDA (and its peaks over the part).
    python bench/cost_paper.py --part stage-jvp-512 --folder DIR --work DIR
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from cost_compose import PARTS, flags, recipe_of
from cost_stages import Meter, stage
from cost_step import Stages, build, train_steps

import optimizers
from config import Config, Parser, UsageError, parse_args, validate
from loss import LogvarHead
from runtime import set_threads


def tensor_mb(*modules: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in m.parameters()) / 2**20


def config(argv: list[str]) -> Config:
    cfg = parse_args(argv)
    validate(cfg, run_dir=False)
    return cfg


def resident(cfg: Config, meter: Meter) -> dict:
    """The variant's models (what cost_step.build holds), then the student's
    gradient and optimiser state (cfg.optimizer) after one step on zero gradients."""
    floor = meter.now()
    student, source = build(cfg, Stages(cfg.device), own_memory=not meter.cuda)
    teacher = getattr(source, "teacher", None)
    frozen = {}
    if teacher is not None:  # a LoRA student's teacher is the student (parts.transformer None)
        p = teacher.parts
        frozen = dict(teacher=p.transformer, text_encoder=p.text_encoder, vae=p.vae)
        frozen = {k: m for k, m in frozen.items() if m is not None}  # TBCM: no DC-AE
    models = meter.now()
    head = LogvarHead().to(cfg.device)
    params = [q for q in student.parameters() if q.requires_grad] + list(head.parameters())
    opt = optimizers.build([{"params": params}], cfg)
    for q in params:
        q.grad = torch.zeros_like(q)
    opt.step()
    with_grads = meter.now()
    opt.zero_grad(set_to_none=True)
    tensors = {k: tensor_mb(m) for k, m in frozen.items()} | dict(student=tensor_mb(student))
    trains = [q for q in student.parameters() if q.requires_grad]  # LoRA: the adapter, not θ
    state = sum(optimizers.state_numel(q.shape, cfg.optimizer) * 4 for q in trains) / 2**20
    trains = sum(q.numel() * q.element_size() for q in trains) / 2**20
    return dict(
        models_mb=models - floor,
        optimizer_state_mb=meter.now() - models,
        grads_mb=with_grads - meter.now(),
        resident_mb=meter.now() - floor,
        tensor_mb=tensors | dict(trainable=trains, optimizer_state=state, grads=trains),
        floor_mb=floor,
    )


def direct(cfg: Config, meter: Meter, steps: int = 1) -> dict:
    """Whole training steps (cost_step.train_steps), the peak reset once the models are built;
    stages as cost_step times them. One step peaks where AdamW's state is first allocated; a
    stage before the backward pass (sCM's DC-AE) meets that state only from the second step."""
    floor, stages = meter.now(), Stages(cfg.device)
    try:
        student, source = build(cfg, stages, own_memory=not meter.cuda)
        loaded = meter.now()
        meter.reset_peak()
        t = time.perf_counter()
        train_steps(cfg, student, source, stages, steps=steps, warmup=0)
        step_s, peak = (time.perf_counter() - t) / steps, meter.peak()
        peak = max(peak, stages.cuda_peak) if meter.cuda else peak  # Stages resets CUDA's peak
        meter.cuda_peak = max(meter.cuda_peak, stages.cuda_peak)  # for meter.device_peaks
    finally:
        stages.close()
    pairs = cfg.prompts * cfg.K * (cfg.N - 1)
    st = {s: dict(s=stages.time[s] / steps, dynamic_mb=stages.mem[s]) for s in stages.time}
    return dict(
        steps=steps,
        peak_above_floor_mb=peak - floor,
        loaded_above_floor_mb=loaded - floor,
        step_s=step_s,
        pairs=pairs,
        vae_batch=cfg.vae_batch if cfg.method == "scm" else None,
        stages=st,
        floor_mb=floor,
    )


def run_part(part: str, folder: str, work: Path, device: str, precision: str) -> dict:
    """The part's measurement (see the module docstring)."""
    kind, rest = part.split("-", 1)
    res = int(rest.rsplit("-", 1)[1]) if rest[-1].isdigit() else 512
    variant = rest.split("-")[0] if kind in ("resident", "direct") else "tbcm"
    variant += "-lora" * ("lora" in rest.split("-"))  # ours: the LoRA student (lora.py)
    # -vae<B>: sCM's DC-AE B images per call, B pairs per step (N = B + 1), two steps
    vae_batch = int(rest.split("vae")[1].split("-")[0]) if "-vae" in rest else 1
    argv = flags(folder, work, res, variant, device, precision, vae_batch, recipe_of(part))
    cfg = config(argv + ["--N", str(vae_batch + 1)] * (vae_batch > 1))
    set_threads(cfg.threads)
    meter = Meter(device)
    import diffusers  # noqa: F401  the libraries' own footprint is not training memory
    import transformers  # noqa: F401

    if kind == "resident":
        out = resident(cfg, meter)
    elif kind == "stage":
        out = stage(rest.split("-")[0], cfg, meter)
    elif kind == "direct":
        out = direct(cfg, meter, steps=2 if vae_batch > 1 else 1)
    else:
        raise UsageError(f"--part {part}: one of {', '.join(PARTS)}")
    info = dict(part=part, resolution=res, device=device, precision=precision)
    return info | dict(threads=torch.get_num_threads()) | out | meter.device_peaks()


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0], usage=__doc__.split("\n")[-2].strip())
    p.add_argument("--part", required=True, choices=[x for x in PARTS if x != "bank-512"])
    p.add_argument("--folder", required=True, help="the paper-size SanaPipeline folder")
    p.add_argument("--work", required=True, help="prompts, images and banks (bench/cost.py)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--precision", default="bf16", help="autocast of the passes (default: bf16)")
    try:
        a = p.parse_args(sys.argv[1:] if argv is None else argv)
        res = run_part(a.part, a.folder, Path(a.work), a.device, a.precision)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
