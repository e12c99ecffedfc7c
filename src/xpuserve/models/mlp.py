import torch
import torch.nn.functional as F
from torch import nn

from xpuserve.models.parallel import PackedColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up packed into one matmul.

    Across ranks the intermediate features are split: gate/up by rows, down by columns, then one
    all-reduce (`reduce=False`: the caller sums the partial output with others first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, reduce: bool = True):
        super().__init__()
        parts = {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        self.gate_up_proj = PackedColumnParallelLinear(hidden_size, parts, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)
