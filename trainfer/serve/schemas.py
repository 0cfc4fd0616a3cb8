"""OpenAI-compatible request bodies, validated with pydantic; the responses are in responses.py.

Unknown fields are refused with a 400 that names them (`logit_bias`, `tools`, `response_format`, ...):
a client that relies on a feature trainfer lacks should hear so rather than get an answer that ignores it.
Every bound comes from infer/sampling.py, so the HTTP schema and the engine agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfer.infer.sampling import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_CHARS,
    MAX_STOPS,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
)

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (score the prompt, generate nothing)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    min_p: float = Field(0.0, ge=0, le=1)  # extension
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False  # extension (as in vLLM and llama.cpp): fixed output lengths for benchmarks
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused (OpenAI's end-user id)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
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
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            ignore_eos=self.ignore_eos,
            prompt_logprobs=prompt_logprobs,
        )

    @property
    def deterministic(self) -> bool:
        """Only these may be answered from the response cache: greedy, or sampled with a fixed seed."""
        return self.temperature == 0 or self.seed is not None

    def cache_fields(self) -> dict[str, Any]:
        """The normalized request: every field that changes the output, none that only changes transport."""
        return self.model_dump(exclude={"stream", "stream_options", "user", "model"})


class CompletionRequest(SamplingRequest):
    # One prompt (text or token ids) or a batch of them; choice i answers prompt i // n.
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # answer with the prompt in front (with logprobs: the prompt tokens' logprobs too)

    def prompt_list(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else p  # type: ignore[return-value]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TestTime(Strict):
    """Extension: answer with test-time compute (trainfer/reason). The response is a normal chat completion
    (the chosen sample as the message) plus a `test_time` object; `usage` counts every token spent."""

    strategy: Literal["cot", "self_consistency", "adaptive", "best_of_n", "self_correction"] = "self_consistency"
    n: int = Field(8, ge=1, le=MAX_N)
    kind: Literal["number", "option", "line"] = "number"
    wave: int = Field(2, ge=1, le=MAX_N)
    threshold: float = Field(0.6, gt=0, le=1)
    rounds: int = Field(2, ge=0, le=4)
    scorer: Literal["logprob", "judge"] = "logprob"  # best_of_n: mean token logprob, or the model as judge


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    test_time: TestTime | None = None  # extension, see TestTime
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them (OpenAI's `developer` role is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(Strict):
    """vLLM's /tokenize (lm-evaluation-harness probes it to tokenize on the server)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class FeedbackRequest(Strict):
    """Extension: a client's rating of an answer it got, by the answer's `id`, for the request log
    (`serve --log-requests`). A separate call rather than a request field, because a user rates an answer
    after reading it; `dataset from-logs` joins the two by id (the last rating wins)."""

    id: str = Field(..., pattern=r"^(chatcmpl|cmpl)-[0-9a-f]{32}$")
    rating: Literal["up", "down"]
    index: int | None = Field(None, ge=0)  # one choice of an n > 1 answer; None rates them all
    comment: str | None = Field(None, max_length=4096)
