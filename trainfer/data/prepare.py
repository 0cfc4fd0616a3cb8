"""`trainfer prepare`: train (or reuse) a tokenizer and pack documents into token shards on disk.

Output directory: tokenizer.json (+ tokenizer_config.json), train.bin and val.bin (np.memmap of uint16
when the vocabulary fits, else uint32; documents separated by the end-of-text token), meta.json (dtype,
counts, the document split). The split is by document, deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from trainfer.data.sources import Document, load_corpus
from trainfer.errors import TrainferError, new_directory
from trainfer.io.loader import load_checkpoint
from trainfer.io.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def train_bpe(docs: list[Document], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on the documents; deterministic for the same input."""
    if vocab_size < 257:
        raise TrainferError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    got = backend.get_vocab_size()
    if got < vocab_size:
        raise TrainferError(
            f"vocab_size {vocab_size} is larger than this data supports ({got} tokens after every possible merge); "
            f"use --vocab-size {got} or less, or more text"
        )
    eot = backend.token_to_id(EOT)
    return Tokenizer(backend, bos_token_id=eot, eos_token_id=eot)


def train_char(docs: list[Document]) -> Tokenizer:
    """One token per character seen in the data (nanoGPT's shakespeare_char setup), plus end-of-text."""
    chars = sorted({c for d in docs for c in d.text})
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([EOT])
    return Tokenizer(backend, bos_token_id=0, eos_token_id=0)


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Whole documents go to validation, so it measures generalization to unseen text."""
    if not 0 <= val_fraction < 1:
        raise TrainferError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(docs) > 1:
        n_val = 1
    if n_val >= len(docs):
        raise TrainferError(f"{len(docs)} document(s) cannot be split into train and validation; add more text")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def split_contiguous(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """nanoGPT's split: the last val_fraction of the concatenated characters, cutting one document in two."""
    if not 0 < val_fraction < 1:
        raise TrainferError(f"val_fraction must be in (0, 1) for a contiguous split, got {val_fraction}")
    cut = int(sum(len(d.text) for d in docs) * (1 - val_fraction))
    train: list[Document] = []
    for i, d in enumerate(docs):
        if cut >= len(d.text):
            train.append(d)
            cut -= len(d.text)
            continue
        head, tail = d.text[:cut], d.text[cut:]
        val = [Document(f"{d.name}[{cut}:]", tail), *docs[i + 1 :]]
        return train + ([Document(f"{d.name}[:{cut}]", head)] if head else []), val
    raise TrainferError("nothing left for validation; lower val_fraction")


def encode_documents(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """All documents' ids, each followed by the end-of-text token."""
    eot = tok.eos_token_id
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    parts = [np.asarray([*tok.encode(d.text, add_bos=False), eot], dtype=dtype) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class PrepareStats:
    documents: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    bytes: int
    vocab_size: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.train_tokens + self.val_tokens)


def prepare(
    sources: list[str],
    out_dir: Path,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    seed: int = 0,
    split: str = "documents",
) -> PrepareStats:
    """Documents -> tokenizer -> train.bin / val.bin in out_dir (written to a temp dir, then renamed).

    split="documents" holds out whole documents (seeded); "contiguous" holds out the end of the text, as
    nanoGPT's shakespeare_char does (used for side-by-side comparisons).
    """
    if split not in ("documents", "contiguous"):
        raise TrainferError(f"split must be documents or contiguous, got {split!r}")
    out_dir = new_directory(out_dir)
    docs = load_corpus(sources)
    if split == "contiguous":
        train_docs, val_docs = split_contiguous(docs, val_fraction)
    else:
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
    tok = _tokenizer_for(tokenizer, docs, train_docs, vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    settings = {"tokenizer": tokenizer, "seed": seed, "val_fraction": val_fraction, "split": split}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".prepare-"))
    try:
        stats = _write_shards(tmp, tok, len(docs), train_docs, val_docs, settings)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _tokenizer_for(tokenizer: str, docs: list[Document], train_docs: list[Document], vocab_size: int) -> Tokenizer:
    """bpe and char train a new one; any other name is a model whose tokenizer is reused, so the shards can
    fine-tune or evaluate that model (it needs an end-of-text token: documents are separated by it)."""
    if tokenizer == "bpe":
        return train_bpe(train_docs, vocab_size)  # learned on training text only
    if tokenizer == "char":
        return train_char(docs)  # every character needs an id, validation's too
    loaded = load_checkpoint(tokenizer)[2]
    if loaded is None or loaded.eos_token_id is None:
        raise TrainferError(f"{tokenizer} has no tokenizer with an end-of-text token to reuse")
    return loaded


def _write_shards(
    tmp: Path,
    tok: Tokenizer,
    n_docs: int,
    train_docs: list[Document],
    val_docs: list[Document],
    settings: dict[str, object],
) -> PrepareStats:
    """train.bin, val.bin, the tokenizer and meta.json into tmp; meta.json records the settings and the
    validation documents' names, so a later run can tell what the shards hold without re-reading the text."""
    train_ids, val_ids = encode_documents(train_docs, tok), encode_documents(val_docs, tok)
    train_ids.tofile(tmp / "train.bin")
    val_ids.tofile(tmp / "val.bin")
    tok.save(tmp)
    train_bytes = sum(len(d.text.encode()) for d in train_docs)
    val_bytes = sum(len(d.text.encode()) for d in val_docs)  # the split cuts at characters: sums add up
    stats = PrepareStats(
        n_docs,
        len(train_docs),
        len(val_docs),
        int(train_ids.size),
        int(val_ids.size),
        train_bytes + val_bytes,
        tok.vocab_size,
    )
    meta = {
        **stats.__dict__,
        "dtype": str(train_ids.dtype),
        **settings,
        "val_names": [d.name for d in val_docs],
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return stats


def read_shard(data_dir: Path, split: str) -> np.ndarray:
    """A split's tokens, memory-mapped (an empty split is an empty array: mmap refuses empty files)."""
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
        path = Path(data_dir) / f"{split}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r")
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TrainferError(f"cannot read the {split} split of {data_dir} (run trainfer prepare again?): {e}") from None
