"""POST /v1/chat/completions: messages through the chat template, the answer split into
reasoning_content, content and tool_calls, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xpuserve.engine.outputs import CompletionOutput
from xpuserve.reasoning import THINK_END, ReasoningParser, split_reasoning
from xpuserve.server.concurrency import gather_or_cancel, respond
from xpuserve.server.prompts import encode_prompts, render_chat
from xpuserve.server.protocol import ChatCompletionRequest
from xpuserve.server.stream import Stream
from xpuserve.server.validate import check_model, check_queue, sampling_params
from xpuserve.tool_calls import ToolCallParser, split_tool_calls


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state
    check_model(body.model, state.config)
    params = sampling_params(body)
    check_queue(state.engine, 1, params.n)
    prompt = await render_chat(state, body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs)
    [prompt_ids] = await encode_prompts(state.engine.info.tokenizer, [prompt], "messages", add_special_tokens=False)
    # A prompt that already closed the thought (V3.1's non-thinking mode) gets an answer only.
    thinking = state.config.reasoning and not prompt.rstrip().endswith(THINK_END)
    stream = ChatStream(request, prompt_ids, params, reasoning=state.config.reasoning, thinking=thinking,
                        tools=bool(body.tools) and body.tool_choice == "auto")
    if body.stream:
        return await respond(stream.chunks(bool(body.stream_options and body.stream_options.include_usage)))
    [response] = await gather_or_cancel(request, [stream.response()])
    return JSONResponse(response)


class ChatStream(Stream):
    def __init__(self, request: Request, prompt_ids: list[int], params, reasoning: bool, thinking: bool, tools: bool):
        """`tools`: read tool calls out of the answer; `thinking`: the output starts inside a thought."""
        super().__init__(request, "chatcmpl", prompt_ids, params, "messages")
        self.reasoning, self.thinking, self.tools = reasoning, thinking, tools

    async def response(self) -> dict:
        output = await self.final()
        choices = []
        for c in output.outputs:
            reasoning, content = split_reasoning(c.text, self.thinking) if self.reasoning else (None, c.text)
            calls = []
            if self.tools:
                content, calls = split_tool_calls(content)
            message = {"role": "assistant", "content": (content or None) if calls else content}
            if self.reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(c, 0),
                            "finish_reason": tool_calls_finish(c.finish_reason, bool(calls)), "stop_reason": c.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        n = self.params.n
        parsers = [ReasoningParser(self.thinking) if self.reasoning else None for _ in range(n)]
        tool_parsers = [ToolCallParser() if self.tools else None for _ in range(n)]
        yield self.sse("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None} for i in range(n)])
        async for output, choice, delta, new_tokens in self.deltas():
            finished = choice.finish_reason is not None
            message, finish_reason = self._delta(parsers[choice.index], tool_parsers[choice.index], choice, delta)
            message = {k: v for k, v in message.items() if v} if not finished else message
            if not message and not finished and not new_tokens:
                continue
            yield self.sse("chat.completion.chunk", [{
                "index": choice.index, "delta": message,
                "logprobs": self._logprobs(choice, len(choice.token_ids) - new_tokens),
                "finish_reason": finish_reason, "stop_reason": choice.stop_reason}])
        if include_usage:
            yield self.sse("chat.completion.chunk", [], usage=self.usage(output))
        yield "data: [DONE]\n\n"

    def _delta(self, parser, tool_parser, choice: CompletionOutput, delta: str) -> tuple[dict, str | None]:
        """One choice's new text as a chunk's delta message, and its finish reason."""
        finished = choice.finish_reason is not None
        reasoning, content = parser.feed(delta) if parser is not None else ("", delta)
        if parser is not None and finished:
            r, c = parser.finish()
            reasoning, content = reasoning + r, content + c
        message = {"content": content}
        if parser is not None:
            message["reasoning_content"] = reasoning
        finish_reason = choice.finish_reason
        if tool_parser is not None:
            first_call = tool_parser.num_calls
            message["content"], calls = tool_parser.feed(content)
            if finished:
                message["content"] += tool_parser.finish()
                finish_reason = tool_calls_finish(finish_reason, bool(tool_parser.num_calls))
            if calls:
                message["tool_calls"] = [{"index": first_call + i, **call.to_openai()} for i, call in enumerate(calls)]
        return message, finish_reason

    def _logprobs(self, c: CompletionOutput, start: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = []
        for entry in c.logprobs[start:]:
            token = self.token(entry.token_id)
            entries.append({"token": token, "logprob": entry.logprob, "bytes": list(token.encode()),
                            "top_logprobs": [self._top(t, lp) for t, lp in entry.top]})
        return {"content": entries}

    def _top(self, token_id: int, logprob: float) -> dict:
        token = self.token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def tool_calls_finish(finish_reason: str | None, called: bool) -> str | None:
    """"tool_calls" when the model stopped after calling tools; "length" stays: the output was cut."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
