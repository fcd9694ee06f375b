"""The plain values the client returns: frozen dataclasses, so that callers never handle protobuf
messages and mypy checks every field they read."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

EncodingFormat = Literal["float", "base64"]
"""How the server sends vectors: a float list, or little-endian float32 bytes (smaller on the
wire). The client returns floats either way."""

EmbeddingInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
"""A string, strings, token ids, or lists of token ids."""


class FinishReason(enum.Enum):
    """Why a sequence stopped."""

    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    """max_new_tokens was reached."""
    EOS_TOKEN = "eos_token"
    """The model produced its end-of-sequence token."""
    STOP_SEQUENCE = "stop_sequence"
    """One of the request's stop sequences was produced (it is not part of the text)."""
    CONSTRAINT_COMPLETE = "constraint_complete"
    """The output constraint (json_schema, regex, choice...) was satisfied and allows no more."""


class ServingStatus(enum.Enum):
    UNSPECIFIED = "unspecified"
    SERVING = "serving"
    NOT_SERVING = "not_serving"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    id: int
    text: str
    """The tokenizer's decoding of this token alone."""
    logprob: float
    bytes: bytes
    """Its UTF-8 bytes (part of a character stays partial)."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its logprob (asked for with logprobs, top_logprobs or prompt_logprobs)."""

    id: int
    text: str
    """The tokenizer's decoding of this token alone."""
    logprob: float | None
    """Natural-log probability; None for the first prompt token, which has no context."""
    bytes: bytes
    special: bool = False
    top_logprobs: tuple[TopLogprob, ...] = ()
    """The most likely tokens at this position, most likely first."""


@dataclass(frozen=True)
class GeneratedSequence:
    """One of the num_return_sequences results of a request."""

    index: int
    text: str
    tokens_generated: int
    finish_reason: FinishReason
    tokens: tuple[TokenLogprob, ...] = ()
    """Every token with its logprob, when the request asked for logprobs."""
    parsed: Any = None
    """With json_schema or json_object: the text parsed (see Generation.parsed)."""


@dataclass(frozen=True)
class Generation:
    """The whole answer of a unary generate call."""

    request_id: str
    text: str
    """The text of the first sequence (all of them are in `sequences`)."""
    tokens_generated: int
    generation_time: float
    """Seconds from admission to the last token."""
    tokens_per_second: float
    finish_reason: FinishReason
    usage: Usage
    model: str
    sequences: tuple[GeneratedSequence, ...] = ()
    tokens: tuple[TokenLogprob, ...] = ()
    """The first sequence's tokens with their logprobs, when the request asked for logprobs."""
    prompt_tokens: tuple[TokenLogprob, ...] = ()
    """The prompt's tokens with their logprobs, when the request asked for prompt_logprobs."""
    parsed: Any = None
    """With json_schema or json_object: the text parsed as JSON, or an instance of the model
    class given as json_schema; None without those, or when the text is not complete (cut by
    max_new_tokens: see finish_reason)."""


@dataclass(frozen=True)
class StreamToken:
    """One generated token as it arrives."""

    text: str
    """The text this token adds; empty while it completes only part of a UTF-8 character or may
    still turn out to be part of a stop sequence (that text arrives with a later token)."""
    id: int
    logprob: float
    special: bool
    index: int = 0
    """Which of the num_return_sequences sequences it belongs to."""
    top_logprobs: tuple[TopLogprob, ...] = ()
    """The most likely tokens at this position, when the request asked for top_logprobs."""


@dataclass(frozen=True)
class StreamSummary:
    """What the last message of a sequence carries."""

    index: int
    text: str
    tokens_generated: int
    generation_time: float
    tokens_per_second: float
    finish_reason: FinishReason
    answer: str | None = None
    """solve_math_stream only: the answer extracted from the text."""
    code: str | None = None
    """solve_coding_stream only: the code block extracted from the text."""
    language: str | None = None
    """solve_coding_stream only: the language of `code`."""


@dataclass(frozen=True)
class ChatReply:
    request_id: str
    message: ChatMessage
    tokens_generated: int
    generation_time: float
    tokens_per_second: float
    finish_reason: FinishReason
    usage: Usage
    model: str
    tokens: tuple[TokenLogprob, ...] = ()
    """The reply's tokens with their logprobs, when the request asked for logprobs."""
    parsed: Any = None
    """With json_schema or json_object: the reply parsed (see Generation.parsed)."""

    @property
    def text(self) -> str:
        return self.message.content


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    """One vector per input, in input order."""
    model: str
    dimensions: int
    prompt_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class DeviceInfo:
    type: str
    name: str
    count: int


@dataclass(frozen=True)
class MemoryInfo:
    process_rss_mib: float
    system_total_mib: float
    system_available_mib: float
    gpu_allocated_mib: float
    gpu_total_mib: float


@dataclass(frozen=True)
class ComponentHealth:
    component: str
    address: str
    status: ServingStatus
    device: DeviceInfo
    memory: MemoryInfo
    models: tuple[str, ...]
    uptime_seconds: float
    message: str


@dataclass(frozen=True)
class Health:
    status: ServingStatus
    components: tuple[ComponentHealth, ...] = field(default_factory=tuple)

    @property
    def serving(self) -> bool:
        return self.status is ServingStatus.SERVING


@dataclass(frozen=True)
class Model:
    id: str
    task: str
    """"generation" or "embedding"."""
    source: str
    dtype: str
    device: str
    max_sequence_length: int
    dimensions: int
    loaded: bool


@dataclass(frozen=True)
class ComponentStats:
    """A tier's counters since it started (GetStats, REST `/stats`)."""

    component: str
    address: str
    uptime_seconds: float
    requests_total: int
    requests_failed: int
    requests_running: int
    requests_waiting: int
    prompt_tokens_total: int
    generated_tokens_total: int
    embedded_inputs_total: int
    mean_time_to_first_token_seconds: float
    mean_tokens_per_second: float
    mean_batch_size: float
    cache_hits: int


@dataclass(frozen=True)
class CachedModel:
    """An embedding model the embedder holds in memory."""

    name: str
    size_mib: float
    """Estimated memory the model holds."""
    device: str
    dimensions: int
    max_seq_length: int
    hits: int
    loaded_at: float
    """Unix time in seconds."""
    last_used_at: float


@dataclass(frozen=True)
class CacheStatus:
    """The embedder's model cache (GetCacheStatus)."""

    strategy: str
    """"fixed_size" (LRU by count) or "memory_aware" (LRU by memory budget)."""
    max_models: int
    memory_budget_mib: float
    memory_used_mib: float
    models: tuple[CachedModel, ...] = ()
    loading: tuple[str, ...] = ()
    """Models being loaded in the background."""
    evictions: int = 0


PredictionStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]
"""Where a prediction is: waiting, running, or ended (the last three)."""

PREDICTION_TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

PredictionTask = Literal["generate", "chat", "math", "coding", "embed"]

WebhookEvent = Literal["start", "output", "logs", "completed"]


@dataclass(frozen=True)
class PredictionMetrics:
    predict_time: float = 0.0
    """Seconds from start to end of the run that succeeded."""
    total_time: float = 0.0
    """Seconds from creation to end."""
    input_token_count: int = 0
    output_token_count: int = 0
    time_to_first_token: float = 0.0


@dataclass(frozen=True)
class PredictionUrls:
    """Where to poll (`get`), cancel (POST `cancel`) and watch (SSE `stream`) it over REST."""

    get: str = ""
    cancel: str = ""
    stream: str = ""


@dataclass(frozen=True)
class Prediction:
    """An asynchronous job, as the predictions service reports it."""

    id: str
    model: str
    """As requested: a deployment's name or a served model id."""
    version: str
    status: PredictionStatus
    input: dict[str, Any]
    output: Any
    """None until there is output; the partial output while processing (e.g. {"text": ...}), then
    the task's whole answer as JSON (what /generate, /chat, /solve/*, /embeddings return)."""
    error: str
    """Why it failed; empty otherwise."""
    logs: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    metrics: PredictionMetrics
    urls: PredictionUrls
    task: str
    """"generate", "chat", "math", "coding" or "embed"."""
    webhook: str = ""
    webhook_events_filter: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        """True once it ended: succeeded, failed or canceled."""
        return self.status in PREDICTION_TERMINAL


@dataclass(frozen=True)
class PredictionPage:
    """One page of predictions, newest first. Pass `next_cursor` to `list` for older ones."""

    results: tuple[Prediction, ...]
    next_cursor: str | None
    """None on the last (oldest) page."""
    previous_cursor: str | None
    """None on the first (newest) page."""
    next: str = ""
    """The REST URL of the next page, as the server wrote it."""
    previous: str = ""


@dataclass(frozen=True)
class Deployment:
    """A named entry pointing at a served model, with default input, a version and an input schema."""

    name: str
    model: str
    task: str
    version: str
    defaults: dict[str, Any] = field(default_factory=dict)
    """Input fields used where a prediction's input leaves them out (merged one level deep)."""
    input_schema: dict[str, Any] | None = None
    """The JSON Schema a prediction's input must match; None: the task's own."""
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
