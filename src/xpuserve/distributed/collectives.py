"""The collectives model code uses, over the one tensor/expert-parallel group; no-ops on one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from xpuserve.distributed.state import parallel_state


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (the partial outputs of row-parallel layers), in place."""
    if parallel_state().distributed:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., d] on every rank -> [..., d * world] in rank order (column-parallel outputs)."""
    state = parallel_state()
    if not state.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(state.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of every rank's value (e.g. how many KV blocks fit), so all ranks agree."""
    if not parallel_state().distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def comm_device(device: torch.device) -> torch.device:
    """Where small control tensors must live for the backend: host memory for gloo."""
    if not parallel_state().distributed or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return device
