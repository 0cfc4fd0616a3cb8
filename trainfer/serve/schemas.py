"""OpenAI-compatible request bodies, validated with pydantic; responses are plain dicts in OpenAI's shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfer.infer.sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI's own server does for forward compatibility.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    min_p: float = Field(0.0, ge=0, le=1)  # extension
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # extension (as in vLLM and llama.cpp): fixed output lengths for benchmarks
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            n=self.n,
            logprobs=logprobs,
            stop=stops,
            ignore_eos=self.ignore_eos,
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def deterministic(self) -> bool:
        """Only these may be answered from the response cache: greedy, or sampled with a fixed seed."""
        return self.temperature == 0 or self.seed is not None

    def cache_fields(self) -> dict[str, Any]:
        """The normalized request: every field that changes the output, none that only changes transport."""
        return self.model_dump(exclude={"stream", "stream_options", "user", "model"})


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
