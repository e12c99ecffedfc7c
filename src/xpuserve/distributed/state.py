"""Which rank this process is and how the model is split: set once, from torchrun's environment.

Like the selected platform, the parallel layout is process-wide: torch.distributed's default
process group is, and every sharded layer must agree with it. One group serves tensor and expert
parallelism (EP = TP, as in vLLM), so the collectives use the default group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from xpuserve.platforms import DeviceError
from xpuserve.platforms.base import Platform

# A collective that waits longer than this is taken as a hung or dead peer. Ranks never wait
# longer legitimately: an idle driver sends a heartbeat step every engine/lockstep.py HEARTBEAT_S.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    expert_parallel: bool = False

    @property
    def tp_rank(self) -> int:
        return self.rank

    @property
    def tp_size(self) -> int:
        return self.world_size

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and serves HTTP; the others follow its steps."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def set_parallel_state(state: ParallelState) -> None:
    global _state
    _state = state


def collective_timeout_s() -> float:
    return float(os.environ.get("XPUSERVE_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT_S))


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when started as a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK as torchrun sets it; 0 when started as a plain process."""
    return int(os.environ.get("RANK", "0"))


def rank_device(platform: Platform, device: str) -> str:
    """The device this rank loads onto: with several ranks, the accelerator of its LOCAL_RANK."""
    device = platform.name if device == "auto" else device
    if platform.name == "cpu" or launched_world_size() == 1:
        return device
    if ":" in device:  # every rank would take that one device
        raise DeviceError(f"--device {device} names one device for {launched_world_size()} ranks: give the type only "
                          f"('{platform.name}'); each rank takes its LOCAL_RANK's device (choose them with "
                          "CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES)")
    return f"{platform.name}:{os.environ.get('LOCAL_RANK', '0')}"


def init_distributed(platform: Platform, tensor_parallel_size: int, expert_parallel: bool) -> ParallelState:
    """Joins the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Idempotent: a second engine in the same processes reuses the group."""
    world = launched_world_size()
    if world != tensor_parallel_size:
        if world == 1:
            raise ValueError(
                f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} processes: launch with "
                f"torchrun --nproc-per-node {tensor_parallel_size} -m xpuserve serve ... --tensor-parallel-size {tensor_parallel_size}"
            )
        raise ValueError(f"torchrun started {world} processes but --tensor-parallel-size is {tensor_parallel_size}; they must be equal")
    if world == 1:
        set_parallel_state(ParallelState(expert_parallel=expert_parallel))
        return _state
    from xpuserve.distributed import liveness

    liveness.resume()
    if not dist.is_initialized():
        store, rank, size = next(dist.rendezvous("env://"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if platform.name != "cpu":
            torch.accelerator.set_device_index(local_rank)
        timeout = timedelta(seconds=collective_timeout_s())
        dist.init_process_group(platform.dist_backend, store=dist.PrefixStore("xpuserve/pg", store), rank=rank,
                                world_size=size, timeout=timeout)
        liveness.start(store, rank, size)
    set_parallel_state(ParallelState(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), expert_parallel))
    return _state
