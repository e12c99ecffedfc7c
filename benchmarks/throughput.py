"""Generation throughput: xpuserve against HF transformers `generate`, in one process and one run.

The model is a random DeepSeek-V3-shaped checkpoint of about 200M parameters (bf16): MLA with
q_lora, 16 routed experts (top-4, 4 groups, 2 chosen) plus one shared, first layer dense.
Prompts of 128 tokens, 128 greedy output tokens, at several concurrencies.

    python benchmarks/throughput.py                  # writes docs/benchmarks.md
    python benchmarks/throughput.py --concurrency 1  # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from xpuserve import LLM, SamplingParams
from xpuserve.platforms.cpu_features import detect as cpu_features

from xpuserve.planner.bench_model import CONFIG, build_checkpoint

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def active_bytes_per_token(model) -> int:
    """Weights a decode step reads for one token: all but the idle routed experts and the embedding table."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return (total - idle - model.model.embed_tokens.weight.numel()) * 2


def copy_bandwidth() -> float:
    """Bytes per second moved by a large tensor copy (read + write)."""
    src = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def time_hf(model, prompts: torch.Tensor, output_len: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
            max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + output_len
    return elapsed


def time_xpuserve(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="after the xpuserve rows, time llama.cpp (bf16, Q8_0) on the same checkpoint and print ratios")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        llm = LLM(tmp, dtype="bfloat16", device="cpu")
        params = sum(p.numel() for p in hf.parameters())
        active = active_bytes_per_token(hf)
        bandwidth = copy_bandwidth()
        print(f"model: {params / 1e6:.0f}M parameters, {active / 2e6:.0f}M active per token (bf16)")
        print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 decode roofline {bandwidth / active:.0f} tok/s")
        # Warm up both with a full-length prompt: a short one leaves the first timed row paying for
        # first-time allocations (measured: 28.8 tok/s in a first row, 39-45 in later ones).
        time_xpuserve(llm, [[1] * args.prompt_len], 8)
        time_hf(hf, torch.ones(1, args.prompt_len, dtype=torch.long), 8)
        rows = []
        for c in args.concurrency:
            prompts = torch.randint(0, CONFIG["vocab_size"], (c, args.prompt_len), generator=torch.Generator().manual_seed(c))
            ours = c * args.output_len / time_xpuserve(llm, prompts.tolist(), args.output_len)
            theirs = c * args.output_len / time_hf(hf, prompts, args.output_len)
            rows.append((c, ours, theirs))
            print(f"concurrency {c:3d}: xpuserve {ours:7.1f} tok/s   transformers {theirs:7.1f} tok/s   ratio {ours / theirs:5.2f}x")
            if not args.no_report:  # after every row, so a long run that is stopped still leaves its results
                write_report(args, rows, params, active, bandwidth)
        if args.vs_llama_cpp:  # after xpuserve and transformers are done: one engine at a time
            compare_llama_cpp(Path(tmp), args, rows)


def compare_llama_cpp(checkpoint: Path, args, rows) -> None:
    """Prints xpuserve's end-to-end tok/s over llama.cpp's (see benchmarks/llama_cpp_bench.py), row by row."""
    from llama_cpp_bench import llama_cpp_rates

    workloads = [(c, args.prompt_len, args.output_len) for c, _, _ in rows]
    result = llama_cpp_rates(checkpoint, workloads, repeats=1, threads=torch.get_num_threads())
    for i, (c, ours, _) in enumerate(rows):
        cells = "   ".join(f"llama.cpp {fmt} {rates[i].end_to_end:7.1f} tok/s ({ours / rates[i].end_to_end:4.2f}x)"
                           for fmt, rates in result.items())
        print(f"concurrency {c:3d}: xpuserve {ours:7.1f} tok/s   {cells}")


def write_report(args, rows, params, active, bandwidth) -> None:
    lines = [
        "## Throughput: xpuserve vs HF transformers (CPU, bf16)",
        "",
        f"Machine: {cpu_features().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        f"Command: `python benchmarks/throughput.py --concurrency {' '.join(map(str, args.concurrency))}`"
        f" (prompt {args.prompt_len} tokens, {args.output_len} greedy output tokens).",
        f"Model: random DeepSeek-V3-shaped checkpoint, {params / 1e6:.0f}M parameters, {active / 2e6:.0f}M active per token.",
        f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s: batch-1 decode roofline {bandwidth / active:.0f} tok/s.",
        "",
        "| concurrent requests | xpuserve tok/s | transformers tok/s | ratio |",
        "|---:|---:|---:|---:|",
        *[f"| {c} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |" for c, ours, theirs in rows],
        "",
    ]
    write_section(lines)


def write_section(lines: list[str]) -> None:
    """Replaces the docs/benchmarks.md section headed lines[0] (or appends it)."""
    REPORT.parent.mkdir(exist_ok=True)
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\n"
    start = text.find(lines[0])
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 :] if end >= 0 else text[:start]
    REPORT.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
