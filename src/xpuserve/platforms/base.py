from __future__ import annotations

import torch
import torch.nn.functional as F


class Platform:
    """What the engine asks of a device family. Subclasses override what differs."""

    name = "base"

    @classmethod
    def is_available(cls) -> bool:
        return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"device type '{cls.name}' is not available on this machine"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    def attention_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype attention scores are computed in for inputs of `dtype`."""
        return dtype

    def memory_info(self, device: torch.device) -> tuple[int, int] | None:
        """(free, total) bytes of device memory, or None where the device shares host memory."""
        return None

    def auto_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """Serving dtype when the user says 'auto': the checkpoint's, with FP8 stored as bf16."""
        return {"float32": torch.float32, "float16": torch.float16}.get(checkpoint_dtype or "", torch.bfloat16)
