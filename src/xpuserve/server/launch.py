"""`xpuserve serve`: load the model, start the engine thread, run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from xpuserve.distributed.state import launched_rank, launched_world_size
from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.engine_args import engine_config
from xpuserve.reasoning import THINK_END, THINK_START
from xpuserve.server.app import ServerConfig, build_app
from xpuserve.tokenizer import Tokenizer, render_chat_template

log = logging.getLogger("xpuserve")


def serve(model: str, args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = engine_config(model, args)
    if launched_world_size() > 1 and launched_rank() > 0:
        # Printed before the engine is built: rank 0 may answer /health before this rank's
        # constructor returns, and the pid must be in the log by then.
        print(f"xpuserve: rank {launched_rank()} (pid {os.getpid()}) follows rank 0", flush=True)
        engine = LLMEngine(config)
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
