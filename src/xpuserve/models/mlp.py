import torch
import torch.nn.functional as F
from torch import nn

from xpuserve.models.linear import Linear, PackedLinear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up packed into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)
