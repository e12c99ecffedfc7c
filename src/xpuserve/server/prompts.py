"""Request text to token ids: chat template rendering and tokenizing, run in a worker thread so
that a large prompt does not stall the event loop, and refused with a 400 when it cannot be served."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from xpuserve.server.errors import APIError
from xpuserve.tokenizer import ChatTemplateError, Tokenizer

# Names the template call passes itself: chat_template_kwargs may not set them.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "chat_template", "tools")


async def encode_prompts(tokenizer: Tokenizer, texts: list[str], param: str, add_special_tokens: bool = True) -> list[list[int]]:
    for i, text in enumerate(texts):
        _check_encodable(text, param if len(texts) == 1 else f"{param}[{i}]")
    return await run_in_threadpool(tokenizer.encode_batch, texts, add_special_tokens)


async def render_chat(state, messages, add_generation_prompt: bool, tools: list[dict] | None = None,
                      template_kwargs: dict | None = None) -> str:
    for key in template_kwargs or {}:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise APIError(400, f"chat_template_kwargs may not set '{key}': the server passes it itself",
                           f"chat_template_kwargs.{key}")
    dicts = [{**m.model_dump(exclude_none=True), "content": m.content} for m in messages]
    try:
        return await run_in_threadpool(state.engine.info.tokenizer.apply_chat_template, dicts, add_generation_prompt,
                                       state.config.chat_template, tools=tools, **(template_kwargs or {}))
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
    except RecursionError:
        raise APIError(400, "the messages are nested too deeply for the chat template", "messages") from None


def _check_encodable(text: str, param: str) -> None:
    """A JSON string may hold a lone surrogate ("\\ud800"), which is no text the tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{param}' is not valid Unicode: a lone surrogate at character {e.start}", param) from None
