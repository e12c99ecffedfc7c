"""Serving one model across ranks: process group from torchrun, lock-step steps, liveness."""

from xpuserve.distributed import liveness
from xpuserve.distributed.collectives import all_gather_last_dim, all_reduce, comm_device, min_over_ranks
from xpuserve.distributed.state import ParallelState, init_distributed, parallel_state, rank_device

__all__ = [
    "ParallelState", "all_gather_last_dim", "all_reduce", "comm_device", "init_distributed", "liveness",
    "min_over_ranks", "parallel_state", "rank_device",
]
