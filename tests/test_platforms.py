"""Platform selection, clear errors for missing devices, and the serving format per platform."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from oracle import make_checkpoint
from xpuserve.config import ModelConfig
from xpuserve.platforms import PLATFORMS, DeviceError, current_platform, resolve_device
from xpuserve.platforms.cpu import CpuPlatform
from xpuserve.kernels import gemm
from xpuserve.platforms.cuda import CudaPlatform, matmul_kinds
from xpuserve.platforms.npu import NpuPlatform
from xpuserve.weights.format import choose_format

V3 = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
          qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def config(torch_dtype: str, quantization: dict | None = None) -> ModelConfig:
    return ModelConfig.from_dict({**V3, "torch_dtype": torch_dtype, "quantization_config": quantization})


class Hopper(CudaPlatform):
    """What CudaPlatform reports on an H100/H800/H200 (compute capability 9.0)."""

    def matmul_kinds(self):
        return matmul_kinds((9, 0))


class Ampere(CudaPlatform):
    def matmul_kinds(self):
        return matmul_kinds((8, 0))


class Ascend(NpuPlatform):
    """NpuPlatform's answers need no device; only availability does."""


def test_auto_picks_the_first_available_in_npu_cuda_cpu_order():
    assert list(PLATFORMS) == ["npu", "cuda", "cpu"]
    platform, device = resolve_device("auto")
    expected = next(name for name, cls in PLATFORMS.items() if cls.is_available())
    assert platform.name == expected == device.type and current_platform() is platform


def test_npu_without_torch_npu_is_one_clear_sentence():
    if NpuPlatform.is_available():
        pytest.skip("this machine has an Ascend NPU")
    with pytest.raises(DeviceError, match="needs torch_npu.*pip install"):
        resolve_device("npu:0")
    result = subprocess.run([sys.executable, "-m", "xpuserve", "generate", "nonexistent", "--prompt", "x", "--device", "npu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "torch_npu" in result.stderr


def test_cuda_request_on_a_cpu_only_torch_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="CUDA build of torch|finds no GPU"):
        resolve_device("cuda")


def test_unknown_device_and_missing_index():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="does not exist"):
        resolve_device("cpu:3")


def test_interface_answers_on_cpu():
    cpu = CpuPlatform()
    assert cpu.dist_backend == "gloo" and NpuPlatform.dist_backend == "hccl" and CudaPlatform.dist_backend == "nccl"
    assert cpu.device(None) == torch.device("cpu") and CudaPlatform().device(1) == torch.device("cuda:1")
    assert torch.float32 in cpu.supported_dtypes() and torch.float16 not in cpu.supported_dtypes()
    assert ("bf16" in cpu.matmul_kinds()) == cpu.native_bf16
    assert cpu.memory_info(torch.device("cpu")) is None
    x, w = torch.randn(5, 8), torch.rand(8) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(cpu.rms_norm(x, w, 1e-6), ref, atol=1e-6)


def test_matmul_kinds_by_cuda_capability():
    assert matmul_kinds((7, 5)) == {"fp16", "int8"}
    assert matmul_kinds((8, 0)) == {"fp16", "int8", "bf16"}
    assert "fp8" in matmul_kinds((8, 9)) and "fp8" in matmul_kinds((9, 0))


def test_fp8_checkpoint_stays_fp8_only_where_fp8_matmul_exists():
    fp8 = config("bfloat16", FP8)
    hopper = choose_format(Hopper(), fp8)
    assert hopper.weights.kind == "fp8" and hopper.dtype == torch.bfloat16 and "has FP8 matmul" in hopper.reason
    for platform in (Ampere(), Ascend()):
        fmt = choose_format(platform, fp8)
        assert fmt.weights.kind == "float" and fmt.dtype == torch.bfloat16, platform.name
        assert "dequantized on load" in fmt.reason and "no FP8 matmul" in fmt.reason


def test_int8_uses_int8_activations_where_an_int8_matmul_exists():
    for platform, w8a8 in ((Hopper(), True), (Ascend(), True), (CpuPlatform(), False)):
        for checkpoint in (config("bfloat16", FP8), config("bfloat16")):
            fmt = choose_format(platform, checkpoint, quantization="int8")
            assert fmt.weights.kind == "int8" and fmt.weights.int8_activations is w8a8
    converted = choose_format(Ascend(), config("bfloat16", {"quant_method": "int8"}))
    assert converted.weights.kind == "int8" and "INT8 checkpoint" in converted.reason


def test_cpu_serves_bf16_checkpoints_in_bf16():
    """With or without native bf16: without it, xpuserve's GEMM reads the bf16 weights (half the bytes)."""
    cpu = CpuPlatform()
    assert gemm.available()  # CI has a compiler; without one a CPU lacking native bf16 serves float32
    fmt = choose_format(cpu, config("bfloat16"))
    assert fmt.dtype == torch.bfloat16
    assert cpu.native_bf16 or "xpuserve's GEMM" in fmt.reason
    assert choose_format(cpu, config("float16")).dtype == torch.float32  # fp16 matmuls are emulated on CPUs
    assert choose_format(cpu, config("float32")).dtype == torch.float32
    assert choose_format(cpu, config("bfloat16"), dtype="bfloat16").dtype == torch.bfloat16  # asked for


def test_unknown_quantization_is_named():
    with pytest.raises(ValueError, match="quantization 'int4' is not supported"):
        choose_format(CpuPlatform(), config("bfloat16"), quantization="int4")


def test_generate_prints_the_format_and_its_reason(tmp_path):
    from oracle import write_char_tokenizer

    make_checkpoint("qwen2", tmp_path)
    write_char_tokenizer(tmp_path, 256)
    result = subprocess.run(
        [sys.executable, "-m", "xpuserve", "generate", str(tmp_path), "--prompt", "ab", "--max-tokens", "2",
         "--device", "cpu", "--quantization", "int8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "weights int8 weight-only, activations bfloat16" in result.stderr
