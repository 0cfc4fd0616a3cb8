"""Tokenizer: a `tokenizers.Tokenizer` plus what generation needs (BOS/EOS, stop ids, chat template).

Built from a `tokenizer.json` directory (Hugging Face layout) or from GGUF metadata (llama.cpp's keys).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from trainfer.errors import TrainferError

log = logging.getLogger(__name__)

# Tokens that end a turn in the common chat formats; generation stops on any of them that is special.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>", "</s>")

# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name: the regex the merges were learned on.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> list of regexes applied in turn (each split isolates its matches), and whether merges are
# skipped for words already in the vocabulary (llama.cpp's ignore_merges, used by Llama 3).
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "default": ([_GPT2], False),
    "gpt2": ([_GPT2], False),
    "gpt-2": ([_GPT2], False),  # llama.cpp's spelling (it does not know "gpt2")
    "smollm": ([r"\p{N}", _GPT2], False),  # digits one by one, then GPT-2's split
    "llama-bpe": ([_LLAMA3], True),
    "llama3": ([_LLAMA3], True),
    "smaug-bpe": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
    "deepseek-r1-qwen": ([_QWEN2], False),
}

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id  # carried for exports (GGUF, HF); generation never pads
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.stop_token_ids = {specials[t] for t in END_OF_TURN if t in specials}
        if eos_token_id is not None:
            self.stop_token_ids.add(eos_token_id)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own Jinja template, sandboxed as transformers does."""
        if not self.chat_template:
            raise TrainferError("this model has no chat template; use `generate` with a raw prompt instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TrainferError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token(self.bos_token_id) if self.bos_token_id is not None else "",
                eos_token=self.token(self.eos_token_id) if self.eos_token_id is not None else "",
            )
        except TemplateError as e:
            raise TrainferError(f"chat template failed: {e}") from None

    # ---- Hugging Face layout ----
    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.backend.save(str(out_dir / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token(self.bos_token_id) if self.bos_token_id is not None else None,
            "eos_token": self.token(self.eos_token_id) if self.eos_token_id is not None else None,
            "pad_token": self.token(self.pad_token_id) if self.pad_token_id is not None else None,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side reports a bad file as a bare Exception
            raise TrainferError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # the named-templates form: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if tok else None

        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
            pad_token_id=token_id("pad_token"),
        )

    # ---- GGUF metadata ----
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TrainferError(
                f"unsupported GGUF tokenizer {kind!r}: trainfer reads byte-level BPE ('gpt2') vocabularies, "
                "as used by Llama 3, Qwen2 and SmolLM"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            log.warning("unknown pre-tokenizer %r in GGUF; using GPT-2's split as llama.cpp does", pre)
            pre = "default"
        splits, ignore_merges = PRE_TOKENIZERS[pre]
        backend = HFTokenizer(
            models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        # llama.cpp matches control and user-defined tokens whole in the text; do the same.
        backend.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t, k in zip(tokens, types, strict=False)
                if k == TOKEN_TYPE_CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, normalized=False, special=False)
                for t, k in zip(tokens, types, strict=False)
                if k == TOKEN_TYPE_USER_DEFINED
            ]
        )
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
