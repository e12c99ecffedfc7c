"""One call on an accelerator: parity with transformers, INT8/FP8 on the device, and throughput.

    python benchmarks/gpu_check.py                      # on a CUDA machine, at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --small # the same steps, tiny, to check the script

Parity: every random test architecture (tests/oracle.py) in float32 on the device against
transformers' float32 on the CPU; INT8 (W8A8 where the platform has an INT8 matmul) and, where
the device has FP8 matmul, a served-FP8 checkpoint. Throughput: a larger DeepSeek-V3-shaped
random model, xpuserve bf16 and INT8 against transformers' bf16 `generate` on the same device;
then the same model behind `xpuserve serve` (its own process), measured with `xpuserve bench`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from oracle import ARCHITECTURES, make_checkpoint, random_prompts, reference_logits  # noqa: E402
from test_fp8 import write_fp8_checkpoint  # noqa: E402
from throughput import time_xpuserve, write_section  # noqa: E402
from xpuserve import LLM  # noqa: E402
from xpuserve.env import collect  # noqa: E402
from xpuserve.generate import prompt_logits  # noqa: E402
from xpuserve.platforms import resolve_device  # noqa: E402
from xpuserve.weights import load_model  # noqa: E402

LARGE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, first_k_dense_replace=1,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, moe_intermediate_size=704,
    num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=3, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
)
SMALL = dict(LARGE, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, n_routed_experts=8,
             moe_intermediate_size=64, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=64, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_attention_heads=4, num_key_value_heads=4)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b).abs().max() / b.abs().max()).item()


def parity(device: str, tmp: Path) -> list[tuple[str, str, float, float]]:
    """(architecture, mode, max|Δ|/max|logit| vs transformers float32, top-1 agreement)."""
    rows = []
    for arch in ARCHITECTURES:
        path = tmp / arch
        hf = make_checkpoint(arch, path)
        prompts = random_prompts([9, 33], hf.config.vocab_size)
        reference = [reference_logits(hf, p) for p in prompts]
        for mode, kwargs in (("float32", dict(dtype="float32")), ("bf16", dict(dtype="bfloat16")),
                             ("int8", dict(dtype="bfloat16", quantization="int8"))):
            model = load_model(path, device=device, **kwargs)
            ours = prompt_logits(model, prompts)
            error = max(relative(o, r) for o, r in zip(ours, reference))
            agree = torch.cat([(o.cpu().argmax(-1) == r.argmax(-1)).float() for o, r in zip(ours, reference)]).mean().item()
            label = mode if mode != "int8" else model.serving_format.describe().split(",")[0].removeprefix("weights ")
            rows.append((arch, label, error, agree))
            print(f"{arch:14s} {label:22s} max rel err {error:.2e}  top-1 {agree:.1%}", flush=True)
    path = tmp / "fp8"
    make_checkpoint("v3_grouped", path)
    write_fp8_checkpoint(path)
    # The CPU reference first: loading a model selects its platform for every forward after it.
    dequant = load_model(path, device="cpu", dtype="float32")
    prompts = random_prompts([9, 33], dequant.config.vocab_size)
    reference = prompt_logits(dequant, prompts)
    fp8 = load_model(path, device=device, dtype="bfloat16")
    error = max(relative(o, r) for o, r in zip(prompt_logits(fp8, prompts), reference))
    rows.append(("v3_grouped fp8 ckpt", fp8.serving_format.weights.kind, error, float("nan")))
    print(f"fp8 checkpoint served as {fp8.serving_format.describe()}: max rel err vs dequantized float32 {error:.2e}")
    return rows


def throughput(device: str, tmp: Path, config: dict, concurrency: list[int], deadline: float) -> list[tuple]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from xpuserve.planner.bench_model import write_tokenizer

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp / "large")
    write_tokenizer(tmp / "large", config["vocab_size"])
    hf = hf.to(device)
    params = sum(p.numel() for p in hf.parameters())
    print(f"throughput model: {params / 1e9:.2f}B parameters", flush=True)
    llms = {q or "bf16": LLM(str(tmp / "large"), device=device, dtype="bfloat16", quantization=q, kv_cache_memory=8 << 30
                              if device != "cpu" else 1 << 30) for q in (None, "int8")}
    for llm in llms.values():
        time_xpuserve(llm, [[1] * 16], 4)
    rows = []
    for c in concurrency:
        if time.monotonic() > deadline:
            print(f"skipping concurrency {c}: time budget spent")
            break
        prompts = torch.randint(0, config["vocab_size"], (c, 128))
        speed = {name: c * 128 / time_xpuserve(llm, prompts.tolist(), 128) for name, llm in llms.items()}
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device), do_sample=False,
                        max_new_tokens=128, min_new_tokens=128, pad_token_id=0)
        resolve_device(device)[0].synchronize()
        speed["hf"] = c * 128 / (time.perf_counter() - start)
        rows.append((c, speed))
        print(f"concurrency {c:3d}: xpuserve bf16 {speed['bf16']:.0f}  int8 {speed['int8']:.0f}  "
              f"transformers bf16 {speed['hf']:.0f} tok/s  (bf16 ratio {speed['bf16'] / speed['hf']:.2f}x)", flush=True)
    return rows, params


HTTP_STEP_S = 120  # what the served step needs at most: start-up, then two bench runs


def http(device: str, model: Path, concurrency: list[int]) -> list[tuple]:
    """`xpuserve serve` on the throughput model, driven by `xpuserve bench` (128 in / 128 out)."""
    try:
        import fastapi, httpx, prometheus_client, uvicorn  # noqa: F401, E401
    except ImportError as e:
        print(f"HTTP step skipped: {e}", flush=True)
        return []
    from server_fixture import free_port

    from xpuserve.bench.report import summary_of
    from xpuserve.bench.run import BenchConfig, run_benchmark

    port = free_port()
    kv = 8 << 30 if device != "cpu" else 1 << 30
    server = subprocess.Popen([sys.executable, "-m", "xpuserve", "serve", str(model), "--device", device, "--dtype", "bfloat16",
                               "--port", str(port), "--kv-cache-memory", str(kv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, started = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while server.poll() is None and time.monotonic() - started < 90:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            print(f"HTTP step: the server did not start: {server.stderr.read()[-2000:] if server.poll() is not None else 'timed out'}")
            return []
        rows = []
        for c in concurrency:
            config = BenchConfig(base_url=url, num_prompts=max(4, 2 * c), random_input_len=128, random_output_len=128,
                                 ignore_eos=True, max_concurrency=c, tokenizer=str(model))
            s = summary_of(run_benchmark(config))
            rows.append((c, s))
            print(f"HTTP concurrency {c:3d}: {s.output_throughput:.0f} output tok/s, TTFT {s.ttft.mean:.0f} ms, "
                  f"TPOT {s.tpot.mean:.1f} ms, {s.failed} failed", flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny throughput model (checks the script, not the chip)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new throughput rows after this")
    parser.add_argument("--report", action="store_true", help="write the result to docs/benchmarks.md")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.budget_s
    info = collect()
    platform, _ = resolve_device(args.device)
    print(f"torch {torch.__version__}; device {platform.device_name(torch.device(args.device))}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checks = parity(args.device, tmp)
        speed, params = throughput(args.device, tmp, SMALL if args.small else LARGE, [1, 16, 64], deadline)
        # gpu_check.sh stops everything at 480 s: serve only when the step fits.
        served = http(args.device, tmp / "large", [1, 32]) if time.monotonic() - started + HTTP_STEP_S < 470 else []
    if args.report:
        write_section([
            f"## GPU check ({platform.device_name(torch.device(args.device))})",
            "",
            f"Command: `python benchmarks/gpu_check.py --device {args.device}{' --small' if args.small else ''} --report`;"
            f" torch {info['torch']} ({info['torch_build']}).",
            "",
            "| checkpoint | mode | max rel. logit error vs transformers fp32 | top-1 agreement |",
            "|---|---|---:|---:|",
            *[f"| {a} | {m} | {e:.2e} | {g:.1%} |" for a, m, e, g in checks],
            "",
            f"Throughput, random DeepSeek-V3-shaped model of {params / 1e9:.2f}B parameters, prompt 128, 128 greedy tokens:",
            "",
            "| concurrent requests | xpuserve bf16 tok/s | xpuserve INT8 tok/s | transformers bf16 tok/s | bf16 ratio |",
            "|---:|---:|---:|---:|---:|",
            *[f"| {c} | {s['bf16']:.0f} | {s['int8']:.0f} | {s['hf']:.0f} | {s['bf16'] / s['hf']:.2f}x |" for c, s in speed],
            "",
            "Over HTTP: `xpuserve serve` (bf16) on the same model, `xpuserve bench` with 128 in / 128 out, 2 prompts per slot:"
            if served else "Over HTTP: not run (time budget, or fastapi/uvicorn/httpx/prometheus_client missing on the machine).",
            *(["", "| max concurrency | output tok/s | TTFT mean ms | TPOT mean ms | failed |", "|---:|---:|---:|---:|---:|",
               *[f"| {c} | {s.output_throughput:.0f} | {s.ttft.mean:.0f} | {s.tpot.mean:.1f} | {s.failed} |" for c, s in served]]
              if served else []),
            "",
        ])


if __name__ == "__main__":
    main()
