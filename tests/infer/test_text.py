"""Stop strings that span tokens and UTF-8 characters split across tokens."""

from __future__ import annotations

import pytest

from trainfer.infer.sampling import SamplingParams
from trainfer.infer.text import Detokenizer, StopMatcher, TextOutput


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    "pieces,stops,want,hit",
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
        (["a", "b", "<", "/", "s", ">", "tail"], ["</s>"], "ab", True),
        (["x", "<", "/", "t"], ["</s>"], "x</t", False),  # a partial match that never completes is released
        (["one\n", "\nUser:", " more"], ["\n\n", "User:"], "one", True),  # the earliest stop wins
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_strings_across_token_boundaries(pieces, stops, want, hit):
    assert feed(StopMatcher(stops), pieces) == (want, hit)


def test_stop_matcher_never_emits_a_prefix_it_may_need():
    m = StopMatcher(["STOP"])
    assert m.push("abcST") == ("abc", False)
    assert m.push("O") == ("", False)
    assert m.push("P and more") == ("", True)


@pytest.mark.real
def test_detokenizer_never_emits_broken_utf8(smollm2):
    tok = smollm2.tokenizer
    text = "Emoji 🦙🚀 and 中文字符 and é"
    ids = tok.encode(text)
    # byte-level BPE splits these characters across tokens: check that some token is a partial character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = Detokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_matcher_equals_cutting_the_whole_text():
    """Random pieces and stops over a 3-letter alphabet (many partial matches): the streamed result equals
    cutting the text seen so far at the first piece that completes a stop (held-back text is never lost)."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choices("abc", k=rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        text = "".join(rng.choices("abc", k=rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        want, seen = (text, False), ""
        for piece in pieces:
            seen += piece
            found = [i for i in (seen.find(s) for s in stops) if i >= 0]
            if found:
                want = (seen[: min(found)], True)
                break
        assert feed(StopMatcher(stops), pieces) == want, (stops, pieces)


class Bytes:
    """A tokenizer over raw bytes: a multi-byte character spans tokens, as in a real BPE vocabulary."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def released(out: TextOutput, key: int, ids: list[int], last: str | None = None) -> tuple[str, str | None]:
    """Feed ids as the engine would (the engine's own finish reason on the last one); text and the end."""
    text, reason = "", None
    for i, t in enumerate(ids):
        piece, reason = out.token(key, t, last if i == len(ids) - 1 else None)
        text += piece
        if reason:
            break
    return text, reason


def test_text_output_ends_a_sample_at_a_stop_string_and_withholds_it():
    out = TextOutput(Bytes())
    out.start(1, SamplingParams(stop=["é!"]))
    assert released(out, 1, list("café! more".encode())) == ("caf", "stop")


def test_text_output_flushes_held_text_when_the_engine_ends_the_sample():
    out = TextOutput(Bytes())
    out.start(1, SamplingParams(stop=["STOP"]))
    assert released(out, 1, list(b"abcST"), last="length") == ("abcST", "length")  # max_tokens: the tail is text
    out.start(2, SamplingParams(stop=["STOP"]))
    held, _ = released(out, 2, list(b"xyST"))
    assert (held, out.token(2, 0, "stop")) == ("xy", ("ST", "stop"))  # a stop token adds no text of its own


def test_text_output_keeps_samples_apart_and_forgets_ended_ones():
    out = TextOutput(Bytes())
    out.start(1, SamplingParams())
    out.start(2, SamplingParams())
    a = "é".encode()
    assert out.token(1, a[0], None) == ("", None)  # half a character is held back
    assert out.token(2, ord("z"), None) == ("z", None)
    assert out.token(1, a[1], None) == ("é", None)
    out.end(1)
    assert list(out.samples) == [2]
