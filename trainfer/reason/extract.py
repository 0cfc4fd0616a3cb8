"""Answers out of generated text, per task kind: the final number, an option letter, or the last line."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_IS = re.compile(r"answer(?: is|:)\s*\**\s*(.+)", re.IGNORECASE)
OPTION = re.compile(r"\b([A-E])\b")


def number(text: str) -> str | None:
    """The number after "answer is"/"answer:" if there is one, else the last number in the text; commas and
    trailing zeros after a decimal point dropped, so "1,000.50" and "1000.5" vote together."""
    m = ANSWER_IS.search(text)
    stated = NUMBER.findall(m.group(1)) if m else []
    anywhere = NUMBER.findall(text)
    if not (stated or anywhere):
        return None
    value = (stated[0] if stated else anywhere[-1]).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def option(text: str) -> str | None:
    """An option letter A-E: after "answer is" if stated, else the last standalone one."""
    m = ANSWER_IS.search(text)
    if m and (hit := OPTION.search(m.group(1))):
        return hit.group(1)
    hits = OPTION.findall(text)
    return hits[-1] if hits else None


def last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


EXTRACTORS = {"number": number, "option": option, "line": last_line}
