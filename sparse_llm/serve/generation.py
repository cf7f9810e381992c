"""The engine requests behind one HTTP request: start them, merge their outputs, stop them on exit.

An HTTP request with several prompts (a completion batch) becomes one engine request per prompt; their
cumulative outputs are merged into one stream of (prompt_index, RequestOutput). Leaving the iteration
early (client gone, server error) closes every engine stream, which aborts the engine requests and frees
their KV blocks at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sparse_llm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from sparse_llm.engine.outputs import RequestOutput
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.serve.errors import OpenAIError
from sparse_llm.serve.metrics import ServerMetrics

_DONE = object()


class GenerationRun:
    """One HTTP request's engine requests (one per prompt); iterate for (prompt_index, cumulative output)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, request_id: str, prompts: list[list[int]],
                 params: list[SamplingParams], override: dict | None):
        self.engine, self.metrics, self.request_id = engine, metrics, request_id
        self.prompts, self.params, self.override = prompts, params, override
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first: tuple[int, RequestOutput] | None = None
        self._started = False
        self._finished: set[int] = set()
        self.final: dict[int, RequestOutput] = {}  # the last output of each prompt seen so far
        self._closed = False

    def engine_id(self, i: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"

    async def _pump(self, i: int) -> None:
        """Forward one engine stream into the shared queue; cancelling this task aborts the engine request."""
        gen = self.engine.generate(self.prompts[i], self.params[i], self.engine_id(i), self.override)
        try:
            async for out in gen:
                self._queue.put_nowait((i, out))
        except Exception as e:  # handed to the consumer, which decides the status code
            self._queue.put_nowait((i, e))
        finally:
            await gen.aclose()
            self._queue.put_nowait((i, _DONE))

    async def start(self) -> None:
        """Submit every prompt and wait for the first output, so that bad requests fail before a 200 is sent."""
        self._started = True
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.prompts))]
        self._first = await self._next()

    async def _next(self) -> tuple[int, RequestOutput] | None:
        while len(self._finished) < len(self.prompts):
            i, item = await self._queue.get()
            if item is _DONE:
                self._finished.add(i)
                continue
            if isinstance(item, EngineDeadError):
                raise OpenAIError(503, f"the engine is not running: {item}", code="engine_dead")
            if isinstance(item, ValueError):
                raise OpenAIError(400, str(item))
            if isinstance(item, BaseException):
                raise item
            self.final[i] = item
            if item.finished:
                self.metrics.observe_finished(item)
            return i, item
        return None

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if not self._started:
            await self.start()
        item, self._first = self._first, None
        while item is not None:
            yield item
            item = await self._next()

    async def collect(self) -> dict[int, RequestOutput]:
        """Run to completion; the final output of every prompt."""
        try:
            async for _ in self:
                pass
        finally:
            await self.close()
        return self.final

    async def close(self) -> None:
        """Abort whatever is still running; idempotent, and safe to call again if a cancellation cut the
        first call short (the counting and the cancelling happen before the first await)."""
        if not self._closed:
            self._closed = True
            for i in range(len(self.prompts)):
                out = self.final.get(i)
                if out is None or not out.finished:
                    self.metrics.request_finished.labels(self.metrics.model_name, "abort").inc(self.params[i].n)
            for t in self._tasks:
                t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
