"""The optimiser state of the Sana-Sprint students at the paper's shapes, AdamW against CAME
(optimizers.state_numel per parameter, the students counted on the meta device: no weights).
Writes bench/results/optimizer_state.json and .md, and the block of docs/optimizers.md.
    python bench/optimizer_state.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from cost_shard import transformer

import report
from config import Parser
from optimizers import state_numel

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"0.6B": "paper", "1.6B": "paper-1.6b"}  # sana_tiny.SIZES: Sana-Sprint 0.6B and 1.6B


def state(size: str) -> dict:
    """Parameters and fp32 optimiser state (GiB) of the student at sana_tiny.SIZES[size]."""
    with torch.device("meta"):
        student = transformer(size, guidance_embeds=True, guidance_embeds_scale=0.1)
    shapes = [p.shape for p in student.parameters()]
    gb = {o: 4 * sum(state_numel(s, o) for s in shapes) / 2**30 for o in ("adamw", "came")}
    params = sum(s.numel() for s in shapes)
    return dict(params=params, adamw_gb=gb["adamw"], came_gb=gb["came"])


def markdown(res: dict) -> str:
    rows = [
        "| student | parameters | AdamW state GiB | CAME state GiB | CAME/AdamW |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        ratio = r["came_gb"] / r["adamw_gb"]
        rows.append(
            f"| Sana-Sprint {name} | {r['params'] / 1e9:.3f} B | {r['adamw_gb']:.2f} | "
            f"{r['came_gb']:.2f} | {ratio:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default="bench/results",
        help="folder of the JSON and markdown (default: bench/results)",
    )
    a = p.parse_args(argv)
    res = {name: state(size) for name, size in SIZES.items()}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimizer_state.json").write_text(json.dumps(res, indent=1))
    report.publish(out / "optimizer_state.md", markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
