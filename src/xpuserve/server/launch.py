"""`xpuserve serve`: load the model, start the engine thread, run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from dataclasses import fields
from pathlib import Path

import uvicorn

from xpuserve.config import EngineConfig
from xpuserve.distributed.state import launched_rank, launched_world_size
from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.reasoning import THINK_END, THINK_START
from xpuserve.server.app import ServerConfig, build_app
from xpuserve.tokenizer import Tokenizer, render_chat_template
from xpuserve.weights.format import QUANTIZATIONS

log = logging.getLogger("xpuserve")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or npu[:N] (default auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
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
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="partition the routed experts across the tensor-parallel ranks instead of splitting every expert")


def engine_config(model: str, args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)} - {"model", "seed"}
    return EngineConfig(model=model, **{name: getattr(args, name) for name in names})


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model name clients use (default: the folder name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead of the model's")
    parser.add_argument("--reasoning-parser", choices=("auto", "deepseek_r1", "none"), default="auto",
                        help="split <think>...</think> into reasoning_content; auto: on when the tokenizer has the think tokens")
    parser.add_argument("--max-waiting-requests", type=int, default=1024, help="beyond this many waiting, answer 429")
    add_engine_args(parser)


def serve(model: str, args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = engine_config(model, args)
    if launched_world_size() > 1 and launched_rank() > 0:
        engine = LLMEngine(config)
        print(f"xpuserve: rank {engine.parallel.rank} (pid {os.getpid()}) follows rank 0", flush=True)
        engine.worker.run_follower()
        return
    listener = _listen(args.host, args.port)  # before the model loads: a port in use fails at once, in one line
    async_engine = AsyncEngine(lambda: LLMEngine(config), max_waiting=args.max_waiting_requests)
    info = async_engine.info
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    if chat_template is not None:
        render_chat_template(chat_template, messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    config = ServerConfig(
        served_model_name=args.served_model_name or Path(model).name,
        api_key=args.api_key,
        reasoning=reasoning_enabled(args.reasoning_parser, info.tokenizer),
        chat_template=chat_template,
    )
    app = build_app(async_engine, config)
    print(
        f"xpuserve: serving {config.served_model_name} on {info.description}, reasoning {'on' if config.reasoning else 'off'}, "
        f"http://{args.host}:{args.port}/v1\nxpuserve: {info.serving_format}",
        flush=True,
    )
    # uvicorn drains connections on SIGINT/SIGTERM, then raises the signal again for the handler
    # that was there before it: make that one a clean exit instead of a KeyboardInterrupt or a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)).run(sockets=[listener])
    finally:
        async_engine.shutdown()
        print("xpuserve: shut down", flush=True)


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        print(f"xpuserve: error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def reasoning_enabled(choice: str, tokenizer: Tokenizer) -> bool:
    if choice != "auto":
        return choice == "deepseek_r1"
    backend = tokenizer.backend
    return backend.token_to_id(THINK_START) is not None and backend.token_to_id(THINK_END) is not None
