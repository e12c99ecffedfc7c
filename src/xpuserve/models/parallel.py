"""Tensor-parallel layers: each rank holds a slice of a layer and loads only that slice.

- Column-parallel: output features split; each rank computes its own outputs, no communication.
- Row-parallel: input features split; each rank computes a partial sum, then one all-reduce
  (or none, when the caller sums several partial outputs with one all-reduce of its own).
- Vocab-parallel embedding and head: vocabulary rows split (padded to a multiple of the ranks);
  the embedding all-reduces the rows each rank found, the head all-gathers the logits.
On one rank every class computes and loads exactly as its plain counterpart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xpuserve.distributed import all_gather_last_dim, all_reduce, parallel_state
from xpuserve.models.linear import Linear, PackedLinear, current_weight_format, matmul, quantized_weight, weight_rows
from xpuserve.models.shard import shard


def divide(size: int, what: str) -> int:
    ranks = parallel_state().tp_size
    if size % ranks:
        raise ValueError(f"{what} ({size}) is not divisible by --tensor-parallel-size {ranks}")
    return size // ranks


def rank_range(size: int, what: str) -> tuple[int, int]:
    """This rank's contiguous [start, stop) of `size` items split evenly."""
    local = divide(size, what)
    rank = parallel_state().tp_rank
    return rank * local, (rank + 1) * local


class ColumnParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantize: bool = True, what: str = "output features"):
        self.rows = rank_range(out_features, what)
        super().__init__(in_features, self.rows[1] - self.rows[0], bias, quantize)

    def checkpoint_views(self, name: str) -> dict[str, object]:
        return {key: shard(view, 0, *self.rows) for key, view in super().checkpoint_views(name).items()}


class PackedColumnParallelLinear(PackedLinear):
    """Packed projections (gate/up, q/k/v), each split by its own rows: `parts` gives their full
    sizes (split evenly), or `ranges` every part's [start, stop) in its checkpoint tensor on this rank."""

    def __init__(self, in_features: int, parts: dict[str, int] | None = None, bias: bool = False,
                 ranges: dict[str, tuple[int, int]] | None = None):
        self.ranges = ranges or {part: rank_range(size, part) for part, size in parts.items()}
        super().__init__(in_features, {part: stop - start for part, (start, stop) in self.ranges.items()}, bias)

    def checkpoint_views(self, name: str) -> dict[str, object]:
        views = super().checkpoint_views(name)
        parent = name.rpartition(".")[0]
        for key in views:
            part = key[len(parent) + 1 :].rpartition(".")[0]
            views[key] = shard(views[key], 0, *self.ranges[part])
        return views


class RowParallelLinear(Linear):
    """`reduce=False` leaves the partial sum to the caller (MoE sums experts and shared experts once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantize: bool = True,
                 reduce: bool = True, what: str = "input features"):
        self.cols = rank_range(in_features, what)
        super().__init__(self.cols[1] - self.cols[0], out_features, bias, quantize)
        self.reduce = reduce
        self.state = parallel_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.distributed:
            return super().forward(x)
        bias = self.bias if self.state.tp_rank == 0 else None  # added once to the sum
        y = matmul(x, self.weight, self.weight_scale, bias, self.int8_activations)
        return all_reduce(y) if self.reduce else y

    def checkpoint_views(self, name: str) -> dict[str, object]:
        views = super().checkpoint_views(name)
        views[f"{name}.weight"] = shard(views[f"{name}.weight"], 1, *self.cols)
        return views


class VocabParallelHead(nn.Module):
    """The output head: this rank's rows of the vocabulary; logits gathered from every rank.

    `quantize`: stored INT8 when the model's weights are (as llama.cpp's Q8_0 does; FP8 checkpoints
    keep it in bf16, as DeepSeek releases it). At batch 1 the head is a large share of the bytes a
    step reads (a quarter in the benchmark model); activations stay float, so only the weight rounds.
    """

    def __init__(self, vocab_size: int, hidden_size: int, quantize: bool = False):
        super().__init__()
        state = parallel_state()
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // state.tp_size)
        self.start, self.stop = min(state.tp_rank * per_rank, vocab_size), min((state.tp_rank + 1) * per_rank, vocab_size)
        kind = "int8" if quantize and current_weight_format().kind == "int8" else "float"
        self.model_dtype = torch.get_default_dtype()
        self.weight, self.weight_scale = quantized_weight((per_rank, hidden_size), kind)
        if self.stop - self.start < per_rank:
            self.weight.data[self.stop - self.start :].zero_()  # padding rows: their logits are cut off

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = matmul(hidden, self.weight, self.weight_scale)
        if self.weight.shape[0] == self.vocab_size:
            return logits
        return all_gather_last_dim(logits)[..., : self.vocab_size]

    def checkpoint_views(self, name: str) -> dict[str, object]:
        rows = weight_rows(self.weight, self.weight_scale, slice(0, self.stop - self.start), self.model_dtype)
        return {f"{name}.weight": shard(rows, 0, self.start, self.stop)}


class VocabParallelEmbedding(VocabParallelHead):
    """Each rank looks up the ids in its rows (zeros elsewhere); one all-reduce completes them.
    With tied embeddings it is the head too."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == self.vocab_size:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.stop - self.start)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return all_reduce(out)
