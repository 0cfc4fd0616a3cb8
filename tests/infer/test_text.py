"""Stop strings that span tokens and UTF-8 characters split across tokens."""

from __future__ import annotations

import pytest

from trainfer.infer.text import Detokenizer, StopMatcher


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
