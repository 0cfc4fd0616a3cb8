"""The Python API: `LLM.load(name_or_path)`, then `generate` for raw text or `chat` with the chat template.

from trainfer import LLM
llm = LLM.load("smollm2-135m-instruct")
print(llm.chat([{"role": "user", "content": "Hi!"}], temperature=0).text)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainfer.errors import TrainferError
from trainfer.infer.generate import TokenEvent, generate_stream
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer

Messages = list[dict[str, Any]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    ttft_s: float  # time to first token: tokenize + prefill + first sample
    decode_tokens_per_s: float  # tokens after the first, over the time after the first

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], dtype: str = "float32", device: str = "cpu") -> LLM:
        """An alias (see `trainfer models`), a .gguf file, or a Hugging Face directory with tokenizer.json."""
        model, tokenizer = load_model(name_or_path, dtype, device)
        if tokenizer is None:
            raise TrainferError(f"{name_or_path} has no tokenizer.json; trainfer needs one to generate text")
        return cls(model, tokenizer, str(name_or_path))

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[TokenEvent]:
        """Token events for a raw-text prompt (or token ids); keywords as in `SamplingParams`."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return generate_stream(self.model, self.tokenizer, ids, SamplingParams(**sampling))

    def chat_stream(self, messages: Messages, **sampling: Any) -> Iterator[TokenEvent]:
        return self.stream(self.chat_prompt(messages), **sampling)

    def chat_prompt(self, messages: Messages) -> list[int]:
        # The template writes BOS itself when the model wants one, so do not add another.
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def generate(
        self,
        prompt: str | list[str],
        *,
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion | list[Completion]:
        """Complete raw text; a list of prompts gives a list of completions. temperature=0 is greedy."""
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop or []
        )
        if isinstance(prompt, list):
            return [self._collect(self.tokenizer.encode(p), params) for p in prompt]
        return self._collect(self.tokenizer.encode(prompt), params)

    def chat(
        self,
        messages: Messages,
        *,
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        """One assistant turn for `messages` ([{"role": ..., "content": ...}]) with the model's template."""
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop or []
        )
        return self._collect(self.chat_prompt(messages), params)

    def _collect(self, ids: list[int], params: SamplingParams) -> Completion:
        start = time.perf_counter()
        texts, tokens, first, finish = [], [], 0.0, "length"
        for event in generate_stream(self.model, self.tokenizer, ids, params):
            if not tokens:
                first = time.perf_counter()
            texts.append(event.text)
            tokens.append(event.token_id)
            finish = event.finish_reason or finish
        end = time.perf_counter()
        stop_ids = set(params.stop_token_ids) | self.tokenizer.stop_token_ids
        if finish == "stop" and tokens and tokens[-1] in stop_ids:
            tokens.pop()  # a stop token ends the text; it is not part of it
        rate = (len(texts) - 1) / (end - first) if len(texts) > 1 and end > first else 0.0
        return Completion("".join(texts), tokens, len(ids), finish, first - start, rate)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
