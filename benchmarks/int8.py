"""INT8 weights against bf16 on the ~200M DeepSeek-V3-shaped benchmark model: weight bytes,
decode throughput (transformers' bf16 `generate` as the peer, in the same run) and top-1 agreement.

    python benchmarks/int8.py            # writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from throughput import time_hf, time_xpuserve, write_section
from xpuserve import LLM
from xpuserve.generate import prompt_logits
from xpuserve.platforms.cpu_features import detect as cpu_features
from xpuserve.planner.bench_model import CONFIG, build_checkpoint


def weight_bytes(model) -> tuple[int, int]:
    """(all parameters, the parameters of quantizable layers: every linear but kv_b_proj and lm_head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    skip = ("embed_tokens", "lm_head", "kv_b_proj", "norm", "mlp.gate.")
    linear = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not any(s in n for s in skip))
    return total, linear


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (torch.cat(a).argmax(-1) == torch.cat(b).argmax(-1)).float().mean().item()


def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """Mean KL(p || q) over positions, in nats: how far q's next-token distribution is from p's."""
    log_p, log_q = torch.cat(p).log_softmax(-1), torch.cat(q).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def mean_entropy(logits: list[torch.Tensor]) -> float:
    log_p = torch.cat(logits).log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean().item()


def dense_variant_agreement(prompts: list[list[int]]) -> dict[str, float]:
    """The same shape with every layer dense: how much of the disagreement routing flips add."""
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), dict(CONFIG, first_k_dense_replace=CONFIG["num_hidden_layers"]))
        logits = {
            name: prompt_logits(LLM(tmp, device="cpu", dtype=dtype, quantization=q).engine.model, prompts)
            for name, dtype, q in (("bf16", "bfloat16", None), ("int8", "bfloat16", "int8"), ("float32", "float32", None))
        }
    return {
        "dense variant: int8 vs bf16": agreement(logits["int8"], logits["bf16"]),
        "dense variant: bf16 vs float32": agreement(logits["bf16"], logits["float32"]),
    }


def bits_needed(path: str, prompts: list[list[int]]) -> dict[str, float]:
    """Top-1 agreement with float32 after rounding every quantizable weight to k bits per output channel
    (float32 activations): how much weight precision this model's greedy choices can tolerate."""
    model = LLM(path, device="cpu", dtype="float32").engine.model
    skip = ("embed_tokens", "lm_head", "kv_b_proj", "norm", "mlp.gate.")
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2 and not any(s in n for s in skip)}
    original = {n: p.detach().clone() for n, p in weights.items()}
    reference = torch.cat(prompt_logits(model, prompts)).argmax(-1)
    result = {}
    for bits in (14, 12, 10, 8):
        levels = 2 ** (bits - 1) - 1
        with torch.no_grad():
            for name, w in original.items():
                scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels
                weights[name].copy_((w / scale).round().clamp(-levels, levels) * scale)
        top = torch.cat(prompt_logits(model, prompts)).argmax(-1)
        result[f"{bits}-bit weights vs float32"] = (top == reference).float().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-concurrency", type=int, nargs="*", default=[1],
                        help="rows that also time transformers (its bf16 decode is slow on CPUs without native bf16)")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        llms = {name: LLM(tmp, device="cpu", dtype="bfloat16", quantization=q) for name, q in (("bf16", None), ("int8", "int8"))}
        models = {name: llm.engine.model for name, llm in llms.items()}
        sizes = {name: weight_bytes(m) for name, m in models.items()}
        for name, (total, linear) in sizes.items():
            print(f"{name}: weights {total / 1e6:.0f} MB, of which quantizable linears {linear / 1e6:.0f} MB")

        for llm in llms.values():  # full-length warm-up, as benchmarks/throughput.py does
            time_xpuserve(llm, [[1] * 128], 8)
        time_hf(hf, torch.ones(1, 128, dtype=torch.long), 8)
        rows = []
        for c in args.concurrency:
            batch = torch.randint(0, CONFIG["vocab_size"], (c, 128), generator=gen)
            speed = {name: c * args.output_len / time_xpuserve(llm, batch.tolist(), args.output_len) for name, llm in llms.items()}
            if c in args.hf_concurrency:
                speed["hf"] = c * args.output_len / time_hf(hf, batch, args.output_len)
            rows.append((c, speed))
            print(f"concurrency {c:3d}: xpuserve bf16 {speed['bf16']:.1f}, int8 {speed['int8']:.1f}, "
                  f"transformers bf16 {speed.get('hf', float('nan')):.1f} tok/s")
        # After timing: prompt_logits gives each model a cache of its own, replacing the engine's.
        prompts = [torch.randint(0, CONFIG["vocab_size"], (128,), generator=gen).tolist() for _ in range(4)]
        logits = {name: prompt_logits(m, prompts) for name, m in models.items()}
        logits["float32"] = prompt_logits(LLM(tmp, device="cpu", dtype="float32").engine.model, prompts)
        quality = {
            "int8 vs bf16": agreement(logits["int8"], logits["bf16"]),
            "bf16 vs float32": agreement(logits["bf16"], logits["float32"]),
            "int8 vs float32": agreement(logits["int8"], logits["float32"]),
        }
        quality.update(dense_variant_agreement(prompts))
        quality.update(bits_needed(tmp, prompts))
        divergence = {
            "KL(bf16 || int8)": mean_kl(logits["bf16"], logits["int8"]),
            "KL(float32 || bf16)": mean_kl(logits["float32"], logits["bf16"]),
            "entropy of bf16's distribution": mean_entropy(logits["bf16"]),
        }
        for label, value in divergence.items():
            print(f"{label}: {value:.4f} nats per position")
        for label, value in quality.items():
            print(f"top-1 agreement {label}: {value:.1%} of {sum(len(p) for p in prompts)} positions")

    if not args.no_report:
        write_report(args, sizes, quality, divergence, rows)


def bits_for(quality: dict[str, float], target: float) -> str:
    """The fewest bits of the k-bit rows that keep `target` agreement, as text."""
    bits = [int(label.split("-")[0]) for label, value in quality.items() if label.endswith("bit weights vs float32") and value >= target]
    return str(min(bits)) if bits else "more than 14"


def write_report(args, sizes, quality, divergence, rows) -> None:
    (bf_total, bf_linear), (q_total, q_linear) = sizes["bf16"], sizes["int8"]
    write_section([
        "## INT8 weights vs bf16 (CPU)",
        "",
        f"Machine: {cpu_features().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        f"Command: `python benchmarks/int8.py --concurrency {' '.join(map(str, args.concurrency))}`"
        f" (prompt 128 tokens, {args.output_len} greedy output tokens; the ~200M model of the throughput section).",
        "",
        "| | bf16 | INT8 | ratio |",
        "|---|---:|---:|---:|",
        f"| all weights (MB) | {bf_total / 1e6:.0f} | {q_total / 1e6:.0f} | {q_total / bf_total:.2f} |",
        f"| quantizable linears (MB) | {bf_linear / 1e6:.0f} | {q_linear / 1e6:.0f} | {q_linear / bf_linear:.2f} |",
        *[f"| output tok/s, {c} request(s), prefill included | {s['bf16']:.1f} | {s['int8']:.1f} | {s['int8'] / s['bf16']:.2f}x"
          + (f" (transformers bf16 {s['hf']:.1f} tok/s: xpuserve INT8 {s['int8'] / s['hf']:.2f}x, bf16 {s['bf16'] / s['hf']:.2f}x)" if "hf" in s else "")
          + " |" for c, s in rows],
        "",
        "Top-1 agreement over 512 teacher-forced positions: "
        + ", ".join(f"{label} {value:.1%}" for label, value in quality.items()) + ".",
        f"bf16 itself picks float32's token at only {quality['bf16 vs float32']:.1%} of positions here. A random model's",
        "logits are flat (transformers' initialisation: top-two gaps of a fraction of a logit), so small",
        "perturbations flip top-1 choices, and every flipped expert choice adds its own: the all-dense variant",
        "agrees more, but not 97% either. The k-bit rows round every quantizable weight to k bits per output",
        f"channel in float32 (nothing else changes): this model's greedy choices need {bits_for(quality, 0.97)} bits of weight",
        "precision to stay 97% the same, so 8-bit per-channel weights cannot meet the 97% INT8-vs-bf16 criterion on it. On",
        "trained weights INT8 does (stories260K, 554 positions, `tests/test_real_weights.py`), and the demo",
        "model's accuracy is unchanged (`tests/test_demo_model.py`).",
        "",
        "Distributions rather than choices, mean per position: "
        + ", ".join(f"{label} {value:.4f} nats" for label, value in divergence.items())
        + f" (a uniform choice among {CONFIG['vocab_size']} tokens has {math.log(CONFIG['vocab_size']):.2f}): INT8 moves the",
        "distribution little, but it is nearly flat, so its argmax moves often.",
        "",
    ])


if __name__ == "__main__":
    main()
