"""The engine stepped on an asyncio loop for the HTTP server: requests added from route handlers, each reading its
own queue of token events (docs/engine.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from trainfer.infer.engine import Engine, TokenEvent
from trainfer.infer.sampling import SamplingParams


class AsyncEngine:
    """The engine stepped by a task on the caller's asyncio loop; each request reads its own queue.

    Why not a background thread: measured on the 2-core dev machine, PyTorch runs this model ~1.8x
    slower from a second thread than from the main one (docs/LOG.md), and uvicorn keeps its loop on the
    main thread. A step blocks the loop for its duration (tens of ms; chunked prefill bounds it), then
    the loop serves I/O before the next step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def _ensure_running(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._wake = loop, asyncio.Event()
            self._task = loop.create_task(self._run())
        assert self._wake is not None
        return self._wake

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        queue: asyncio.Queue | None = None,
        adapter: str | None = None,
    ) -> asyncio.Queue:
        """Queue a request now (errors such as ContextLengthError raise here). Its events go to `queue`
        (several requests may share one) or a new one; read them with `events` or from the queue."""
        wake = self._ensure_running()
        self.engine.add_request(request_id, prompt_ids, params, adapter)
        self._queues[request_id] = queue = queue if queue is not None else asyncio.Queue()
        wake.set()
        return queue

    async def events(self, request_id: str, n: int) -> AsyncIterator[TokenEvent]:
        """Events of an added request until all n samples have finished; abort it if the reader leaves."""
        queue, unfinished = self._queues[request_id], n
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    unfinished -= 1
        finally:
            self.abort(request_id)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        self.add(request_id, prompt_ids, params)
        async for event in self.events(request_id, params.n):
            yield event

    def abort(self, request_id: str) -> None:
        """Stop a request (a no-op once it has finished) and forget its queue."""
        self._queues.pop(request_id, None)
        self.engine.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
            try:
                events = self.engine.step()
            except Exception as e:  # a bug outside any one sequence: fail every request rather than hang them
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                for queue in self._queues.values():
                    queue.put_nowait(e)
                events = []
            for ev in events:
                queue = self._queues.get(ev.request_id)
                if queue is not None:
                    queue.put_nowait(ev)
            await asyncio.sleep(0)  # let the loop read requests and write responses between steps
