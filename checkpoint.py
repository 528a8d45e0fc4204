"""Atomic checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `step-XXXXXXX/` holding `tensors.safetensors` and `state.json`; it is written under a
temporary name and renamed into place, so a kill never leaves a half-written checkpoint that `latest` would pick.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (`opt/<param>/<key>`) and a JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for p, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{p}/{k}"] = v
            else:
                scalars[f"{p}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `flatten_optimizer`."""
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt/"):
            _, p, k = name.split("/", 2)
            state.setdefault(int(p), {})[k] = v
    for name, v in meta["scalars"].items():
        p, k = name.split("/", 1)
        state.setdefault(int(p), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `folder/step-<step>` atomically and keep only the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "tensors.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint under folder, or None."""
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder written by `save`."""
    return load_file(path / "tensors.safetensors"), json.loads((path / "state.json").read_text())
