"""`xpuserve chat`: a terminal conversation, the thought shown dimmed and the answer plain."""

from __future__ import annotations

import sys
from typing import TextIO

from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.reasoning import ReasoningParser
from xpuserve.sampling_params import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"


def chat_loop(engine: LLMEngine, params: SamplingParams, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Reads one user message per line until EOF or 'exit'; streams each reply as it is generated."""
    history: list[dict] = []
    color = stdout.isatty()
    for turn, line in enumerate(_lines(stdin, stdout)):
        history.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        engine.add_request(f"chat-{turn}", engine.tokenizer.encode(prompt, add_special_tokens=False), params)
        parser, sent, answer = ReasoningParser(), 0, ""
        while engine.has_unfinished_requests():
            for output in engine.step():
                completion = output.outputs[0]
                reasoning, content = parser.feed(completion.text[sent:])
                sent = len(completion.text)
                if output.finished:
                    r, c = parser.finish()
                    reasoning, content = reasoning + r, content + c
                answer += content
                _show(stdout, reasoning, content, color)
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def _lines(stdin: TextIO, stdout: TextIO):
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


def _show(stdout: TextIO, reasoning: str, content: str, color: bool) -> None:
    if reasoning:
        stdout.write(f"{DIM}{reasoning}{RESET}" if color else reasoning)
    if content:
        stdout.write(content)
    stdout.flush()
