"""Every error a client can get, in one place: `APIError` (raised anywhere in serve/, answered in OpenAI's
error body) and the handlers that turn FastAPI's own errors (validation, unknown route, wrong method) into
the same body. A route never builds an error response by hand."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from trainfer.infer.sampling import MAX_STOP_CHARS, MAX_STOPS
from trainfer.serve.responses import error_body


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> Response:
        # json.dumps escapes non-ASCII, so a lone surrogate echoed from a request cannot break the encoding.
        body = json.dumps(error_body(self.message, self.kind, self.param, self.code))
        return Response(body, self.status, self.headers, media_type="application/json")


class BodyTooLarge(Exception):
    """Raised inside the app by the body cap (see app.Gate); the gate answers 413 itself."""


def context_length(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)


async def api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


# What a field accepts, for fields whose type is a union (pydantic would report each member separately).
UNION_HELP = {
    "prompt": "a non-empty string, a list of token ids, or a list of either (a batch)",
    "stop": f"a string or a list of at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters",
}


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """One 400 naming the first bad field, in words a client can act on."""
    errors = exc.errors()
    first = errors[0]
    loc = [p for p in first["loc"] if p != "body"]
    field = str(loc[0]) if loc else None
    where = ".".join(str(p) for p in loc) or "body"
    part = next((e for e in errors if e["loc"][-1:] == ("type",) and "content" in e["loc"]), None)
    if first["type"] == "json_invalid":
        message, field = f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])} (at {where})", None
    elif first["type"] == "extra_forbidden":
        message = f"unsupported field '{where}': trainfer does not implement it"
    elif part is not None and part.get("input") != "text":
        message = f"unsupported content part type {part.get('input')!r} in '{field}': trainfer serves text only"
    elif field in UNION_HELP and sum(1 for e in errors if e["loc"][1:2] == (field,)) > 1:
        message = f"invalid field '{field}': must be {UNION_HELP[field]}"
    else:
        message = f"invalid field '{where}': {first['msg']}"
    return APIError(400, message, param=field).response()


async def http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind=kind).response()
