"""Replace e-mail addresses and phone numbers in text with "[email]" and "[phone]" placeholders, before
logged conversations become a training set (`trainfer dataset from-logs`).

Phones are found in two steps: a loose pattern finds runs of digits and separators, then `is_phone` keeps
those shaped like a number someone can dial (international +CC or 00CC; national with a trunk 0, as in
Europe; North American 3-3-4). Dates, versions, prices, IPs and bare numbers are left alone; so are short
local numbers like 555-1234, which cannot be told apart from ranges and codes.
"""

from __future__ import annotations

import re

EMAIL = re.compile(
    r"(?<![\w.+-])[\w.%+-]+@"  # local part (any letters, as in internationalized addresses)
    r"(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}"  # labels, then a TLD of letters (not lodash@4.17.21)
    r"(?![\w-])"
)

SEP = r"[ .\-\u00a0]"
PHONE_LIKE = re.compile(
    r"(?<![\w+.,/:@\-])"  # not inside a word, number, version, date, address or price
    r"(?:\+|\(\+?)?\d[\d() .\-\u00a0]{5,}\d"
    r"(?![\w@]|[.,/:\-]\d)"  # nor running on into more of one
)
NORTH_AMERICAN = re.compile(rf"(?:\+?1{SEP}?)?(?:\(\d{{3}}\){SEP}?|\d{{3}}{SEP})\d{{3}}{SEP}\d{{4}}")


def is_phone(s: str) -> bool:
    """Is this run of digits and separators shaped like a phone number?"""
    if re.search(rf"{SEP}{{2}}", s) or s.count("(") != s.count(")"):
        return False  # "1. 2. 3" or "2 - 3": lists and arithmetic, not a number written by a person
    digits = re.sub(r"\D", "", s)
    if s.lstrip("(").startswith("+"):
        return 8 <= len(digits) <= 15  # E.164: at most 15 digits with the country code
    if NORTH_AMERICAN.fullmatch(s):
        return True
    if digits.startswith("00"):
        return 10 <= len(digits) <= 17  # the international prefix dialled from Europe
    first_group = re.split(rf"{SEP}|[()]", s.lstrip("("))[0]
    # A trunk 0, then an area code: "030 1234567", "01 23 45 67 89" (but not "0.25 0.50 0.75").
    return digits.startswith("0") and len(first_group) >= 2 and 9 <= len(digits) <= 12


def redact(text: str) -> str:
    text = EMAIL.sub("[email]", text)
    return PHONE_LIKE.sub(lambda m: "[phone]" if is_phone(m.group()) else m.group(), text)
