"""Fine-tuning data: loss masks on assistant tokens only, packing without attention across examples, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainfer.errors import TrainferError
from trainfer.io.loader import load_model
from trainfer.train import chat_data

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Price?"},
    {"role": "assistant", "content": "9 euros."},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(chat_model):
    return load_model(chat_model)


def test_only_assistant_turns_and_their_end_of_turn_carry_loss(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ex = chat_data.render_chat(CONVERSATION, tok)
    # One token per character except the two specials: build the expected mask by walking the text.
    want: list[bool] = []
    for m in CONVERSATION:
        want += [False] * (1 + len(f"{m['role']}\n"))  # <|im_start|> + role line
        trained = m["role"] == "assistant"
        want += [trained] * len(m["content"]) + [trained]  # content + <|im_end|>
        want += [False]  # the newline after <|im_end|> is template, not the answer
    assert ex.loss == want
    assert tok.decode([t for t, keep in zip(ex.tokens, ex.loss, strict=True) if keep]) == (
        "Hello!<|im_end|>9 euros.<|im_end|>"
    )


def test_an_assistant_message_with_weight_0_is_context_only(model_and_tokenizer):
    _, tok = model_and_tokenizer
    msgs = [dict(m) for m in CONVERSATION]
    msgs[2]["weight"] = 0
    ex = chat_data.render_chat(msgs, tok)
    assert tok.decode([t for t, keep in zip(ex.tokens, ex.loss, strict=True) if keep]) == "9 euros.<|im_end|>"


def test_a_prompt_completion_pair_trains_the_completion_and_end_of_text(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ex = chat_data.render({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, tok)
    assert ex.tokens[-1] == tok.eos_token_id
    assert ex.loss == [False] * len("Q: 2+2?\nA:") + [True] * 3


def test_packed_rows_give_each_example_its_own_logits(model_and_tokenizer):
    model, tok = model_and_tokenizer
    short = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "So."}]
    convs = [CONVERSATION, CONVERSATION[:3], short]
    examples = [chat_data.render_chat(c, tok) for c in convs]
    packed = chat_data.pack(examples, seq_len=200, pad_id=0, seed=None)
    assert len(packed) == 1  # all three share one row
    batch = chat_data.batch_tensors(packed, np.arange(1), "cpu")
    with torch.no_grad():
        h = model.hidden_states(batch["inputs"], batch["positions"], chat_data.PackedAttention(batch["docs"]))[0]
        at = 0
        for e in examples:
            x = torch.tensor([e.tokens[:-1]])
            mine = slice(at, at + len(e.tokens) - 1)
            # the final hidden states to 1e-5; the logits (the toy head is sharp, logits ~50) to 1e-4
            torch.testing.assert_close(h[mine], model.hidden_states(x)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.lm_head(h[mine]), model(x)[0], atol=1e-4, rtol=1e-5)
            at += len(e.tokens) - 1
    loss, count = chat_data.masked_loss_sum(model, batch)
    assert count == sum(e.n_targets for e in examples) and torch.isfinite(loss)


def test_overlong_examples_are_truncated_and_counted(model_and_tokenizer):
    _, tok = model_and_tokenizer
    long = [{"role": "user", "content": "x" * 20}, {"role": "assistant", "content": "y" * 100}]
    only_prompt = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]
    packed = chat_data.pack([chat_data.render_chat(c, tok) for c in (long, only_prompt)], 64, 0)
    assert (packed.truncated, packed.dropped, len(packed)) == (2, 1, 1)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}', "weight 2"),
        ('{"prompt": "x"}', "must both be text"),
        ('{"text": "x"}', "expected 'messages' or 'prompt'"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, line, why):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"messages": CONVERSATION})
    f.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(TrainferError, match=rf"d\.jsonl:3: .*{why}"):
        chat_data.read_jsonl(f)


def test_empty_and_missing_files_and_a_model_without_a_template(tmp_path, model_and_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainferError, match="holds no examples"):
        chat_data.read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(TrainferError, match="no such data file"):
        chat_data.read_jsonl(tmp_path / "nope.jsonl")
    _, tok = model_and_tokenizer
    tok.chat_template, template = None, tok.chat_template
    try:
        with pytest.raises(TrainferError, match="no chat template"):
            chat_data.render({"messages": CONVERSATION}, tok, "f:1")
    finally:
        tok.chat_template = template


def test_the_held_out_split_is_seeded_and_disjoint():
    items = [chat_data.Example([i, i], [False, True], str(i)) for i in range(20)]
    a_train, a_val = chat_data.split(items, 0.2, seed=3)
    b_train, b_val = chat_data.split(items, 0.2, seed=3)
    assert [e.source for e in a_val] == [e.source for e in b_val] and len(a_val) == 4
    assert not {e.source for e in a_train} & {e.source for e in a_val}
