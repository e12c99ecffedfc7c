"""Tool calls in DeepSeek's output format, turned into OpenAI `tool_calls`, as text streams in.

After its answer text (and after `</think>` for R1), a DeepSeek model that calls tools writes

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

(V3, R1-0528), or `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>` inside the
same wrapper (V3.1). Both are read. Text before the wrapper is the message content; each call is
released whole when its end marker arrives. Text that could be the start of the wrapper is held
back, so markers split across deltas never leak into content; an unfinished call is dropped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from xpuserve.reasoning import partial_suffix

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str) -> ToolCall:
    """One call: the text between its begin and end markers, in either format."""
    kind, _, rest = body.partition(SEP)
    if kind.strip() == "function" and "```" in rest:  # V3 / R1: type, then the name and a JSON block
        name, _, block = rest.partition("\n")
        arguments = block.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
        return ToolCall(name.strip(), arguments)
    return ToolCall(kind.strip(), rest.strip())  # V3.1: the name, then the arguments


class ToolCallParser:
    def __init__(self) -> None:
        self.in_calls = False
        self.pending = ""
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Returns the content text and the complete calls that `delta` adds."""
        text = self.pending + delta
        self.pending = ""
        content = ""
        if not self.in_calls:
            start = text.find(CALLS_BEGIN)
            if start < 0:
                keep = partial_suffix(text, CALLS_BEGIN)
                self.pending = text[len(text) - keep :]
                return text[: len(text) - keep], []
            content, text = text[:start], text[start + len(CALLS_BEGIN) :]
            self.in_calls = True
        calls = []
        while (end := text.find(CALL_END)) >= 0:
            body, text = text[:end], text[end + len(CALL_END) :]
            calls.append(parse_call(body.split(CALL_BEGIN, 1)[-1]))
        self.pending = text
        self.num_calls += len(calls)
        return content, calls

    def finish(self) -> str:
        """Text held back at the end that is content. Once the calls began, nothing is: a call cut
        off (by max_tokens, say) is dropped rather than shown as markup, and, as in vLLM, text
        after the calls is not content either."""
        text, self.pending = self.pending, ""
        return "" if self.in_calls else text


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The whole content at once: (content, calls)."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    return content + parser.finish(), calls
