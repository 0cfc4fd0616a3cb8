"""The request log behind `trainfer serve --log-requests DIR`: each finished answer as one JSON line, the
raw material of `trainfer dataset from-logs` (trainfer/data/from_logs.py).

Files are DIR/requests-YYYYMMDD-HHMMSS-N.jsonl (UTC time the file was begun; N tells apart files begun in
the same second, by this server or a replica sharing DIR), each begun anew once the next line would take it
past `max_bytes`. Two kinds of line, told apart by "object":

  {"object": "chat.completion" | "text_completion", "id", "time", "model", "messages" | "prompt",
   "params", "stream", "choices": [{"index", "text", "finish_reason"}], "usage", "timings"}
  {"object": "feedback", "id", "time", "rating": "up" | "down", "index", "comment"}   (POST /v1/feedback)

Writing happens on one thread fed by a bounded queue, so the event loop never waits on the disk; a line
that cannot be written (disk error, queue full) is counted through `on_error` and the request is served.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from trainfer.errors import TrainferError
from trainfer.serve.responses import Choice
from trainfer.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

log = logging.getLogger("trainfer.serve")

DEFAULT_MAX_BYTES = 64 << 20
MAX_PENDING = 10_000  # lines queued for the writer; beyond this the disk is slower than the traffic
NOT_PARAMS = {"model", "messages", "prompt", "stream", "stream_options", "user"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_record(
    obj: str,
    rid: str,
    model: str,
    req: SamplingRequest,
    choices: list[Choice],
    usage: dict[str, Any],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """One finished answer as a log line: what was asked (only the parameters the client set) and what came
    back per choice (the generated text, without an echoed prompt)."""
    record: dict[str, Any] = {"object": obj, "id": rid, "time": now_iso(), "model": model}
    if isinstance(req, ChatCompletionRequest):
        record["messages"] = [{"role": m.role, "content": m.text()} for m in req.messages]
    else:
        assert isinstance(req, CompletionRequest)
        record["prompt"] = req.prompt
    record["params"] = req.model_dump(exclude_unset=True, exclude=NOT_PARAMS)
    record["stream"] = req.stream
    record["choices"] = [{"index": i, "text": c.text, "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
    record["usage"] = usage
    record["timings"] = timings
    return record


def feedback_record(rid: str, rating: str, index: int | None, comment: str | None) -> dict[str, Any]:
    return {"object": "feedback", "id": rid, "time": now_iso(), "rating": rating, "index": index, "comment": comment}


class RequestLog:
    """Appends records as JSON lines under `directory`, rotating by size, on a writer thread of its own."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_error: Callable[[Exception], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if max_bytes <= 0:
            raise TrainferError(f"the request log's file size bound must be > 0 bytes, got {max_bytes}")
        self.directory, self.max_bytes, self.on_error = Path(directory), max_bytes, on_error
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainferError(f"cannot create the request log directory {self.directory}: {e}") from None
        self.pending: queue.Queue[dict[str, Any] | None] = queue.Queue(max_pending)
        self.file: IO[bytes] | None = None
        self.size = 0
        self.files: list[Path] = []  # every file this log has begun, in order
        self._failed = False
        self._closed = False
        self._writer = threading.Thread(target=self._write_all, name="request-log", daemon=True)
        self._writer.start()

    def append(self, record: dict[str, Any]) -> None:
        """Queue a record for the writer; never blocks (a full queue loses the line, counted)."""
        try:
            self.pending.put_nowait(record)
        except queue.Full:
            self._fail(OSError(f"{self.pending.maxsize} lines waiting to be written: the disk is too slow"))

    def close(self) -> None:
        """Write what is queued, then close the file (blocks until done)."""
        if self._closed:
            return
        self._closed = True
        self.pending.put(None)
        self._writer.join()

    # ---- the writer thread ----
    def _write_all(self) -> None:
        while (record := self.pending.get()) is not None:
            try:
                # A lone surrogate (only a stop string could hold one) becomes its JSON escape: the line stays UTF-8.
                self._write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
            except Exception as e:  # a disk error (or an unencodable record) loses this line, not the server
                self._fail(e)
                self._drop_file()
        self._drop_file()

    def _write(self, line: bytes) -> None:
        if self.file is None or (self.size and self.size + len(line) > self.max_bytes):
            self._begin_file()
        assert self.file is not None
        self.file.write(line)
        self.file.flush()  # one line per write: a crash tears at most the line being written
        self.size += len(line)

    def _begin_file(self) -> None:
        self._drop_file()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        n = 0
        while True:  # "x": never append to a file another process (or an earlier run) began
            path = self.directory / f"requests-{stamp}-{n}.jsonl"
            try:
                self.file = open(path, "xb")  # noqa: SIM115 (open across writes, closed in _drop_file)
                break
            except FileExistsError:
                n += 1
        self.size = 0
        self.files.append(path)

    def _drop_file(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self._fail(e)
            self.file = None

    def _fail(self, e: Exception) -> None:
        if self.on_error is not None:
            self.on_error(e)
        if not self._failed:
            self._failed = True
            log.warning("request log: a line was not written (%s: %s); requests are still served (logged once)",
                        type(e).__name__, e)  # fmt: skip
