"""The Python API: `LLM.load(name_or_path)`, then `generate` for raw text or `chat` with the chat template.

    from trainfer import LLM
    llm = LLM.load("smollm2-135m-instruct")
    print(llm.chat([{"role": "user", "content": "Hi!"}], temperature=0).text)

Every call runs on the continuous-batching engine: a list of prompts is decoded together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from trainfer.errors import TrainferError
from trainfer.infer import native_decode
from trainfer.infer.engine import Engine, TokenEvent
from trainfer.infer.sampling import SamplingParams
from trainfer.infer.speculate import DRAFTS
from trainfer.infer.text import TextOutput
from trainfer.io import peft
from trainfer.io.loader import check_memory, load, resolve
from trainfer.io.tokenizer import Tokenizer
from trainfer.model import lora
from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import weights_kind

Messages = list[dict[str, Any]]
WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4")  # what LLM.load's dtype takes
QUEUED = 64  # sequences `run_queued` queues at once: the engine batches them; progress shows between groups


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    ttft_s: float  # time to first token: from the call to the first sampled token
    decode_tokens_per_s: float  # this sequence's tokens after the first, over the time after the first
    cached_prompt_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def load_draft(path: str | os.PathLike[str], tokenizer: Tokenizer, dtype: str, device: str) -> Transformer:
    """A draft model for speculative decoding: it must tokenize as the target does, or its guesses mean other
    tokens (a clear error, before any request)."""
    check_memory(path, dtype, 0)
    draft, draft_tokenizer = load(path, dtype, device)
    if draft_tokenizer is None or draft_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise TrainferError(f"the draft {path} does not share the model's tokenizer; a draft must use the same one")
    native_decode.prepare(draft)
    return draft


class LLM:
    """Owns a model, its tokenizer and one `Engine` over them: the Python API's calls (generate, chat, stream;
    trainfer.reason drives it too) each queue their prompts on that engine and read their own sequences back.
    Not thread-safe: one caller at a time (the server drives the same engine through `AsyncEngine`)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", **engine_args: Any) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = Engine(
            model, stop_token_ids=tokenizer.stop_token_ids, output=TextOutput(tokenizer), **engine_args
        )

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str],
        dtype: str = "auto",
        device: str = "cpu",
        adapters: dict[str, str | os.PathLike[str]] | None = None,
        kv_dtype: str = "fp16",
        **engine_args: Any,
    ) -> LLM:
        """An alias (see `trainfer models`), a .gguf file, or a Hugging Face directory with tokenizer.json.

        dtype: auto (the file's own format: a Q4_K_M GGUF runs as Q4_K_M, memory-mapped), float32, bfloat16,
        int8 or int4 (weights in llama.cpp-style Q8_0 / Q4_1 blocks, quantized at load; see quant/blocks.py).
        Before loading, the weights and the KV cache are checked against the machine's available memory.
        A directory written by `trainfer quantize` loads as it was saved.
        adapters: {name: LoRA adapter directory or LoRA run}, kept unmerged next to the base so one batch mixes
        them (`complete(..., adapter=name)`, the server's `model` field); the base's own path stays native.
        kv_dtype: the KV cache's type, fp16 here (Engine's own default is the model's exact "auto"): measured
        within 0.11% of fp32's perplexity on 8,000-token plays, faster at depth, twice the tokens per GiB
        (BENCHMARKS.md, Long context); "fp32" for results equal to the model's own forward.
        engine_args go to `Engine`: kv_cache_gb, num_blocks, block_size, max_num_seqs,
        max_num_batched_tokens, max_model_len, num_draft_tokens, and draft for speculative decoding: "ngram"
        (prompt lookup) or a draft model (an alias, .gguf or directory with the same tokenizer, loaded in `dtype`).
        """
        draft = engine_args.get("draft")
        if engine_args.get("num_blocks") is None:
            check_memory(name_or_path, dtype, int(engine_args.get("kv_cache_gb", 1.0) * (1 << 30)))
        model, tokenizer = load(name_or_path, dtype, device)
        if tokenizer is None:
            raise TrainferError(f"{name_or_path} has no tokenizer.json; trainfer needs one to generate text")
        native_decode.prepare(model)  # this model is ours: fused and split once, before its engine and adapters
        if draft is not None and not isinstance(draft, Transformer) and draft not in DRAFTS:
            engine_args["draft"] = load_draft(draft, tokenizer, dtype, device)
        llm = cls(model, tokenizer, str(name_or_path), kv_dtype=kv_dtype, **engine_args)
        if adapters:
            for name, path in adapters.items():
                peft.load_adapter(llm.model, resolve(path), name)  # wraps the prepared modules
            lora.set_adapter(llm.model, None)
        return llm

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[TokenEvent]:
        """Token events for a raw-text prompt (or token ids); keywords as in `SamplingParams`."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine.stream(ids, SamplingParams(**sampling))

    def chat_stream(self, messages: Messages, **sampling: Any) -> Iterator[TokenEvent]:
        return self.stream(self.chat_prompt(messages), **sampling)

    def chat_prompt(self, messages: Messages) -> list[int]:
        # The template writes BOS itself when the model wants one, so do not add another.
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def generate(self, prompt: str | list[str], **sampling: Any) -> Completion | list[Completion]:
        """Complete raw text; a list of prompts is batched and gives a list of completions.

        Keywords as in `SamplingParams`: max_tokens=128, temperature=1.0 (0 = greedy), top_p, top_k, min_p,
        presence/frequency/repetition penalties, seed, stop, logprobs.
        """
        prompts = prompt if isinstance(prompt, list) else [prompt]
        done = self.complete([self.tokenizer.encode(p) for p in prompts], **sampling)
        return done if isinstance(prompt, list) else done[0]

    def chat(self, messages: Messages | list[Messages], **sampling: Any) -> Completion | list[Completion]:
        """One assistant turn per conversation ([{"role": ..., "content": ...}]) with the model's template."""
        batch = messages if messages and isinstance(messages[0], list) else [messages]
        done = self.complete([self.chat_prompt(m) for m in batch], **sampling)
        return done if batch is messages else done[0]

    def complete(
        self, prompts: list[list[int]], adapter: str | list[str | None] | None = None, **sampling: Any
    ) -> list[Completion]:
        """Token-id prompts run together on the engine, one Completion each (n = 1); adapter: one name for all,
        or one per prompt (None: the base)."""
        params = SamplingParams(**sampling)
        if params.n != 1:
            raise TrainferError("LLM.generate/chat return one completion per prompt; use the engine for n > 1")
        start = time.perf_counter()
        per_prompt = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        results = self.engine.run(prompts, params, per_prompt)
        stop_ids = set(params.stop_token_ids) | self.tokenizer.stop_token_ids
        return [self._completion(r[0], len(p), start, stop_ids) for r, p in zip(results, prompts, strict=True)]

    def run_queued(
        self, prompts: list[list[int]], params: list[SamplingParams], what: str
    ) -> list[list[list[TokenEvent]]]:
        """`engine.run` for dataset-sized jobs (`dataset answers`, `dataset prefs`): QUEUED sequences at a time,
        which the engine batches, printing after each group how far it is and the minutes left, so a long run
        says it is alive and when it will end."""
        got, start = [], time.perf_counter()
        per_group = max(1, QUEUED // max(p.n for p in params)) if params else 1
        for first in range(0, len(prompts), per_group):
            got += self.engine.run(prompts[first : first + per_group], params[first : first + per_group])
            done, elapsed = len(got), time.perf_counter() - start
            left = f", ~{elapsed / done * (len(prompts) - done) / 60:.1f} min left" if done < len(prompts) else ""
            print(f"{done}/{len(prompts)} {what}, {elapsed:.0f} s{left}", flush=True)
        return got

    @staticmethod
    def _completion(evs: list[TokenEvent], n_prompt: int, start: float, stop_ids: set[int]) -> Completion:
        times = [e.time for e in evs]
        tokens = [e.token_id for e in evs]
        finish = evs[-1].finish_reason or "length"
        if finish == "stop" and tokens[-1] in stop_ids:
            tokens.pop()  # a stop token ends the text; it is not part of it
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return Completion(
            "".join(e.text for e in evs),
            tokens,
            n_prompt,
            finish,
            times[0] - start,
            rate,
            evs[0].cached_prompt_tokens,
            [e.logprob for e in evs if e.logprob is not None],
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def weights(self) -> str:
        """What the weights are stored as: int8, int4, or the float dtype's name."""
        return weights_kind(self.model) or str(self.dtype).removeprefix("torch.")
