"""Beyond the paper: a LoRA student that shares the teacher's weights (peft, as diffusers uses).

`--student lora`: the student is the teacher's own module with a LoRA adapter on its linear (and
toy conv) layers, B = 0 at the start, so student = teacher at step 0 as with the full copy. The
guidance embedding (its output layer zero, Sana-Sprint) and the logvar head train fully; the base
stays frozen, in the teacher's dtype. The teacher's passes run the same module in `teacher_mode`:
adapter off, guidance branch's output zero, the teacher's attention processors: bit for bit the
frozen teacher. One copy of the weights; gradients, AdamW moments, EMA and checkpoints only for
what trains.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import parallel
import sana
import toy
from checkpoint import atomic_path, weights_sha256
from config import Config, UsageError

GUIDANCE = "guidance"  # a module whose name contains this is the guidance embedding: it trains
SANA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' Sana LoRA scripts' default
KINDS = (nn.Linear, nn.Conv2d)


def target_names(net: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Full names of the Linear/Conv2d modules to adapt: those ending in one of `suffixes`, or all
    (suffixes empty) outside the guidance embedding. Raises ValueError if none match."""
    names = [
        n
        for n, m in net.named_modules()
        if isinstance(m, KINDS) and GUIDANCE not in n
        if not suffixes or any(n == s or n.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise ValueError(f"no Linear or Conv2d module ends with any of {','.join(suffixes)}")
    return names


def add_lora(net: nn.Module, rank: int, alpha: float, suffixes: tuple[str, ...]) -> nn.Module:
    """Inject a LoRA adapter (peft, B = 0) into net in place; freeze the base; the adapter (fp32)
    and the guidance embedding (fp32) train. Returns net."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=target_names(net, suffixes)
    )
    net.requires_grad_(False)
    inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        if "lora_" in name or GUIDANCE in name:
            if p.dtype in (torch.bfloat16, torch.float16):  # fp32 master weights over bf16
                p.data = p.data.float()
            p.requires_grad_(True)
    net.lora_config = config
    return net


def param_groups(net: nn.Module, rest: list[nn.Parameter], lr: float, lora_lr: float) -> list:
    """AdamW's groups: what trains in net and then `rest` (the logvar head) at lr, the adapter at
    lora_lr. One group when lora_lr is 0 (or lr): the optimiser state of a single-rate run."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if lora_lr in (0, lr):
        return [{"params": [p for _, p in named] + rest}]
    adapter = [p for n, p in named if "lora_" in n]
    other = [p for n, p in named if "lora_" not in n] + rest
    return [{"params": other}, {"params": adapter, "lr": lora_lr}]


def trainable_names(net: nn.Module) -> list[str]:
    """State-dict names of what trains (checkpoints and export hold only these)."""
    return [n for n, p in net.named_parameters() if p.requires_grad]


class Trainable:
    """A module's trainable tensors as a state dict: what checkpoint.pack_state saves for it."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module, self.names = module, names

    def state_dict(self) -> dict[str, torch.Tensor]:
        full = self.module.state_dict()
        return {k: full[k] for k in self.names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError("the checkpoint's trainable tensors are not this LoRA student's")
        self.module.load_state_dict(state, strict=False)


def checkpointed(modules: dict[str, nn.Module], student: nn.Module) -> tuple[dict, str | None]:
    """What a training checkpoint holds of each module, and the base weights' hash: of a LoRA
    student (its `base_sha256` set) and its EMA only what trains, the hash to check on resume;
    otherwise every module whole and None."""
    base = getattr(student, "base_sha256", None)
    if base is None:
        return modules, None
    names = trainable_names(student)
    return {k: m if k == "head" else Trainable(m, names) for k, m in modules.items()}, base


def check_base(saved: str | None, base: str | None, run: Path, student: str) -> None:
    """--resume: a checkpoint of another kind of student, or of a LoRA student on other base
    weights than this teacher's, is refused (UsageError)."""
    if (saved is None) != (base is None):
        raise UsageError(f"--resume: the checkpoint in {run} is not of a --student {student}")
    if saved != base:
        raise UsageError(
            f"--resume: the checkpoint in {run} was trained on other base weights than this "
            "teacher's (LoRA students hold only their adapter); use the same teacher"
        )


@contextmanager
def teacher_mode(net: nn.Module, processors: dict[Any, Any] | None = None) -> Iterator[None]:
    """net as the frozen teacher: adapter off, the guidance embedding's output zero (so the time
    embedding is the teacher's exactly) and, if given, {attention: processor} swapped in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    guidance = [m for n, m in net.named_modules() if n.endswith(GUIDANCE + "_embedder")]
    hooks = [m.register_forward_hook(lambda m, i, out: torch.zeros_like(out)) for m in guidance]
    saved = {attn: attn.processor for attn in processors or {}}
    for m in layers:
        m.enable_adapters(False)
    for attn, proc in (processors or {}).items():
        attn.processor = proc
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for attn, proc in saved.items():
            attn.processor = proc
        for h in hooks:
            h.remove()


class TeacherView(nn.Module):
    """The teacher's v(x_FM, s, cond, None) from the shared LoRA module in teacher_mode (what the
    CFG TrigFlow teacher of pairs.py, metrics.py and analysis/ calls)."""

    def __init__(self, net: nn.Module, processors: dict | None = None, needs_guidance=False):
        super().__init__()
        # a plain attribute: the view holds no weights of its own (no state dict, one copy)
        self.__dict__["net"] = net
        self.processors, self.needs_guidance = processors, needs_guidance

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: Any, guidance=None) -> torch.Tensor:
        g = torch.zeros_like(s) if self.needs_guidance else None  # its output is zeroed
        with teacher_mode(self.net, self.processors):
            return self.net(x, s, cond, g)


def merged_copy(net: nn.Module) -> nn.Module:
    """A copy of the student with the adapter merged into the base and the LoRA layers replaced
    by their base layers: the plain architecture, loadable without peft (for export)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(net)
    for name, m in list(out.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, m.get_base_layer())
    out.__dict__.pop("lora_config", None)
    return out


def adapter_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in peft's format (adapter name dropped), plus the guidance embedding's full
    weights, which train too: with the teacher's weights, everything that makes the student."""
    from peft import get_peft_model_state_dict

    guidance = {n: p for n, p in net.named_parameters() if GUIDANCE in n}
    return {**get_peft_model_state_dict(net), **guidance}


def load_adapter(net: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """The student again from the teacher's module `net` (with its guidance embedding) and
    adapter_state's tensors: inject the adapter, then load; in place, returns net."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(config, net)
    guidance = {n: v for n, v in state.items() if GUIDANCE in n and "lora_" not in n}
    lora = {n: v for n, v in state.items() if n not in guidance}
    missing, unexpected = net.load_state_dict(guidance, strict=False)
    result = set_peft_model_state_dict(net, lora)
    if unexpected or result.unexpected_keys:
        raise ValueError(
            f"adapter tensors this module lacks: {unexpected or result.unexpected_keys}"
        )
    return net


def save_adapter(net: nn.Module, folder: Path) -> None:
    """adapter_state in peft's layout: adapter_config.json and adapter_model.safetensors (the
    guidance embedding's tensors under their own names beside the LoRA ones); load_adapter reads
    it back onto the teacher's module."""
    state = {k: v.detach().contiguous() for k, v in adapter_state(net).items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        net.lora_config.save_pretrained(str(tmp))
        save_file(state, tmp / "adapter_model.safetensors")


def with_lora(net: nn.Module, cfg: Config) -> nn.Module:
    """add_lora with the run's rank, alpha and targets (sana default: SANA_TARGETS)."""
    given = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    targets = given or (SANA_TARGETS if cfg.backbone == "sana" else ())
    try:
        with torch.random.fork_rng(devices=[]):  # A's random init: seeded, the global RNG untouched
            torch.manual_seed(cfg.seed)
            return add_lora(net, cfg.lora_rank, cfg.lora_alpha, targets)
    except ValueError as e:
        raise UsageError(f"--lora-targets: {e}") from e


def toy_lora(net: nn.Module, cfg: Config) -> tuple[nn.Module, nn.Module]:
    """A toy teacher net turned LoRA student in place (base hash kept), and its teacher view."""
    base = weights_sha256(net)
    toy.zero_guidance(net)  # as student_from_teacher (the teacher never feeds guidance)
    student = with_lora(net, cfg).train()
    student.base_sha256 = base
    return student, TeacherView(student)


def sana_lora(tr: Any, timestep_scale: float, cfg: Config) -> tuple[nn.Module, nn.Module]:
    """The Sana-Sprint student built on the teacher's weights in their dtype, with a LoRA adapter
    (base hash kept), and its teacher view (the teacher's own attention processors)."""
    base = weights_sha256(tr)
    with torch.random.fork_rng(devices=parallel.rng_devices(cfg.device)):
        torch.manual_seed(cfg.seed)
        try:
            shared = sana.make_student(tr, timestep_scale, tr.dtype)
        except ValueError as e:
            raise UsageError(str(e)) from e
    procs = {m.attn2: m.attn2.processor for m in shared.modules() if getattr(m, "attn2", None)}
    if cfg.grad_checkpointing:
        shared.enable_gradient_checkpointing()
    student = with_lora(sana.SanaVelocity(sana.jvp_safe(shared), 1.0), cfg)
    student.base_sha256 = base
    return student, TeacherView(student, procs, needs_guidance=True)
