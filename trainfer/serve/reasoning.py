"""The `test_time` extension of /v1/chat/completions: a trainfer/reason strategy driven on the server's
AsyncEngine (each draw one request among the others), answered as a normal chat completion whose message is
the chosen sample, plus a `test_time` object (answer, votes or scores, every candidate's answer, compute);
`usage` counts every prompt and generated token the strategy spent. Streamed, the decided answer arrives
whole in one chunk (a vote cannot be streamed before it is counted)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from trainfer.errors import TrainferError
from trainfer.infer.engine import ContextLengthError
from trainfer.reason.strategies import Result, chosen_text, plan, samples_of
from trainfer.serve.responses import CHAT, Choice, Prompt, replay, sse
from trainfer.serve.schemas import ChatCompletionRequest

DEFAULT_MAX_TOKENS = 256


async def answer(server, req: ChatCompletionRequest, request: Request, messages: list[dict]) -> Response:
    from trainfer.serve.app import APIError, EventStream, aiter_of, until_disconnected

    tt = req.test_time
    assert tt is not None
    for name, bad in [("n", req.n != 1), ("logprobs", req.logprobs), ("stop", bool(req.stop))]:
        if bad:
            raise APIError(400, f"{name} cannot be combined with test_time (use test_time.n for samples)", param=name)
    if tt.wave > tt.n:
        raise APIError(400, "test_time.wave must not exceed test_time.n", param="test_time.wave")
    options = dict(
        n=tt.n, kind=tt.kind, temperature=req.temperature, max_tokens=req.requested_max_tokens or DEFAULT_MAX_TOKENS,
        seed=0 if req.seed is None else req.seed, threshold=tt.threshold, wave=tt.wave, rounds=tt.rounds,
        scorer=tt.scorer,
    )  # fmt: skip
    try:
        steps = plan(server.tokenizer, server.llm.model.cfg, messages, tt.strategy.replace("_", "-"), **options)
    except TrainferError as e:
        raise APIError(400, str(e), param="test_time") from None
    server.check_capacity(tt.n, "test_time.n")  # a draw never holds more than n sequences at once
    server.inflight += tt.n
    start = time.perf_counter()
    work = asyncio.ensure_future(drive(server, steps, server.adapter_for(req.model)))
    gone = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()  # a cancelled draw aborts its request (AsyncEngine.events cleans up)
        server.inflight -= tt.n
    if work not in done:
        return Response(status_code=499)
    try:
        result = work.result()
    except ContextLengthError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    text = chosen_text(result)
    prompts = [Prompt(server.llm.chat_prompt(messages))]
    choices = [Choice(text=text, token_ids=server.tokenizer.encode(text, add_bos=False), finish_reason="stop")]
    c = result.compute
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.generated_tokens,
             "total_tokens": c.prompt_tokens + c.generated_tokens,
             "prompt_tokens_details": {"cached_tokens": c.cached_prompt_tokens}}  # fmt: skip
    extension = test_time_json(result)
    rid, timings = CHAT.new_id(), {"total_ms": round(1000 * (time.perf_counter() - start), 2)}
    server.log_request(CHAT, rid, req, choices, usage, timings)
    if req.stream:
        lines = replay(CHAT, server.tokenizer, server.model_id, prompts, choices, 1, False, rid)[:-1]
        tail = CHAT.envelope(rid, server.model_id, chunk=True)
        lines.append(sse({**tail, "choices": [], "test_time": extension, "usage": usage}))
        lines.append("data: [DONE]\n\n")
        return EventStream(aiter_of(lines), lambda: None)
    body = json.loads(CHAT.body(server.tokenizer, server.model_id, prompts, choices, 1, {}, rid))
    body["usage"] = usage
    body["timings"] = timings
    body["test_time"] = extension
    return Response(json.dumps(body), media_type="application/json")


async def drive(server, steps, adapter: str | None = None) -> Result:
    """Run a strategy's draws one after another, each as its own request on the shared AsyncEngine."""
    try:
        draw = next(steps)
        while True:
            rid = f"tt-{uuid.uuid4().hex}"
            server.engine.add(rid, draw.prompt, draw.params(), adapter=adapter)
            per_sample: list[list] = [[] for _ in range(draw.n)]
            async for e in server.engine.events(rid, draw.n):
                per_sample[e.index].append(e)
            draw = steps.send(samples_of(per_sample))
    except StopIteration as done:
        return done.value


def test_time_json(result: Result) -> dict[str, Any]:
    return {
        "strategy": result.strategy.replace("-", "_"),
        "answer": result.answer,
        "answers": result.answers,
        "votes": result.votes,
        "scores": result.scores,
        "compute": dataclasses.asdict(result.compute),
    }
