"""Redaction of e-mail addresses and phone numbers: a table that must be caught, and lookalikes that must not."""

from __future__ import annotations

import pytest

from trainfer.data.redact import redact

EMAILS = ["john.doe@example.com", "jane+tag@mail.co.uk", "müller@beispiel.de", "a_b-c@sub.domain.org", "X@Y.IO"]

PHONES = [
    # international
    "+1 (555) 123-4567",
    "+44 20 7946 0958",
    "+49 30 12345678",
    "+33 1 23 45 67 89",
    "+91-98765-43210",
    "+4915112345678",
    "+7 495 123-45-67",
    "+86 138 0013 8000",
    "0049 30 1234567",
    # North American
    "(555) 123-4567",
    "555-123-4567",
    "555.123.4567",
    "555 123 4567",
    "1-800-555-0199",
    # national, with a trunk 0
    "020 7946 0958",
    "07700 900123",
    "030 12345678",
    "(030) 1234567",
    "0171 1234567",
    "01 23 45 67 89",
    "06.12.34.56.78",
    "09-1234-5678",
    "0612345678",
]

LOOKALIKES = [
    "version 1.2.3",
    "v2.10.4",
    "10.0.19041.1234",
    "2024-01-15",
    "15.01.2024",
    "01/15/2024",
    "2024-01-15 12:30",
    "12/31/2024 23:59",
    "2024.01.15",
    "20240115",
    "$1,234.56",
    "1 234 567,89 €",
    "€1.234.567,00",
    "1,000,000",
    "3.14159265",
    "+12.5%",
    "0.25 0.50 0.75 1.00",
    "192.168.100.200",
    "12:30:45",
    "order 123456789",
    "ISBN 978-3-16-148410-0",
    "pages 100-1000",
    "1. 2. 3. 4. 5. 6.",
    "2 + 2 = 4",
    "x = 123 456 789",
    "call 555-1234",  # a short local number cannot be told from a range or a code: left alone
    "lodash@4.17.21",
    "@username",
    "user@localhost",
    "A1B2C3D4",
]


@pytest.mark.parametrize("email", EMAILS)
def test_emails_are_redacted(email):
    assert redact(f"Write to {email}, please.") == "Write to [email], please."


@pytest.mark.parametrize("phone", PHONES)
def test_phones_are_redacted(phone):
    assert redact(f"Call {phone} today.") == "Call [phone] today."
    assert redact(phone) == "[phone]"


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_are_kept(text):
    assert redact(f"See {text} here.") == f"See {text} here."


def test_several_in_one_text():
    text = "Mail ann@corp.com or bob@corp.com, phone +44 20 7946 0958 / 555-123-4567 (v1.2.3, 2024-01-15)."
    want = "Mail [email] or [email], phone [phone] / [phone] (v1.2.3, 2024-01-15)."
    assert redact(text) == want
