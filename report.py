"""The run's figures and summary: samples.png (teacher N-step beside student 1/2/4-step on the same
noise and prompts) and training.png (loss, ‖g‖, r, kept share by step), from metrics and log.jsonl.
Matplotlib lives here and in analysis/, never in the concept files. Also the generated blocks of
README.md and docs/: numbers that scripts write between `<!-- key -->` and `<!-- /key -->`.
"""

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def to_image(x: torch.Tensor):
    """[C, H, W] in [−1, 1] → [H, W, C] in [0, 1] (single channel squeezed)."""
    img = ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def samples_png(path: Path, shown: dict[str, torch.Tensor], prompt_names: list[str]) -> None:
    """One row per sampler (images) or one scatter panel per sampler (2-D); same noise, prompts."""
    names = list(shown)
    if next(iter(shown.values())).dim() == 2:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            x = shown[name]
            color = torch.arange(len(x)) % len(prompt_names)
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=color.numpy(), cmap="tab10", s=2)
            ax.set_title(name), ax.set_aspect("equal")
            ax.set_xlim(-2.2, 2.2), ax.set_ylim(-2.2, 2.2)
    else:
        m = len(shown[names[0]])
        fig, axes = plt.subplots(
            len(names), m, figsize=(0.6 * m + 1.2, 0.7 * len(names)), squeeze=False
        )
        for i, name in enumerate(names):
            for j in range(m):
                ax = axes[i, j]
                ax.imshow(to_image(shown[name][j]), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
            axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        for j in range(m):
            axes[0, j].set_title(prompt_names[j % len(prompt_names)][:12], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_png(path: Path, log_path: Path) -> None:
    """Loss (and by t-bin), ‖g‖ before normalisation, r, and the share the filter kept, by step."""
    recs = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    step = [r["step"] for r in recs]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.2))
    ax[0].plot(step, [r["loss"] for r in recs], label="all", color="k")
    for k in range(len(recs[0]["loss_by_t_bin"])):
        ax[0].plot(step, [r["loss_by_t_bin"][k] for r in recs], lw=0.8, label=f"t-bin {k}")
    ax[0].set_title("loss (weighted, with logvar)"), ax[0].legend(fontsize=7)
    ax[1].plot(step, [r["g_norm"] for r in recs]), ax[1].set_title("‖g‖ before normalisation")
    ax[1].set_yscale("log")
    ax[2].plot(step, [r["r"] for r in recs]), ax[2].set_title("r")
    ax[3].plot(step, [r["kept"] for r in recs])
    ax[3].set_title("share kept by the brightness filter")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(metrics: dict, run: Path) -> None:
    """Print the evaluation as a small table."""
    ev = metrics["eval"]
    print(
        f"\n{metrics['backbone']} · {metrics['method']} · {metrics['train']['steps']} steps in "
        f"{metrics['train']['wall_s']:.0f} s · {ev['distance_name']} (lower is better)"
    )
    print(f"  {'data (floor)':14s} distance {ev['data']['distance']:.4f}")
    for name, v in ev.items():
        if isinstance(v, dict) and "nfe" in v:
            print(
                f"  {name:14s} distance {v['distance']:.4f}  alignment {v['alignment']:.3f}  "
                f"nfe {v['nfe']:3d}  {v['samples_per_s']:.0f} samples/s"
            )
    print(f"  run directory: {run}")


ROOT = Path(__file__).resolve().parent
# Each generated block → the page that holds it; tests/test_docs.py checks each against its source.
PAGES = {
    **{f"quality_{t}": "docs/results.md" for t in ("main", "schemes", "steps", "r_final")},
    "quality_r_schedule": "docs/results.md",
    "equivalent_noise": "docs/results.md",
    "tsne": "docs/results.md",
    "quality_lora": "docs/lora.md",
    "cost_small-sana": "docs/cost.md",
    "cost_small-sana_sweep": "docs/cost.md",
    "cost_paper-sana": "docs/cost.md",
    "cost_small-sana_lora": "docs/lora.md",
    "bank_digits": "docs/bank.md",
    "cost_shard": "docs/sharded_memory.md",
    "optimizer_state": "docs/optimizers.md",
    "quality_optimizer": "docs/optimizers.md",
    "gpu_memory": "README.md",
}


def page(key: str) -> Path:
    """The markdown file that holds the generated block `key` (PAGES)."""
    if key not in PAGES:
        raise KeyError(f"no page holds the block {key!r}; add it to report.PAGES")
    return ROOT / PAGES[key]


def span(text: str, key: str) -> tuple[int, int]:
    """Block `key` of a markdown text: (just after the line `<!-- key -->`, the start of the line
    `<!-- /key -->`); the block's text is what lies between, its last newline excluded."""
    begin, end = f"<!-- {key} -->\n", f"<!-- /{key} -->"
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0 or text[j - 1] != "\n":
        raise ValueError(f"no block <!-- {key} --> … <!-- /{key} --> on lines of their own")
    return i + len(begin), j


def block(path: Path, key: str) -> str:
    """The text between the lines `<!-- key -->` and `<!-- /key -->` of a markdown file."""
    text = path.read_text()
    try:
        i, j = span(text, key)
    except ValueError as e:
        raise ValueError(f"{path} has {e}") from None
    return text[i : max(i, j - 1)]


def replace_block(path: Path, key: str, new: str) -> None:
    """Replace block(path, key) with `new` (written to a sibling, then renamed in one step)."""
    text = path.read_text()
    i, j = span(text, key)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text[:i] + new.rstrip("\n") + "\n" + text[j:])
    os.replace(tmp, path)
    print(f"replaced the block {key} in {path}")


def publish(md_path: Path, md: str, more: dict[str, str] | None = None) -> None:
    """Write a result's markdown; for a committed result (bench/results/<key>.md) also replace the
    block `key` where a page holds it (PAGES), and the blocks in `more` (key → markdown)."""
    md_path.write_text(md)
    if md_path.resolve().parent == ROOT / "bench" / "results":
        blocks = {md_path.stem: md} if md_path.stem in PAGES else {}
        for key, text in (blocks | (more or {})).items():
            replace_block(page(key), key, text)
