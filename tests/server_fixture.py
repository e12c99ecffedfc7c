"""A real uvicorn server on 127.0.0.1 (random port) over a random-weight R1-shaped checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from oracle import make_checkpoint, random_prompts, write_reasoning_tokenizer
from xpuserve.config import EngineConfig
from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.generate import generate
from xpuserve.server.app import ServerConfig, build_app
from xpuserve.weights import load_model

MODEL_NAME = "tiny-r1"
THINK_AFTER = 3  # the model closes its thought after this many tokens, for the chat prompt below
CHAT_PROMPT = "hi"


def build_reasoning_checkpoint(path: Path) -> None:
    """A V3 checkpoint whose tokenizer maps the 4th greedy token of the chat prompt to `</think>`."""
    reference = make_checkpoint("v3_grouped", path, seed=11)
    vocab = reference.config.vocab_size
    write_reasoning_tokenizer(path, vocab, think_end_id=vocab - 1)  # provisional, to render the prompt
    from xpuserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(path)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]), add_special_tokens=False)
    model = load_model(path, dtype="float32", device="cpu")
    tokens = generate(model, [prompt], max_new_tokens=THINK_AFTER + 1)[0]
    assert tokens[THINK_AFTER] not in prompt + tokens[:THINK_AFTER]  # remapping it must not change the prompt
    write_reasoning_tokenizer(path, vocab, think_end_id=tokens[THINK_AFTER])
    assert Tokenizer.from_pretrained(path).encode(tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]), add_special_tokens=False) == prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, **server_args):
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=4, **server_args.pop("engine_args", {}))
    async_engine = AsyncEngine(lambda: LLMEngine(config), max_waiting=server_args.pop("max_waiting", 1024))
    engine = async_engine.engine
    config = ServerConfig(served_model_name=MODEL_NAME, reasoning=True, **server_args)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        async_engine.shutdown()
