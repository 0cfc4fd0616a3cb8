"""Admission without a model or a server: the capacity contract every route relies on."""

from __future__ import annotations

import pytest

from trainfer.serve.admission import Admission
from trainfer.serve.errors import APIError


def test_tickets_hold_sequences_until_released_once():
    adm = Admission(capacity=5)
    a = adm.admit(3, "n")
    b = adm.admit(2, "n")
    assert adm.inflight == 5
    with pytest.raises(APIError) as full:
        adm.admit(1, "n")
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
    a.release()
    a.release()  # a second release (a close racing a disconnect) gives nothing back twice
    assert adm.inflight == 2
    adm.admit(3, "n").release()
    b.release()
    assert adm.inflight == 0


def test_a_request_that_could_never_fit_is_a_400_naming_its_field():
    adm = Admission(capacity=4)
    with pytest.raises(APIError) as never:
        adm.admit(5, "test_time.n")
    assert never.value.status == 400 and never.value.param == "test_time.n" and "capacity of 4" in never.value.message
    assert adm.inflight == 0  # a refusal holds nothing


def test_a_ticket_used_as_a_context_manager_is_released_on_error():
    adm = Admission(capacity=2)
    with pytest.raises(RuntimeError), adm.admit(2, "n"):
        assert adm.inflight == 2
        raise RuntimeError("the work failed")
    assert adm.inflight == 0
