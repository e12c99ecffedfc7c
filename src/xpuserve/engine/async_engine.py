"""The engine stepping in its own thread; asyncio callers enqueue requests and await their outputs.

The LLMEngine is not thread-safe, so every call into it happens on the engine thread: the
event loop hands over adds and aborts through a queue, and the engine thread hands outputs
back with loop.call_soon_threadsafe. What the event loop may read is `info` (fixed at start-up)
and `stats()` (counters).

The engine thread also builds the engine. On CPUs, torch's OpenMP gives every thread that
runs parallel work a team of its own; with the model loaded on one thread and stepped on
another, two teams share the cores, OpenMP throttles its spinning workers, and decode took
2.4x as long (57 ms a token instead of 23 on the benchmark model, 2 cores).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.engine.model_info import ModelInfo
from xpuserve.engine.outputs import EngineStats, RequestOutput
from xpuserve.sampling_params import SamplingParams


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineDead(RuntimeError):
    """The engine thread stopped on an error; no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], LLMEngine], max_waiting: int = 1024):
        """Builds the engine with `make_engine` on the engine thread; raises what building raised."""
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.engine: LLMEngine | None = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_engine, built), name="xpuserve-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self.engine is None:
            raise self.error
        self.info: ModelInfo = self.engine.info

    def stats(self) -> EngineStats:
        return self.engine.stats()  # plain counters, read between steps or during one: never torn

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they grow; the last one has finished=True. The request
        was checked with `info.check_request`; `prompt` is the text the ids came from, if any.
        Leaving the loop early (client gone, task cancelled) aborts the request."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        if self._commands.qsize() + len(self.engine.scheduler.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"{self.max_waiting} requests are already waiting")
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt_token_ids, params, prompt, outputs, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts what is still running, stops the engine thread and the engine (and so the other ranks)."""
        self._stopping.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout)
        self.engine.shutdown()

    def _run(self, make_engine: Callable[[], LLMEngine], built: threading.Event) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            self.error = e
            return
        finally:
            built.set()
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                self._deliver_all([(output.request_id, output) for output in self.engine.step()])
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear of it
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDead(f"the engine stopped: {e!r}"))
        finally:
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
                self._deliver(request_id, EngineDead("the server is shutting down"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params, command.prompt)
            except ValueError as e:
                command.loop.call_soon_threadsafe(command.outputs.put_nowait, e)
                return
            self._streams[command.request_id] = command
        elif command[0] == "abort":
            self.engine.abort_request(command[1])
            self._streams.pop(command[1], None)

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hands a step's outputs to their event loops: one wake-up per loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                del self._streams[request_id]
            by_loop.setdefault(stream.loop, []).append((stream.outputs, item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in puts:
        outputs.put_nowait(item)
