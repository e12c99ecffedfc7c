"""The interface every device family implements. Model and engine code ask the platform;
they never branch on a device name. Each fast op has a plain-PyTorch fallback here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpuserve.quantization import fp8, int8


class Platform:
    """What the engine asks of a device family. Subclasses override what differs."""

    name = "base"  # torch device type, as in "cuda:0"
    dist_backend = "gloo"  # torch.distributed backend between devices of this kind

    @classmethod
    def is_available(cls) -> bool:
        return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"device type '{cls.name}' is not available on this machine"

    # --- devices -------------------------------------------------------------------------
    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.name if index is None else f"{self.name}:{index}")

    def device_count(self) -> int:
        return 1

    def device_name(self, device: torch.device) -> str:
        return self.name

    def memory_info(self, device: torch.device) -> tuple[int, int] | None:
        """(free, total) bytes of device memory, or None where the device shares host memory."""
        return None

    def synchronize(self, device: torch.device | None = None) -> None:
        """Wait for queued kernels (device work is asynchronous on accelerators)."""

    def empty_cache(self) -> None:
        """Give cached, unused device memory back to the driver."""

    # --- what the hardware computes natively -----------------------------------------------
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def matmul_kinds(self) -> frozenset[str]:
        """Matmul input types with native hardware support: bf16, fp16, fp8, int8."""
        return frozenset({"bf16", "fp16"})

    def int8_activations(self) -> bool:
        """Quantize activations too (W8A8) when weights are INT8: only where an INT8 matmul is fast."""
        return "int8" in self.matmul_kinds()

    def kernels(self) -> dict[str, str]:
        """Which kernel each operation runs on this device, for `xpuserve env` and bug reports."""
        int8 = "W8A8 (INT8 activations)" if self.int8_activations() else "weight-only"
        return {"matmul": f"torch's, native for {', '.join(sorted(self.matmul_kinds())) or 'no low-precision type'}",
                "INT8": int8, "attention": "the input's dtype"}

    # --- ops, with plain-PyTorch fallbacks -------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] float, weight [N, K] int8 with per-row scale [N] float32: weight-only INT8."""
        return self.linear(x, int8.dequantize(weight, scale, x.dtype), bias)

    def w8a8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """INT8 x INT8 with dynamic per-token activation scales; accumulates in int32."""
        x_q, x_scale = int8.quantize_per_token(x)
        acc = self.int8_matmul(x_q.view(-1, x.shape[-1]), weight)
        y = (acc.float() * x_scale.view(-1, 1) * scale.float()).to(x.dtype).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def int8_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [M, K] int8 @ b [N, K]^T int8 -> [M, N] int32."""
        return torch._int_mm(a, b.t())

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """weight [N, K] float8_e4m3fn with scale_inv [N, ceil(K/128)]: one scale per row and 128 columns."""
        return self.linear(x, fp8.dequantize_rows(weight, scale_inv, x.dtype), bias)

    def head_linear(self, x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Per head h: x[:, h] @ weight[h]^T for weight [H, M, K], or x[:, h] @ weight[h] for weight [H, K, M]
        when `transposed`; x [T, H, K] -> [T, H, M] (MLA's absorbed decode)."""
        w = weight if transposed else weight.transpose(1, 2)
        return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)

    def fuses_experts(self, x: torch.Tensor, w13: torch.Tensor, int8_activations: bool) -> bool:
        """Whether fused_experts runs a MoE layer's routed experts on x (else the model loops over them)."""
        return False

    def fused_experts(self, x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert: int) -> torch.Tensor:
        """All routed experts of a layer in one op (kernels.gemm.fused_experts has the contract)."""
        raise NotImplementedError

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order the checkpoints were trained with.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    # Whether decode steps run captured unless the user says (--enforce-eager / --no-enforce-eager).
    captures_decode = False

    def capture_decode(self, model: torch.nn.Module):
        """The model's forward for pure decode steps as a compiled/captured graph, or None where the
        platform has none (decode runs eagerly, the reference path)."""
        return None

    def attention_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype attention scores are computed in for inputs of `dtype`."""
        return dtype

    # --- dtype choice ----------------------------------------------------------------------
    def auto_dtype(self, checkpoint_dtype: str | None, weight_kind: str = "float") -> tuple[torch.dtype, str]:
        """Activation dtype when the user says 'auto', and why: the checkpoint's, bf16 for FP8/INT8 ones."""
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(checkpoint_dtype or "", torch.bfloat16)
        return dtype, f"{str(dtype).removeprefix('torch.')} as the checkpoint"
