"""The `test_time` extension of /v1/chat/completions: a trainfer/reason strategy driven on the server's
AsyncEngine (each draw one request among the others), answered as a normal chat completion whose message is
the chosen sample, plus a `test_time` object (answer, votes or scores, every candidate's answer, compute);
`usage` counts every prompt and generated token the strategy spent. Streamed, the decided answer arrives
whole in one chunk (a vote cannot be streamed before it is counted)."""

from __future__ import annotations

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
from trainfer.serve.errors import APIError, context_length
from trainfer.serve.responses import CHAT, Choice, Prompt, replay, sse
from trainfer.serve.schemas import ChatCompletionRequest
from trainfer.serve.server import Server
from trainfer.serve.streaming import EventStream, lines_of, unless_disconnected

DEFAULT_MAX_TOKENS = 256


async def answer(server: Server, req: ChatCompletionRequest, request: Request) -> Response:
    tt, messages = req.test_time, req.chat()
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
    start = time.perf_counter()
    # a draw never holds more than n sequences at once; a cancelled draw aborts its request (AsyncEngine.events)
    with server.admission.admit(tt.n, "test_time.n"):
        try:
            finished, result = await unless_disconnected(drive(server, steps, req.model), request.receive)
        except ContextLengthError as e:
            raise context_length(str(e), "messages") from None
    if not finished:
        return Response(status_code=499)
    assert result is not None
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
        return EventStream(lines_of(lines))
    body = json.loads(CHAT.body(server.tokenizer, server.model_id, prompts, choices, 1, {}, rid))
    body["usage"] = usage
    body["timings"] = timings
    body["test_time"] = extension
    return Response(json.dumps(body), media_type="application/json")


async def drive(server: Server, steps, model: str | None = None) -> Result:
    """Run a strategy's draws one after another, each as its own request on the shared AsyncEngine."""
    adapter = server.adapter_for(model)
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
