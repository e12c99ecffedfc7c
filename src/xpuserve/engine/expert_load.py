"""How busy each routed expert, and so each rank, has been: what the planner needs to judge
expert placement. The router runs on every rank, so any rank (rank 0) knows every expert's count."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from xpuserve.models.moe import Experts


@dataclass
class ExpertLoad:
    tokens_per_expert: list[list[int]]  # [MoE layer][expert]: tokens routed there since start-up
    experts_per_rank: list[tuple[int, int]]  # [rank]: the experts [first, stop) it holds (all, without EP)

    @property
    def tokens_per_rank(self) -> list[int]:
        """(token, expert) pairs each rank computed, summed over layers. Without expert parallelism
        every rank computes all of them, each with its share of the features."""
        return [sum(sum(layer[first:stop]) for layer in self.tokens_per_expert) for first, stop in self.experts_per_rank]


def expert_load(model: nn.Module, world_size: int = 1) -> ExpertLoad | None:
    """None for a dense model."""
    layers = [m for m in model.modules() if isinstance(m, Experts)]
    if not layers:
        return None
    counts = [layer.tokens_per_expert.tolist() for layer in layers]
    num_experts = len(counts[0])
    if layers[0].expert_parallel:
        per_rank = num_experts // world_size
        placement = [(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]
    else:
        placement = [(0, num_experts)] * world_size
    return ExpertLoad(counts, placement)
