"""Admission: the server's capacity in sequences and who holds it.

Every route that puts work on the engine takes a `Ticket` first (a 400 if the request could never fit, a
429 if it does not fit now) and gives it back exactly once when its last sequence is done, however it
ended. The capacity counts sequences, not requests: a request with n samples over p prompts holds p x n.
"""

from __future__ import annotations

from trainfer.serve.errors import APIError


class Admission:
    """Owns the count of admitted sequences against the capacity (engine slots plus the queue); it does not
    touch the engine: aborting work is the holder's job, before it releases its ticket."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.inflight = capacity, 0

    def admit(self, seqs: int, param: str) -> Ticket:
        """A ticket for `seqs` sequences; `param` names the request field a refusal blames."""
        if seqs > self.capacity:
            raise APIError(
                400, f"{seqs} sequences (prompts x n) exceed this server's capacity of {self.capacity}", param=param
            )
        if self.inflight + seqs > self.capacity:
            raise APIError(
                429, "the server is at capacity; retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"}
            )
        self.inflight += seqs
        return Ticket(self, seqs)


class Ticket:
    """Sequences held on an `Admission`; `release` (or leaving a `with` block) gives them back, once."""

    def __init__(self, admission: Admission, seqs: int) -> None:
        self.admission, self.seqs, self.released = admission, seqs, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.inflight -= self.seqs

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
