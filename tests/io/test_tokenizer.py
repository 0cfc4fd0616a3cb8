"""The tokenizer built from GGUF metadata against transformers' tokenizer of the same file (SmolLM2)."""

from __future__ import annotations

import pytest

from trainfer.errors import TrainferError

pytestmark = pytest.mark.real

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 7 42 1234567890, 3.14159, -2e10, 2026-11-30 and $19.99",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and a lone combining mark é",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "whitespace   runs\t\ttabs\n\n\nnewlines    \n  trailing   ",
    "  leading spaces and CRLF\r\nlines\r\n",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inline<|endoftext|>next doc",
    "contractions: I'm, you're, it's, we'll, they'd, can't, won't, SHOULDN'T",
    "",
]


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_ids_match_transformers_and_decode_round_trips(smollm2, hf_smollm2, i):
    text = TEXTS[i]
    _, ref = hf_smollm2
    ids = smollm2.tokenizer.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert smollm2.tokenizer.decode(ids) == text


def test_special_ids_and_stops(smollm2):
    tok = smollm2.tokenizer
    assert tok.token(tok.bos_token_id) == "<|im_start|>"
    assert tok.token(tok.eos_token_id) == "<|im_end|>"
    assert tok.stop_token_ids == {tok.backend.token_to_id("<|im_end|>"), tok.backend.token_to_id("<|endoftext|>")}
    assert tok.vocab_size == 49152


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    _, ref = hf_smollm2
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_bad_messages_are_clear_errors(smollm2):
    with pytest.raises(TrainferError, match="message 0 must be a dict"):
        smollm2.tokenizer.apply_chat_template([{"content": "no role"}])


def test_saved_tokenizer_json_reloads_identically(smollm2, tmp_path):
    from trainfer.io.tokenizer import Tokenizer

    smollm2.tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == smollm2.tokenizer.encode(text)
    assert again.chat_template == smollm2.tokenizer.chat_template
    assert (again.bos_token_id, again.eos_token_id) == (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id)
