"""Running a request's parts concurrently: a batch's prompts, a stream's first chunk, a client
that hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import StreamingResponse

from xpuserve.server.errors import APIError

DISCONNECT_POLL_S = 0.25  # how often a request without a stream checks that its client is still there


async def respond(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Starts the stream only once the first chunk exists, so errors before it are real HTTP errors."""
    first = await anext(chunks)

    async def body():
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="text/event-stream")


async def gather_or_cancel(request: Request, awaitables: list[Awaitable]) -> list:
    """All results, or the first error with the rest cancelled (their engine requests aborted).
    A client that hangs up cancels them too: nobody is left to read the answer."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        while True:
            done, _ = await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION)
            if len(done) == len(tasks) or any(not t.cancelled() and t.exception() is not None for t in done):
                return await asyncio.gather(*tasks)
            if await request.is_disconnected():
                raise APIError(400, "the client disconnected")
    finally:
        for task in tasks:
            task.cancel()


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; the first error stops them all."""
    if len(iterators) == 1:  # the usual request: no task and queue hop per item
        async for item in iterators[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(iterator):
        try:
            async for item in iterator:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)

    tasks = [asyncio.ensure_future(drain(it)) for it in iterators]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
