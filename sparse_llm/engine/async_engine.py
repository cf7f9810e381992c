"""asyncio front of LLMEngine for the server: one background task steps the engine while requests exist.

The engine is not thread-safe, so only the background task touches its state: `generate` validates the
request on the caller's side (errors surface at once, e.g. as HTTP 400), then hands it to the loop, which
adds and aborts requests between steps and runs each step in a worker thread so the event loop stays free.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Callable

from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.engine.llm_engine import LLMEngine
from sparse_llm.engine.outputs import EngineStats, RequestOutput
from sparse_llm.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The background loop failed; every pending and later request gets this error."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.args = engine.args
        self.model_name = engine.model_name
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[Callable[[], None]] = []  # engine mutations, applied by the loop between steps
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._closing = False

    @classmethod
    def from_args(cls, args: LlmArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_args(args))

    # --- public API -----------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, sparse_override: dict | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes; stopping the iteration aborts the request."""
        self._check_alive()
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = self.engine.make_request(request_id, prompt, params, sparse_override)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(lambda: self._enqueue_now(req, queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and not self._closing:  # the consumer went away (client disconnect)
                self._submit(lambda: self.engine.abort_request(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort from outside the stream: its iterator yields a final output (finish_reason "abort") and ends."""
        self._submit(lambda: self._abort_now(request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Finish the step in flight, abort every request, stop the loop."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._wake.set()
            await self._task
        pending, self._pending = self._pending, []
        for fn in pending:  # requests submitted but not yet added: add them so that they end with "abort"
            fn()
        for rid in list(self.engine.requests):
            self._abort_now(rid)

    # --- the loop -------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self._error!r}")
        if self._closing:
            raise EngineDeadError("the engine is shut down")

    def _enqueue_now(self, req, queue: asyncio.Queue) -> None:
        try:
            self.engine.enqueue(req)
        except ValueError as e:  # e.g. the id was taken in the meantime: this request fails, the loop goes on
            queue.put_nowait(e)

    def _abort_now(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        queue = self._queues.get(request_id)
        if out is not None and queue is not None:
            queue.put_nowait(out)

    def _submit(self, fn: Callable[[], None]) -> None:
        self._pending.append(fn)
        if self._error is not None or self._closing:
            return
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run_loop())
        self._wake.set()

    async def _run_loop(self) -> None:
        try:
            while not self._closing:
                pending, self._pending = self._pending, []
                for fn in pending:
                    fn()
                if not self.engine.has_unfinished_requests():
                    self._wake.clear()
                    if not self._pending:
                        await self._wake.wait()
                    continue
                outputs = await asyncio.to_thread(self.engine.step)
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as e:  # the engine is broken: fail every waiting request, then refuse new ones
            logger.exception("engine loop failed")
            self._error = e
            for queue in self._queues.values():
                queue.put_nowait(e)
