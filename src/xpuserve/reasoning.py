"""Splits R1 output into the thought (`reasoning_content`) and the answer (`content`), as text streams in.

R1 thinks first and closes the thought with `</think>`. The opening `<think>` may be in the
prompt (the chat template opened it) or at the start of the output; either way everything
before `</think>` is reasoning, as DeepSeek's API and vLLM's deepseek_r1 parser treat it. An
output that never closes the thought is all reasoning. Text that could be the start of a tag
is held back until the next delta shows what it is, so tags split across deltas never leak.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, thinking: bool = True) -> None:
        """`thinking` False: the prompt closed the thought already, so the output is all answer."""
        self.in_thought = thinking
        self.at_start = True  # a leading <think> (and the whitespace after it) is dropped
        self.content_started = False
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """Returns the (reasoning, content) text that `delta` completes."""
        text = self.pending + delta
        self.pending = ""
        reasoning = content = ""
        if self.at_start:
            stripped = text.lstrip()
            if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                self.pending = text  # might still become "<think>"
                return "", ""
            if stripped.startswith(THINK_START):
                text = stripped[len(THINK_START) :]
            self.at_start = False
        if self.in_thought:
            end = text.find(THINK_END)
            if end < 0:
                keep = partial_suffix(text, THINK_END)
                self.pending = text[len(text) - keep :]
                return text[: len(text) - keep], ""
            reasoning, text = text[:end], text[end + len(THINK_END) :]
            self.in_thought = False
        if not self.content_started:
            text = text.lstrip()
            self.content_started = bool(text)
        return reasoning, text

    def finish(self) -> tuple[str, str]:
        """Releases held-back text at the end of the output."""
        text, self.pending = self.pending, ""
        return (text, "") if self.in_thought else ("", text)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """The whole output at once: (reasoning, content)."""
    parser = ReasoningParser(thinking)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return r1 + r2, c1 + c2


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
