"""Everything written to disk, atomic and pickle-free: tensors in safetensors, the rest in JSON.

Writers go through `atomic_path` (a temporary sibling renamed into place): a kill never leaves half
a file that a reader would take for whole. A training checkpoint is a folder `step-XXXXXXX/` with
`state.json` and `tensors.safetensors` (`student/…`, `head/…`, `ema/…`, `opt/<param>/<key>`).
"""

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def atomic_path(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling `.tmp-<name>-<pid>` of `final` to write (a file or a folder); when
    the block ends without error it is renamed to `final` in one step (replace=False: kept only if
    `final` does not exist by then, e.g. when another process finished the same folder first);
    otherwise it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():  # as any file this user creates (safetensors writes 0600)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        if final.exists() and not replace:
            return
        if tmp.is_dir():
            _remove(final)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """JSON, indented, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# -------------------------------------------------------------------------------- training state
def pack_state(modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Modules' state dicts as `<name>/<key>` tensors, plus the optimiser as `opt/<param>/<key>`
    tensors and a JSON-able rest. No RNG state: `pairs.seeded` redraws pairs from their seeds."""
    tensors = {f"{name}/{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    sd, scalars = opt.state_dict(), {}
    for p, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{p}/{k}"] = v
            else:
                scalars[f"{p}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_state(
    modules: dict[str, nn.Module], opt: torch.optim.Optimizer, tensors: dict, meta: dict
) -> None:
    """Inverse of `pack_state`, in place."""
    for name, m in modules.items():
        prefix = f"{name}/"
        m.load_state_dict(
            {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        )
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt/"):
            _, p, k = name.split("/", 2)
            state.setdefault(int(p), {})[k] = v
    for name, v in meta["scalars"].items():
        p, k = name.split("/", 1)
        state.setdefault(int(p), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def skipped_note(path: Path) -> str | None:
    """--resume from checkpoint `path` (`latest`): the line that names the incomplete checkpoint
    folders after it, skipped; None if there are none."""
    skipped = [p.name for p in sorted(path.parent.glob("step-*")) if p.name > path.name]
    if skipped:
        return f"--resume: skipped incomplete {', '.join(skipped)}; resuming from {path.name}"
    return None


def targets(
    modules: dict[str, nn.Module], params: list[torch.Tensor], names: dict
) -> dict[str, torch.Tensor]:
    """For each `pack_state` name in `names`, the tensor of the state it loads into: a module's
    own, or for `opt/<p>/<key>` the optimiser's parameter p (its moments have its shape and, under
    FSDP2, its sharding); a name with no such tensor (the step count) is left out."""
    own = {f"{n}/{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    index = {k: int(k.split("/")[1]) for k in names if k.startswith("opt/")}
    opt = {k: params[i] for k, i in index.items() if i < len(params)}
    return {k: own.get(k, opt.get(k)) for k in names if k in own or k in opt}


def save(
    folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2
) -> Path:
    """Write checkpoint `folder/step-<step>` atomically; keep the newest `keep` complete ones."""
    final = folder / f"step-{step:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            tmp / "tensors.safetensors",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    # only complete checkpoints count: a half-written folder never pushes out a good one
    for old in [p for p in sorted(folder.glob("step-*")) if complete(p)][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(path: Path) -> bool:
    """Whether checkpoint folder `path` is whole: state.json parses and tensors.safetensors is as
    long as its header says. `save` renames only whole folders into place; this catches the rest
    (a copy cut short, a folder being deleted)."""
    try:
        json.loads((path / "state.json").read_text())
        with open(path / "tensors.safetensors", "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # safetensors: an 8-byte little-endian header length, the JSON header, the data
            n = int.from_bytes(f.read(8), "little")
            if 8 + n > size:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, cut or garbled
        return False
    return size == 8 + n + max(ends, default=0)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint under folder, or None."""
    done = [p for p in sorted(folder.glob("step-*")) if complete(p)]
    return done[-1] if done else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder written by `save`."""
    return load_file(path / "tensors.safetensors"), json.loads((path / "state.json").read_text())


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint: the log reads as one unbroken run."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] < step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------- cached modules, hashes
def config_hash(cfg: Any) -> str:
    """Cache key of a config dataclass: 10 hex digits of SHA-256 over its sorted JSON."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def save_module(net: nn.Module, cfg: Any, folder: Path) -> None:
    """model.safetensors, then config.json (whose presence marks a complete entry), both atomic."""
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, tmp)
    write_json(folder / "config.json", dataclasses.asdict(cfg))


def seeded_or_cached(
    make: Callable[[Any], nn.Module], cfg: Any, folder: Path, device: str
) -> tuple[nn.Module, bool]:
    """A net built from cfg with seeded initialisation (global RNG untouched), loaded from folder if
    cached there by `save_module`; returns (net, cached). Cached nets come back in eval mode with
    gradients off."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = make(cfg).to(device)
    if (folder / "config.json").is_file():
        net.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
        return net.eval().requires_grad_(False), True
    return net, False


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's tensors in state-dict order; names (a wrapper's prefix) are ignored.
    Half-precision tensors are hashed as float32 (exact), so that a teacher held in bf16
    (--frozen-precision) and its fp32 copy (bank training loads one) agree."""
    h = hashlib.sha256()
    for v in module.state_dict().values():
        v = v.float() if v.dtype in (torch.bfloat16, torch.float16) else v
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
