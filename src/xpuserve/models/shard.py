"""What a layer declares it holds of a checkpoint tensor under tensor or expert parallelism.

A `Shard` wraps the usual load target (a tensor view, Int8Rows or Fp8Rows) with the range of the
checkpoint tensor it takes along one dimension; `OTHER_RANK` marks a checkpoint tensor another
rank holds (a routed expert under expert parallelism). weights/shard.py reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from xpuserve.distributed.state import parallel_state

OTHER_RANK = object()


@dataclass
class Shard:
    target: object  # what the rank holds: a tensor view, Int8Rows or Fp8Rows
    dim: int  # 0: rows (output features, vocabulary, heads); 1: columns (input features)
    start: int
    stop: int


def shard(target, dim: int, start: int, stop: int):
    """`target` takes [start, stop) of the checkpoint tensor along `dim`; on one rank, all of it."""
    return target if not parallel_state().distributed else Shard(target, dim, start, stop)
