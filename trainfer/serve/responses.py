"""OpenAI's response format: choices, streamed chunks, usage, logprobs and echoed prompts.

Two formats, picked once per route: `TEXT` for /v1/completions (text_completion) and `CHAT` for
/v1/chat/completions (chat.completion). Plain functions of finished data; no I/O, no engine.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from trainfer.infer.engine import TokenEvent
from trainfer.io.tokenizer import Tokenizer

TopLogprobs = list[tuple[int, float]]


@dataclass
class Prompt:
    """One prompt of a request: its ids and, when echoed, its text and the logprobs of tokens 1.."""

    ids: list[int]
    text: str = ""
    echo: bool = False
    logprobs: list[tuple[float, TopLogprobs]] | None = None


def echoed(prompts: list[Prompt], n: int) -> list[Prompt | None]:
    """Per choice (choice i answers prompt i // n): the prompt to put in front of it, if echoed."""
    return [p if p.echo else None for p in prompts for _ in range(n)]


@dataclass
class Choice:
    """One sample as it grows (or as the response cache stored it): what JSON and chunks are built from."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, TopLogprobs]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def add(self, e: TokenEvent) -> None:
        """A stop token (EOS, end of turn) adds no text but is a generated token: it counts in usage and
        has its logprob, as in vLLM and OpenAI (lm-evaluation-harness scores a continuation ending in
        one by that logprob)."""
        self.text += e.text
        self.finish_reason = e.finish_reason or self.finish_reason
        self.error = e.error or self.error
        if e.token_id < 0:
            return  # an error event carries no token
        self.token_ids.append(e.token_id)
        if e.logprob is not None:
            self.logprobs.append((e.logprob, e.top_logprobs))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Choice:
        return cls(
            d["text"], d["token_ids"], [(lp, [tuple(t) for t in top]) for lp, top in d["logprobs"]], d["finish_reason"]
        )


def usage(
    prompts: list[Prompt], choices: list[Choice], cached_tokens: int | None = None, route: str | None = None
) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` (prompt tokens from the prefix cache) when known,
    and with --upstream, `route`: who answered (serve/route.py)."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if route is not None:
        out["route"] = route
    return out


class Format:
    """What differs between the two endpoints; the shared envelope lives here."""

    object: str
    chunk_object: str
    id_prefix: str
    prompt_param: str  # the request field that holds the prompt, named in context-length errors

    def new_id(self) -> str:
        return self.id_prefix + uuid.uuid4().hex

    def envelope(self, rid: str, model: str, chunk: bool) -> dict[str, Any]:
        return {
            "id": rid,
            "object": self.chunk_object if chunk else self.object,
            "created": int(time.time()),
            "model": model,
        }

    def choice(self, tok: Tokenizer, index: int, c: Choice, prompt: Prompt | None) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, index: int, text: str, finish: str | None, logprobs: Any, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs(self, tok: Tokenizer, c: Choice, offset: int = 0, prompt: Prompt | None = None) -> Any:
        raise NotImplementedError

    def body(
        self,
        tok: Tokenizer,
        model: str,
        prompts: list[Prompt],
        choices: list[Choice],
        n: int,
        timings: dict[str, Any],
        rid: str | None = None,
        route: str | None = None,
    ) -> bytes:
        """The whole JSON answer (choice i belongs to prompt i // n); echo adds each prompt in front."""
        echo = echoed(prompts, n)
        out = {
            **self.envelope(rid or self.new_id(), model, chunk=False),
            "choices": [self.choice(tok, i, c, echo[i]) for i, c in enumerate(choices)],
            "usage": usage(prompts, choices, route=route),
            "timings": timings,
        }
        return json.dumps(out).encode()

    def chunk(self, rid: str, model: str, choice: dict[str, Any]) -> str:
        return sse({**self.envelope(rid, model, chunk=True), "choices": [choice]})

    def usage_chunk(
        self,
        rid: str,
        model: str,
        prompts: list[Prompt],
        choices: list[Choice],
        cached_tokens: int | None = None,
        route: str | None = None,
    ) -> str:
        used = usage(prompts, choices, cached_tokens, route)
        return sse({**self.envelope(rid, model, chunk=True), "choices": [], "usage": used})


class TextFormat(Format):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"
    prompt_param = "prompt"

    def choice(self, tok: Tokenizer, index: int, c: Choice, prompt: Prompt | None) -> dict[str, Any]:
        text = (prompt.text if prompt else "") + c.text
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(tok, c, 0, prompt),
            "finish_reason": c.finish_reason,
        }

    def delta(self, index: int, text: str, finish: str | None, logprobs: Any, first: bool) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, tok: Tokenizer, c: Choice, offset: int = 0, prompt: Prompt | None = None) -> Any:
        """Legacy completions logprobs; with echo, the prompt's tokens come first (the first one has none)."""
        ids, values = list(c.token_ids), list(c.logprobs)
        if prompt is not None and prompt.logprobs is not None:
            ids = prompt.ids + ids
            values = [(None, None), *prompt.logprobs, *values]
        if not values or len(values) != len(ids):
            return None
        pieces = [tok.decode([t]) for t in ids]
        offsets, pos = [], offset
        for piece in pieces:
            offsets.append(pos)
            pos += len(piece)
        return {
            "tokens": pieces,
            "token_logprobs": [lp for lp, _ in values],
            "top_logprobs": [None if top is None else {tok.decode([t]): v for t, v in top} for _, top in values],
            "text_offset": offsets,
        }


class ChatFormat(Format):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    prompt_param = "messages"

    def choice(self, tok: Tokenizer, index: int, c: Choice, prompt: Prompt | None) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self.logprobs(tok, c),
            "finish_reason": c.finish_reason,
        }

    def delta(self, index: int, text: str, finish: str | None, logprobs: Any, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, tok: Tokenizer, c: Choice, offset: int = 0, prompt: Prompt | None = None) -> Any:
        if not c.logprobs:
            return None
        content = []
        for t, (lp, top) in zip(c.token_ids, c.logprobs, strict=False):
            piece = tok.decode([t])
            alts = [{"token": tok.decode([a]), "logprob": v, "bytes": list(tok.decode([a]).encode())} for a, v in top]
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts})
        return {"content": content}


TEXT, CHAT = TextFormat(), ChatFormat()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def replay(
    fmt: Format,
    tok: Tokenizer,
    model: str,
    prompts: list[Prompt],
    choices: list[Choice],
    n: int,
    include_usage: bool,
    rid: str | None = None,
    route: str | None = None,
) -> list[str]:
    """A finished (e.g. cached) answer as server-sent events: each choice whole in one chunk, then its end."""
    rid, lines = rid or fmt.new_id(), []
    for i, (c, echo) in enumerate(zip(choices, echoed(prompts, n), strict=True)):
        text = (echo.text if echo else "") + c.text
        lines.append(fmt.chunk(rid, model, fmt.delta(i, text, None, fmt.logprobs(tok, c, 0, echo), first=True)))
        lines.append(fmt.chunk(rid, model, fmt.delta(i, "", c.finish_reason, None, first=False)))
    if include_usage:
        lines.append(fmt.usage_chunk(rid, model, prompts, choices, route=route))
    lines.append("data: [DONE]\n\n")
    return lines
