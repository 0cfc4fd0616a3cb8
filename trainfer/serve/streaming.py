"""Answers that outlive the route function, and the one way serve/ notices a client that has left.

`unless_disconnected` is the only race between a piece of work and the client's `http.disconnect`: the
non-streamed routes, test-time compute and `EventStream` all go through it, so an abandoned request stops
generating however it was asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import Response

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]  # ASGI's receive


async def until_disconnected(receive: Receive) -> None:
    """Return when the client has gone (uvicorn also says so once the answer is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> tuple[bool, T | None]:
    """(True, result) if `work` finishes first, (False, None) if the client leaves first; `work` is
    cancelled and its clean-up has run before this returns, and its exception, if any, propagates."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task in done and not task.cancelled():
        return True, task.result()
    return False, None


async def lines_of(lines: list[str]) -> AsyncIterator[str]:
    """A finished answer (a cache hit, a test-time result) as the stream `EventStream` reads."""
    for line in lines:
        yield line


class EventStream(Response):
    """A server-sent-events answer that stops as soon as the client leaves and runs its cleanup however
    it ends: finished, client gone, or never started.

    Why not Starlette's StreamingResponse: under ASGI spec 2.4 it learns of a disconnect only when a
    send fails, and uvicorn drops sends to a closed connection silently, so an abandoned stream went on
    generating to its last token. Here the pump races the client's `http.disconnect`.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        lines: AsyncIterator[str],
        on_close: Callable[[], None] = lambda: None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(headers={"cache-control": "no-cache", **(headers or {})})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # streamed: chunked
        self.lines, self.on_close = lines, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for line in self.lines:
                await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await unless_disconnected(pump(), receive)
        finally:
            await self.lines.aclose()  # type: ignore[attr-defined]
            self.on_close()
