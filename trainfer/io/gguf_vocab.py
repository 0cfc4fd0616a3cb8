"""A byte-level BPE tokenizer as llama.cpp's GGUF metadata: tokens, token types, merges, pre-tokenizer name.

The inverse of Tokenizer.from_gguf_metadata, and checked against it: the metadata is read back and must
encode a probe text to the same ids, so llama.cpp and trainfer split text the same way or the export stops.
"""

from __future__ import annotations

import json
from typing import Any

from trainfer.errors import TrainferError
from trainfer.io.tokenizer import PRE_TOKENIZERS, Tokenizer

# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Names to try, in order: the first whose splits (and ignore_merges) match is written, spelled as llama.cpp's
# llama-vocab.cpp knows them ("gpt-2": it rejects "gpt2"; its "default" is not GPT-2's split).
_PRE_ORDER = ("gpt-2", "smollm", "llama-bpe", "qwen2")
# What Hugging Face tokenizer.json files say for the same splits (ByteLevel with its own GPT-2 regex).
_HF_BYTE_LEVEL = {"ByteLevel": "gpt-2", "Digits+ByteLevel": "smollm"}
PROBE = (
    "Hello world! It's 2024: 12345 apples, naïve café 東京 🙂\n\n  indented\tline\r\n"
    "I'm you'll WE'VE x=3.14; <|im_start|>user\nhi<|im_end|>\n"
)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json's split, or a TrainferError naming what it is."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or spec.get("normalizer"):
        raise TrainferError(
            f"GGUF export needs a byte-level BPE tokenizer without a normalizer; this one is {model.get('type')} "
            f"(normalizer: {(spec.get('normalizer') or {}).get('type')})"
        )
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True):
        key = "+".join(kinds)
        if key in _HF_BYTE_LEVEL and all(s.get("individual_digits", True) for s in steps):
            return _HF_BYTE_LEVEL[key]
    elif kinds and kinds[-1] == "ByteLevel" and all(k == "Split" for k in kinds[:-1]):
        regexes = [s["pattern"].get("Regex") for s in steps[:-1]]
        if all(s.get("behavior") == "Isolated" and not s.get("invert") for s in steps[:-1]):
            ignore = bool(model.get("ignore_merges", False))
            for name in _PRE_ORDER:
                if PRE_TOKENIZERS[name] == (regexes, ignore):
                    return name
    raise TrainferError(
        f"GGUF export: this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) matches none that "
        f"llama.cpp knows ({', '.join(_PRE_ORDER)})"
    )


def _merges(spec: dict[str, Any]) -> list[str]:
    merges = spec["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers >= 0.20 writes pairs


def vocab_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The GGUF tokenizer keys and values for a model of `vocab_size` rows, after the round-trip check."""
    spec = json.loads(tok.backend.to_str())  # the tokenizer.json document: model, merges, pre-tokenizer
    pre = pre_tokenizer_name(spec)
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise TrainferError(f"the tokenizer has ids up to {max(by_id)}, the model's vocabulary only {vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padded embeddings) get llama.cpp's [PADi] names
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(
            UNUSED if i not in by_id else NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED
        )
    unk = spec["model"].get("unk_token")
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": _merges(spec),
        "tokenizer.ggml.add_bos_token": tok.add_bos,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.unknown_token_id": tok.backend.token_to_id(unk) if unk else None,
        "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.chat_template": tok.chat_template,
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    _check_round_trip(tok, meta)
    return meta


def _check_round_trip(tok: Tokenizer, meta: dict[str, Any]) -> None:
    back = Tokenizer.from_gguf_metadata(meta)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    specials = [t for t, k in zip(tokens, types, strict=True) if k == CONTROL]
    text = PROBE + "".join(specials[:8])
    want, got = tok.encode(text, add_bos=False), back.encode(text, add_bos=False)
    if want != got:
        first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        raise TrainferError(
            f"GGUF export: the tokenizer written as pre-tokenizer {meta['tokenizer.ggml.pre']!r} splits text "
            f"differently from the model's own (first difference at token {first}); not writing a GGUF that "
            "llama.cpp would tokenize wrongly"
        )
