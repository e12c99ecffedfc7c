"""The C++ GEMM (kernels/gemm.py) against the float32 reference: every tile shape and remainder, both
weight kinds, both activation dtypes, with and without bias, strided inputs; the portable tiles too;
inside a torch.compile graph; and the fallback where no compiler exists."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from xpuserve.kernels import gemm

MS = (1, 2, 3, 5, 8, 17, 64, 130)
KS = (1, 7, 8, 64, 100, 1024)
NS = (1, 3, 16, 33, 1000)


@pytest.fixture(autouse=True)
def kernel_only(monkeypatch):
    """Every test here fails if the C++ op is missing or the wrappers fall back to the reference."""
    assert gemm.available(), gemm.status()

    def no_fallback(*args):
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(gemm, "bf16_linear_reference", no_fallback)
    monkeypatch.setattr(gemm, "int8_linear_reference", no_fallback)


def weights(kind: str, n: int, k: int):
    """(weight, scale, float32 dequantized weight)."""
    if kind == "bf16":
        w = torch.randn(n, k).to(torch.bfloat16)
        return w, None, w.float()
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.02 + 0.001
    return w, scale, w.float() * scale[:, None]


def activations(m: int, k: int, dtype, layout: str) -> torch.Tensor:
    if layout == "strided":  # every other column of a wider matrix
        return torch.randn(m, 2 * k).to(dtype)[:, ::2]
    return torch.randn(m, k).to(dtype)


def check(out, x, dequantized, bias, reference=None, magnitude=None):
    """out equals x @ dequantized^T + bias in float32 up to summation order, then rounding to x's dtype.
    reference and magnitude: x @ dequantized^T and |x| @ |dequantized|^T where already computed."""
    if reference is None:
        reference, magnitude = x.float() @ dequantized.T, x.float().abs() @ dequantized.abs().T
    if bias is not None:
        reference, magnitude = reference + bias.float(), magnitude + bias.float().abs()
    tolerance = magnitude * (x.shape[-1] + 2) * 2.0**-23 + 1e-30  # + 2: the scale's and the bias's roundings
    if x.dtype == torch.bfloat16:
        tolerance = tolerance + reference.abs() * 2.0**-8
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], dequantized.shape[0])
    error = (out.float() - reference).abs()
    worst = (error / tolerance).max().item()
    assert worst <= 1, f"error {error.max().item():.3g} is {worst:.2f}x the tolerance"


def run(kind, x, w, scale, bias, op=None):
    if op is not None:
        return op(x, w, scale, bias)
    return gemm.bf16_linear(x, w, bias) if kind == "bf16" else gemm.int8_linear(x, w, scale, bias)


def sweep(kind, dtype, op=None):
    """Every (M, K, N) of the grid, bias or not, x contiguous or strided; the first M rows of one x per K."""
    torch.manual_seed(0)
    for k, n in itertools.product(KS, NS):
        w, scale, dequantized = weights(kind, n, k)
        bias = torch.randn(n).to(dtype)
        for layout in ("contiguous", "strided"):
            x = activations(max(MS), k, dtype, layout)
            reference, magnitude = x.float() @ dequantized.T, x.float().abs() @ dequantized.abs().T
            for m, b in itertools.product(MS, (None, bias)):
                try:
                    check(run(kind, x[:m], w, scale, b, op), x[:m], dequantized, b, reference[:m], magnitude[:m])
                except AssertionError as e:
                    raise AssertionError(f"M={m} K={k} N={n} bias={b is not None} {layout}: {e}") from None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_x", "f32_x"])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_matches_float32_reference(kind, dtype):
    sweep(kind, dtype)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_portable_tiles_match_float32_reference(kind):
    """The tiles that machines without AVX2 run, checked here too (on one thread: the split over
    threads is the same code as above, and two threads on a busy machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep(kind, torch.bfloat16, op=torch.ops.xpuserve_gemm.portable_linear)
    finally:
        torch.set_num_threads(threads)


def test_simd_path_on_a_cpu_that_has_it():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    expected = "AVX2" if "avx2" in flags and "fma" in flags else "portable"
    assert torch.ops.xpuserve_gemm.simd() == expected
    assert gemm.status().startswith(f"C++ {expected} (")


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_leading_dimensions_and_transposed_x(kind):
    torch.manual_seed(1)
    w, scale, dequantized = weights(kind, 40, 72)
    for x in (torch.randn(2, 3, 72).bfloat16(), torch.randn(72, 6).bfloat16().t(), torch.randn(5, 3, 72)[:, 1],
              torch.randn(4, 1, 2, 72).transpose(0, 2)):
        check(run(kind, x, w, scale, None), x, dequantized, None)


def test_no_rows_or_no_columns():
    w = torch.randn(8, 16).bfloat16()
    assert gemm.bf16_linear(torch.randn(0, 16).bfloat16(), w).shape == (0, 8)
    assert gemm.bf16_linear(torch.randn(3, 16).bfloat16(), w[:0]).shape == (3, 0)


def test_bad_inputs_are_errors():
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(RuntimeError, match="last dimension"):
        gemm.bf16_linear(x, torch.randn(8, 12).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous"):
        gemm.bf16_linear(x, torch.randn(16, 8).bfloat16().t())
    with pytest.raises(RuntimeError, match="bfloat16"):
        gemm.bf16_linear(x, torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="scale"):
        gemm.int8_linear(x, torch.zeros(8, 16, dtype=torch.int8), torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_x", "f32_x"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_head_linear_matches_float32_bmm(transposed, dtype, monkeypatch):
    """MLA's per-head products: x [T, H, K] against per-head blocks of a wider bf16 weight (as W_UK / W_UV
    are views into kv_b_proj), x a strided view, every remainder of the tiles and lanes."""
    monkeypatch.setattr(gemm, "head_linear_reference", lambda *args: pytest.fail("fell back to the reference"))
    torch.manual_seed(3)
    for t, h, k, m in itertools.product((1, 3, 64), (1, 5, 16), (1, 9, 64), (1, 7, 256)):
        if transposed:  # [H, K, M]: rows of a wider block (W_UK's rows are R wide, its heads' blocks apart)
            w = torch.randn(h, k + 3, m + 5).bfloat16()[:, 3:, :m]
        else:  # [H, M, K]: packed rows, heads apart (W_UV in kv_b_proj)
            w = torch.randn(h, m + 3, k).bfloat16()[:, 3:]
        x = torch.randn(t, h, 2 * k).to(dtype)[:, :, ::2]
        got = gemm.head_linear(x, w, transposed)
        dense = (w.float() if transposed else w.float().transpose(1, 2))  # [H, K, M]
        reference = torch.einsum("thk,hkm->thm", x.float(), dense)
        magnitude = torch.einsum("thk,hkm->thm", x.float().abs(), dense.abs())
        tolerance = magnitude * (k + 2) * 2.0**-23 + 1e-30 + (reference.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
        assert got.shape == (t, h, m) and got.dtype == dtype
        assert ((got.float() - reference).abs() <= tolerance).all(), (t, h, k, m)


def test_head_linear_bad_inputs_are_errors():
    x, w = torch.randn(2, 4, 8).bfloat16(), torch.randn(4, 6, 8).bfloat16()
    with pytest.raises(RuntimeError, match="differ in K"):
        gemm.head_linear(x, w, True)
    with pytest.raises(RuntimeError, match="bfloat16"):
        gemm.head_linear(x, w.float())
    with pytest.raises(RuntimeError, match=r"\[T, H, K\]"):
        gemm.head_linear(x, w[:3])


def test_inside_a_compiled_graph():
    torch.manual_seed(2)
    bf16, _, _ = weights("bf16", 24, 40)
    int8, scale, _ = weights("int8", 24, 40)
    bias = torch.randn(24).bfloat16()

    heads = torch.randn(4, 6, 10).bfloat16()

    def mlp(x):
        y = gemm.bf16_linear(x, bf16, bias).relu() + gemm.int8_linear(x, int8, scale)
        return gemm.head_linear(y.view(3, 4, 6), heads, True)

    x = torch.randn(3, 40).bfloat16()
    compiled = torch.compile(mlp, fullgraph=True)
    torch.testing.assert_close(compiled(x), mlp(x), rtol=0, atol=0)


def test_falls_back_without_a_compiler(tmp_path):
    """No compiler (and nothing cached): status says why, the reference gives the answer, and the CPU
    platform's auto dtype goes back to float32 for bf16 checkpoints where it has no native bf16."""
    script = (
        "import torch\n"
        "from xpuserve.kernels import gemm\n"
        "x, w = torch.randn(3, 8), torch.randn(5, 8).bfloat16()\n"
        "assert not gemm.available()\n"
        "assert torch.allclose(gemm.bf16_linear(x, w), x @ w.float().T, atol=1e-5)\n"
        "from xpuserve.platforms.cpu import CpuPlatform\n"
        "cpu = CpuPlatform()\n"  # without the GEMM a CPU lacking native bf16 serves bf16 checkpoints in float32
        "assert cpu.native_bf16 or cpu.auto_dtype('bfloat16')[0] == torch.float32\n"
        "print(gemm.status())\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("unavailable: no C++ compiler")
