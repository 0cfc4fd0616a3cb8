"""The disconnect race and the event stream, driven by hand-made ASGI receive/send (no server, no model)."""

from __future__ import annotations

import asyncio

import pytest

from trainfer.serve.streaming import EventStream, lines_of, unless_disconnected


def client(leaves_after: float | None):
    """An ASGI receive: the request body, then `http.disconnect` after `leaves_after` seconds (or never)."""
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600 if leaves_after is None else leaves_after)
        return {"type": "http.disconnect"}

    return receive


def test_work_that_finishes_first_returns_its_result():
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert asyncio.run(unless_disconnected(work(), client(None))) == (True, 7)


def test_a_client_that_leaves_first_cancels_the_work_and_its_cleanup_has_run():
    cleaned = []

    async def work() -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(True)  # the engine abort of a real route
        return 0

    async def main() -> tuple:
        result = await unless_disconnected(work(), client(0.01))
        return result, list(cleaned)  # read before anything else runs: the clean-up is already done

    assert asyncio.run(main()) == ((False, None), [True])


def test_the_works_exception_propagates():
    async def work() -> int:
        raise ValueError("the engine failed")

    with pytest.raises(ValueError, match="engine failed"):
        asyncio.run(unless_disconnected(work(), client(None)))


def run_stream(lines, leaves_after: float | None) -> tuple[list[dict], list[str]]:
    sent, closed = [], []
    response = EventStream(lines, lambda: closed.append("on_close"))

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(response({"type": "http"}, client(leaves_after), send))
    return sent, closed


def test_a_finished_stream_sends_every_line_then_closes_once():
    sent, closed = run_stream(lines_of(["data: 1\n\n", "data: [DONE]\n\n"]), None)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]
    assert sent[-1]["more_body"] is False and closed == ["on_close"]
    assert (b"content-length", b"0") not in [(k, v) for k, v in response_headers(sent)]


def response_headers(sent: list[dict]) -> list[tuple[bytes, bytes]]:
    return sent[0]["headers"]


def test_a_stream_whose_client_leaves_stops_generating_and_closes():
    produced, finalized = [], []

    async def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield f"data: {i}\n\n"
                i += 1
                await asyncio.sleep(0.005)
        finally:
            finalized.append(True)

    sent, closed = run_stream(endless(), 0.05)
    assert closed == ["on_close"] and finalized == [True]
    assert 1 < len(produced) < 100  # it ran, and it stopped when the client left
    assert all(m.get("more_body", True) for m in sent)  # no final frame to a client that is gone
