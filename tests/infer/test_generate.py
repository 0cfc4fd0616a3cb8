"""The simple generation loop: stops, UTF-8 safe streaming, and agreement with a cache-free loop."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer.generate import Detokenizer, StopMatcher, generate_stream
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model


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


@pytest.fixture
def tiny(tmp_path):
    make_hf_model("llama", vocab_size=256).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    return model


class ByteTokenizer:
    """Stand-in tokenizer over raw bytes so the tiny random model can stream text."""

    stop_token_ids = {2}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_cached_greedy_loop_equals_recomputing_everything(tiny):
    prompt = [5, 17, 99, 3, 42, 8, 250, 61]
    events = list(
        generate_stream(tiny, ByteTokenizer(), prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    )
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert [e.token_id for e in events] == ids[len(prompt) :]
    assert [e.finish_reason for e in events] == [None] * 19 + ["length"]


def test_max_tokens_is_clipped_to_the_context(tiny):
    prompt = list(range(10, 10 + 120))  # context is 128
    events = list(
        generate_stream(tiny, ByteTokenizer(), prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    )
    assert len(events) == 8 and events[-1].finish_reason == "length"
    with pytest.raises(TrainferError, match="context is 128"):
        list(generate_stream(tiny, ByteTokenizer(), list(range(128)), SamplingParams()))
    with pytest.raises(TrainferError, match="empty"):
        list(generate_stream(tiny, ByteTokenizer(), [], SamplingParams()))


def test_stop_token_ends_generation(tiny):
    greedy = [
        e.token_id
        for e in generate_stream(
            tiny, ByteTokenizer(), [7, 7, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        )
    ]
    stop_at = greedy[3]
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    events = list(generate_stream(tiny, ByteTokenizer(), [7, 7, 7], params))
    assert events[-1].finish_reason == "stop"
    assert [e.token_id for e in events] == greedy[: greedy.index(stop_at) + 1]
