"""Client disconnects: stop the work of a client that is gone, at once.

- Before the response starts (a non-streaming request, or a streaming one waiting for its first token),
  `cancel_on_disconnect` races the handler against the client's `http.disconnect` and cancels the loser.
- While streaming, `SSEResponse` is cancelled by Starlette on disconnect; it then closes its body iterator
  (shielded from the cancellation), whose `finally` aborts the engine requests.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request
from starlette.responses import Response, StreamingResponse

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": never sent, only counted in /metrics


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientDisconnected (with `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def client_gone_response() -> Response:
    return Response(status_code=CLIENT_CLOSED)


class SSEResponse(StreamingResponse):
    """text/event-stream that always runs `on_close` (e.g. aborting the engine requests) when it ends,
    normally or because the client disconnected, even if no event was produced yet."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()
