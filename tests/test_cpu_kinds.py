"""Every CPU kernel path on whatever CPU runs the suite: kernels this CPU can run are run (weaker
ATen levels in a subprocess with ATEN_CPU_CAPABILITY), stronger ones are checked at their guard,
and a CpuPlatform built from hand-made CpuFeatures takes the choices another CPU would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oracle import make_checkpoint, random_prompts, write_char_tokenizer
from test_fp8 import ODD_SHAPES
from xpuserve.generate import prompt_logits
from xpuserve.models.linear import Linear
from xpuserve.platforms import PLATFORMS
from xpuserve.platforms.cpu import BF16_UPCAST_ROWS, CpuPlatform, int8pack_accepts
from xpuserve.platforms.cpu_features import ATEN_LEVELS, CpuFeatures, aten_level, detect
from xpuserve.quantization import int8
from xpuserve.weights import load_model

AVX512 = CpuFeatures("AVX-512 server", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
                     "AVX512", onednn_bf16=True)
AMX = CpuFeatures("AMX server (Xeon-like)", AVX512.flags | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"},
                  "AVX512", onednn_bf16=True)
# Widths from the AVX-512 crash report (K % 16 != 0) and ones it ran fine, plus widths not a
# multiple of 8, 16, 32 or 64.
CRASHED_ON_AVX512 = (8, 24, 40, 56, 72, 120, 136, 200, 1000, 1016)
RAN_ON_AVX512 = (16, 32, 48, 64, 96, 128, 160, 192, 256, 1008, 1024)
ODD = (1, 3, 7, 12, 20, 36, 100, 172)
LEVELS_RUNNABLE_HERE = ATEN_LEVELS[: ATEN_LEVELS.index(aten_level()) + 1]
KERNEL_CHECK = Path(__file__).with_name("cpu_kernel_check.py")


def weight(n: int, k: int) -> torch.Tensor:
    return torch.randint(-127, 128, (n, k), dtype=torch.int8)


def relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    got, ref = torch.cat(got), torch.cat(ref)
    return ((got - ref).norm() / ref.norm()).item()


def test_detected_features_name_this_cpu():
    features = detect()
    assert features.model and features.aten == aten_level() in ATEN_LEVELS
    assert features.onednn_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert set(features.isa_names()) <= set(features.flags)
    assert CpuPlatform().features == features


def test_int8_guard_per_aten_level():
    for k in CRASHED_ON_AVX512:
        assert not int8pack_accepts("AVX512", torch.bfloat16, k, weight(4, k)), k
    for k in RAN_ON_AVX512:
        assert int8pack_accepts("AVX512", torch.bfloat16, k, weight(4, k)), k
    for k in CRASHED_ON_AVX512 + RAN_ON_AVX512 + ODD:
        for level in ("DEFAULT", "AVX2"):  # DEFAULT: x86's scalar loop, or aarch64's NEON kernel stepping K by 8
            assert int8pack_accepts(level, torch.bfloat16, k, weight(4, k)) == (k % 8 == 0), (level, k)
        for level in ATEN_LEVELS:  # float inputs take the scalar loop at every level
            assert not int8pack_accepts(level, torch.float32, k, weight(4, k))
    assert not int8pack_accepts("AVX2", torch.bfloat16, 32, weight(5, 48)[:, :32])  # not contiguous
    shifted = torch.empty(4 * 32 + 8, dtype=torch.int8)[8:].view(4, 32)  # rows start 8 bytes off 16
    assert int8pack_accepts("AVX2", torch.bfloat16, 32, shifted) and not int8pack_accepts("AVX512", torch.bfloat16, 32, shifted)


def test_a_platform_weaker_than_torchs_kernels_is_refused():
    weaker = [level for level in ATEN_LEVELS if ATEN_LEVELS.index(level) < ATEN_LEVELS.index(aten_level())]
    for level in weaker:
        with pytest.raises(ValueError, match="ATEN_CPU_CAPABILITY"):
            CpuPlatform(CpuFeatures("forced", frozenset(), level, False))
    CpuPlatform(AMX)  # a stronger one only narrows the INT8 kernel's domain: safe on any CPU


@pytest.mark.parametrize("features", [AVX512, AMX], ids=["avx512", "amx"])
def test_forced_avx512_choices_are_right_on_this_cpu(features):
    """The AVX-512 guard over the widths that crashed there: each takes the dequantizing path, each
    multiple of 16 the kernel this CPU has, all equal to the float reference."""
    cpu = CpuPlatform(features)
    for k in CRASHED_ON_AVX512 + RAN_ON_AVX512[:6] + ODD:
        for rows in (1, 2, 5, 16):
            w, scale = int8.quantize(torch.randn(20, k))
            x = torch.randn(rows, k).bfloat16()
            ref = x.float() @ int8.dequantize(w, scale).t()
            got = cpu.int8_linear(x, w, scale).float()
            assert (got - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3, (k, rows)
    assert "K % 16 == 0" in cpu.kernels()["INT8 weight-only"]


@pytest.mark.parametrize("level", LEVELS_RUNNABLE_HERE)
def test_int8_kernels_run_for_real_at_each_aten_level_this_cpu_has(level):
    """ATEN_CPU_CAPABILITY makes torch dispatch to a weaker level's kernels; the platform's own
    int8_linear must then be right at every width (odd ones dequantize), misaligned inputs too."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level.lower()}
    result = subprocess.run([sys.executable, str(KERNEL_CHECK)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["aten"] == level and report["checked"] >= 350
    assert report["wrong"] == [], report["wrong"][:10]
    multiple = 16 if level == "AVX512" else 8  # the kernel took every multiple of the level's K, nothing else
    assert set(report["kernel_widths"]) == {k for k in report["widths"] if k % multiple == 0}


def with_bf16(native: bool) -> CpuFeatures:
    """This CPU's features with the bf16 choice of a CPU that has (AMX, AVX-512) or lacks (AVX2) oneDNN bf16."""
    return replace(detect(), onednn_bf16=native)


@pytest.mark.parametrize("native", [False, True], ids=["upcast", "native-bf16"])
def test_bf16_paths_are_right_on_this_cpu(native):
    """Both bf16 matmul paths (float32 upcast from BF16_UPCAST_ROWS rows; oneDNN bf16) and the
    attention dtype and MLA's per-head products each give the float32 result, whichever this CPU would pick."""
    features = with_bf16(native)
    cpu = CpuPlatform(features)
    w = torch.randn(72, 200).bfloat16()
    for rows in (1, BF16_UPCAST_ROWS - 1, BF16_UPCAST_ROWS, 40):
        x = torch.randn(rows, 200).bfloat16()
        ref = x.float() @ w.float().t()
        got = cpu.linear(x, w)
        assert got.dtype == torch.bfloat16
        assert (got.float() - ref).abs().max() <= 0.02 * ref.abs().max(), rows
    for tokens in (1, 70):  # xpuserve's GEMM up to GEMM_MAX_ROWS tokens where bf16 is not native, bmm beyond
        x, w = torch.randn(tokens, 3, 40).bfloat16(), torch.randn(3, 40, 7).bfloat16()
        ref = torch.einsum("thk,hkm->thm", x.float(), w.float())
        for got in (cpu.head_linear(x, w, transposed=True), cpu.head_linear(x, w.transpose(1, 2).contiguous())):
            assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), ref, rtol=0.02, atol=0.05)
    assert cpu.attention_dtype(torch.bfloat16) == (torch.bfloat16 if features.onednn_bf16 else torch.float32)
    assert ("bf16" in cpu.matmul_kinds()) == features.onednn_bf16
    assert cpu.auto_dtype("bfloat16")[0] == torch.bfloat16  # natively, or through xpuserve's GEMM


@pytest.mark.parametrize("native", [False, True], ids=["upcast", "native-bf16"])
def test_bf16_model_on_either_bf16_path(tmp_path, monkeypatch, native):
    """A whole bf16 model (MLA attention, MoE) on each bf16 path: logits near float32's."""
    make_checkpoint("v3_grouped", tmp_path)
    prompts = random_prompts([7, 19], 256)
    float32 = prompt_logits(load_model(tmp_path, dtype="float32", device="cpu"), prompts)

    class Forced(CpuPlatform):
        def __init__(self):
            super().__init__(with_bf16(native))

    monkeypatch.setitem(PLATFORMS, "cpu", Forced)
    model = load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert model.serving_format.dtype == torch.bfloat16
    assert relative_error(prompt_logits(model, prompts), float32) < 0.05


class ForcedAvx512(CpuPlatform):
    def __init__(self):
        super().__init__(AMX)


# Every INT8 width of these is one the AVX-512 kernel crashed on, or one it runs: both paths in one model.
ODD_MODELS = {"v3_grouped": ODD_SHAPES, "qwen2": dict(hidden_size=128, intermediate_size=1000)}


@pytest.mark.parametrize("arch", ODD_MODELS)
def test_odd_width_model_with_int8_on_every_cpu_kind(tmp_path, monkeypatch, arch):
    """--quantization int8 on a model whose widths crashed the AVX-512 kernel, on this CPU's own
    choices and on the AVX-512 ones. Oracle: the same INT8 weights dequantized and multiplied in
    float32 (float32 inputs never take the INT8 kernel). bf16 activations alone move these random
    models' logits (measured: 13% for the odd V3, 1% for the odd Qwen2); the INT8 kernels may add
    to that no more than as much again, where a kernel reading past its rows is off by ~100%."""
    make_checkpoint(arch, tmp_path, **ODD_MODELS[arch])
    prompts = random_prompts([7, 19], 256)
    float32 = prompt_logits(load_model(tmp_path, dtype="float32", device="cpu"), prompts)
    bf16_noise = relative_error(prompt_logits(load_model(tmp_path, dtype="bfloat16", device="cpu"), prompts), float32)
    expected = prompt_logits(load_model(tmp_path, dtype="float32", device="cpu", quantization="int8"), prompts)
    for name, cls in (("detected", CpuPlatform), ("avx512", ForcedAvx512)):
        monkeypatch.setitem(PLATFORMS, "cpu", cls)
        model = load_model(tmp_path, dtype="bfloat16", device="cpu", quantization="int8")
        error = relative_error(prompt_logits(model, prompts), expected)
        print(f"{arch} {name}: relative error {error:.4f}, bf16 alone {bf16_noise:.4f}")
        assert error < 2 * bf16_noise + 0.01, name
    widths = {m.in_features for m in model.modules() if isinstance(m, Linear) and m.weight.dtype == torch.int8}
    taken = {k: int8pack_accepts("AVX512", torch.bfloat16, k, weight(4, k)) for k in widths}
    assert any(taken.values()) and not all(taken.values()), taken


def test_odd_widths_through_the_cli_with_int8(tmp_path):
    make_checkpoint("v3_grouped", tmp_path, **ODD_SHAPES)
    write_char_tokenizer(tmp_path, 256)
    result = subprocess.run([sys.executable, "-m", "xpuserve", "generate", str(tmp_path), "--prompt", "abc",
                             "--max-tokens", "4", "--device", "cpu", "--quantization", "int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "weights int8 weight-only" in result.stderr


def test_env_prints_the_cpu_and_each_kernel():
    result = subprocess.run([sys.executable, "-m", "xpuserve", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    features = detect()
    assert f"cpu: {features.model}; instruction sets: " in result.stdout
    assert f"ATen kernels: {features.aten}" in result.stdout
    for op in ("bf16 matmul", "INT8 weight-only", "INT8 activations (W8A8)", "prefill attention", "decode attention", "decode step"):
        assert f"kernel, {op}: " in result.stdout
