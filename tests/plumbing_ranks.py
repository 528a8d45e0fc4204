"""train.py's main as one rank of torchrun, saving the pairs this rank draws in each step to
DRAWN/rank-<r>.safetensors (`<step>/<key>`), for tests/test_plumbing.py::test_one_pool_per_rank:

    python -m torch.distributed.run --nproc_per_node=2 -m tests.plumbing_ranks DRAWN <flags>
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

import train
from pairs import PairPool
from parallel import ranks


def main(drawn: str, argv: list[str]) -> int:
    rank = ranks()[0]
    batches, draw = [], PairPool.next

    def recorded(pool: PairPool, n: int) -> dict:
        batches.append(draw(pool, n))
        return batches[-1]

    PairPool.next = recorded
    code = train.main(argv)
    tensors = {f"{s}/{k}": v.contiguous() for s, b in enumerate(batches) for k, v in b.items()}
    save_file(tensors, Path(drawn) / f"rank-{rank}.safetensors")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
