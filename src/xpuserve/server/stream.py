"""One request's run through the engine, shaped into OpenAI responses or SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from itertools import accumulate

from fastapi import Request

from xpuserve.detokenizer import StopChecker
from xpuserve.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from xpuserve.engine.outputs import CompletionOutput, RequestOutput
from xpuserve.reasoning import ReasoningParser, split_reasoning
from xpuserve.tool_calls import ToolCallParser, split_tool_calls
from xpuserve.sampling_params import SamplingParams
from xpuserve.server.errors import APIError


class Stream:
    """One request's run through the engine, shaped into OpenAI responses or SSE chunks."""

    def __init__(self, request: Request, prefix: str, prompt_ids: list[int], params: SamplingParams,
                 reasoning: bool = False, prompt_text: str | None = None, response_id: str | None = None, part: int = 0,
                 echo: bool = False, prompt_only: bool = False, tools: bool = False, thinking: bool = True):
        """`part`: this prompt's place in a batch of completion prompts sharing `response_id`.
        `echo`: completions start with the prompt; `prompt_only`: and end there (max_tokens 0: the
        one token the engine generates is dropped, as vLLM does). `tools`: read tool calls out of chat output."""
        self.state = request.app.state
        self.engine: AsyncEngine = self.state.engine
        try:
            self.engine.engine.check_request(prompt_ids, params)
        except ValueError as e:
            where = "messages" if prefix == "chatcmpl" else "prompt" if part == 0 else f"prompt[{part}]"
            raise APIError(400, str(e), where) from None
        self.id = response_id or f"{prefix}-{uuid.uuid4().hex}"
        self.request_id = f"{self.id}-{part}"
        self.first_choice = part * params.n  # OpenAI numbers a batch's choices prompt by prompt
        self.last_output: RequestOutput | None = None
        self.created = int(time.time())
        self.model = self.state.config.served_model_name
        self.prompt_ids, self.params, self.reasoning = prompt_ids, params, reasoning
        self.prompt_text = prompt_text
        self.echo, self.prompt_only = echo or prompt_only, prompt_only
        self.tools, self.thinking = tools, thinking
        self.tokenizer = self.engine.engine.tokenizer

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self.engine.generate(self.request_id, self.prompt_text or self.prompt_ids, self.params):
                self.last_output = output
                if output.finished:
                    self.state.metrics.record_finished(output)
                yield output
        except EngineOverloaded as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="overloaded", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def final(self) -> RequestOutput:
        async for output in self.outputs():
            if output.finished:
                return output
        raise APIError(503, "the request ended without output", code="engine_unavailable")

    def usage(self, output: RequestOutput) -> dict:
        completion = 0 if self.prompt_only else sum(len(c.token_ids) for c in output.outputs)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion,
                "prompt_tokens_details": {"cached_tokens": output.metrics.num_cached_tokens}}

    # ---- chat ----
    async def chat_response(self) -> dict:
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
            choices.append({"index": c.index, "message": message, "logprobs": self._chat_logprobs(c, 0),
                            "finish_reason": tool_calls_finish(c.finish_reason, bool(calls)), "stop_reason": c.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def chat_chunks(self, include_usage: bool) -> AsyncIterator[str]:
        n = self.params.n
        parsers = [ReasoningParser(self.thinking) if self.reasoning else None for _ in range(n)]
        tool_parsers = [ToolCallParser() if self.tools else None for _ in range(n)]
        yield self.sse("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None} for i in range(n)])
        async for output, choice, delta, new_tokens in self._deltas():
            parser, tool_parser = parsers[choice.index], tool_parsers[choice.index]
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
            message = {k: v for k, v in message.items() if v} if not finished else message
            if not message and not finished and not new_tokens:
                continue
            yield self.sse("chat.completion.chunk", [{
                "index": choice.index, "delta": message,
                "logprobs": self._chat_logprobs(choice, len(choice.token_ids) - new_tokens),
                "finish_reason": finish_reason, "stop_reason": choice.stop_reason}])
        if include_usage:
            yield self.sse("chat.completion.chunk", [], usage=self.usage(output))
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, c: CompletionOutput, start: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = []
        for entry in c.logprobs[start:]:
            token = self.tokenizer.decode([entry.token_id], skip_special_tokens=False)
            entries.append({"token": token, "logprob": entry.logprob, "bytes": list(token.encode()),
                            "top_logprobs": [self._top(t, lp) for t, lp in entry.top]})
        return {"content": entries}

    def _top(self, token_id: int, logprob: float) -> dict:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    # ---- completions ----
    async def completion_response(self) -> dict:
        output = await self.final()
        choices = [self._completion_choice(output, c, c.text, 0, self.echo) for c in output.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def completion_deltas(self) -> AsyncIterator[str]:
        """The SSE chunks of this prompt's choices (the caller adds usage and [DONE]); with echo,
        each choice's first chunk starts with the prompt."""
        sent: dict[int, int] = {}  # characters of text sent so far, per choice
        async for output, choice, delta, new_tokens in self._deltas():
            first = self.echo and choice.index not in sent
            offset = sent.get(choice.index, 0)
            chunk = self._completion_choice(output, choice, delta, len(choice.token_ids) - new_tokens, first, offset)
            sent[choice.index] = offset + len(chunk["text"])
            yield self.sse("text_completion", [chunk])

    def _completion_choice(self, output: RequestOutput, c: CompletionOutput, text: str, start: int, with_prompt: bool,
                           offset: int = 0) -> dict:
        """`offset`: where `text` starts in the choice's whole text (streaming), for text_offset."""
        logprobs = self._completion_logprobs(c.logprobs[start:] if c.logprobs is not None else None)
        if self.prompt_only:
            text, logprobs = "", logprobs and {key: [] for key in logprobs}
        if with_prompt:
            prompt = self.prompt_text if self.prompt_text is not None else self.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
            text = prompt + text
            if logprobs is not None:
                prompt = self._completion_logprobs(output.prompt_logprobs)  # asked for with echo + logprobs
                prompt["tokens"] = [self._token(t) for t in self.prompt_ids]  # the first one too
                logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
        if logprobs is not None:  # each token's character offset in the text, as its decoded pieces add up
            logprobs["text_offset"] = list(accumulate((len(t) for t in logprobs["tokens"]), initial=offset))[:-1]
        return {"index": self.first_choice + c.index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _completion_logprobs(self, entries: list | None) -> dict | None:
        """OpenAI's completions logprobs; an entry of None (the first prompt token) scores null.
        Each top_logprobs entry holds the best `logprobs` tokens and always the chosen one (so up
        to logprobs + 1), as OpenAI's legacy API and vLLM give them."""
        if entries is None:
            return None
        return {"tokens": [self._token(e.token_id) if e else None for e in entries],
                "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [{**{self._token(t): lp for t, lp in e.top}, self._token(e.token_id): e.logprob} if e else None
                                 for e in entries]}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- shared ----
    async def _deltas(self) -> AsyncIterator[tuple[RequestOutput, CompletionOutput, str, int]]:
        """Per update and choice: the text not sent yet (holding back what may become a stop string)
        and how many tokens are new."""
        sent_chars = [0] * self.params.n
        sent_tokens = [0] * self.params.n
        done = [False] * self.params.n
        stop = StopChecker(self.params.stop)
        async for output in self.outputs():
            for choice in output.outputs:
                i = choice.index
                if done[i]:
                    continue
                finished = choice.finish_reason is not None
                visible = len(choice.text) if finished else len(choice.text) - stop.hold_back(choice.text)
                new_tokens = len(choice.token_ids) - sent_tokens[i]
                if visible <= sent_chars[i] and not finished and not new_tokens:
                    continue
                delta = choice.text[sent_chars[i] : max(visible, sent_chars[i])]
                sent_chars[i] = max(visible, sent_chars[i])
                sent_tokens[i] = len(choice.token_ids)
                done[i] = finished
                yield output, choice, delta, new_tokens

    def sse(self, kind: str, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"


def tool_calls_finish(finish_reason: str | None, called: bool) -> str | None:
    """"tool_calls" when the model stopped after calling tools; "length" stays: the output was cut."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
