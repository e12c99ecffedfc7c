"""The engine's command-line flags, defined once for serve, chat and generate, and the EngineConfig
they make. No torch here: `xpuserve bench --help` and `xpuserve plan` parse without it."""

from __future__ import annotations

import argparse
from dataclasses import fields

from xpuserve.config import QUANTIZATIONS, EngineConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or npu[:N] (default auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                        help="int8: INT8 weights with per-channel scales, converted on load (FP8 checkpoints block by block)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch (default 256)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step (default 8192)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model across N ranks, one per chip; start them with torchrun --nproc-per-node N")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="run decode steps operator by operator (--no-enforce-eager: as a compiled graph; "
                             "default: the platform's choice, see `xpuserve env`)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="partition the routed experts across the tensor-parallel ranks instead of splitting every expert")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the flags above set, for `LLM(model, **engine_kwargs(args))`."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if f.name != "model"}


def engine_config(model: str, args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=model, **engine_kwargs(args))
