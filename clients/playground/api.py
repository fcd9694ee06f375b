"""Everything the playground needs from the stack, without Streamlit: settings from the
environment, sampling options from the form's values, stream timings, similarity matrices, the
status history and the predictions calls. The app only lays these out, so this module is
unit-tested on its own."""

from __future__ import annotations

import builtins
import datetime
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference_client import (
    ChatOptions,
    ComponentStats,
    FinishReason,
    InferenceClient,
    InferenceError,
    Prediction,
    PredictionPage,
    PredictionsClient,
    StreamSummary,
    StreamToken,
)

DEFAULT_GATEWAY_ADDRESS = "localhost:50051"
DEFAULT_PREDICTIONS_ADDRESS = "localhost:50054"
DEFAULT_REFRESH_SECONDS = 2.0
HISTORY_LENGTH = 300
"""Status samples kept per browser session: ten minutes at the default refresh."""


@dataclass(frozen=True)
class Settings:
    """The app's settings, read from PLAYGROUND_* environment variables."""

    gateway_address: str = DEFAULT_GATEWAY_ADDRESS
    api_key: str = ""
    predictions_address: str = DEFAULT_PREDICTIONS_ADDRESS
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings from `environ`; a refresh that is not a positive number is an error naming it."""
        refresh_text = environ.get("PLAYGROUND_REFRESH_SECONDS", "").strip()
        refresh = DEFAULT_REFRESH_SECONDS
        if refresh_text:
            try:
                refresh = float(refresh_text)
            except ValueError:
                refresh = math.nan
            if not math.isfinite(refresh) or refresh <= 0:
                raise ValueError(
                    f"PLAYGROUND_REFRESH_SECONDS must be a positive number of seconds, got {refresh_text!r}"
                )
        return cls(
            gateway_address=environ.get("PLAYGROUND_GATEWAY_ADDRESS", "").strip() or DEFAULT_GATEWAY_ADDRESS,
            api_key=environ.get("PLAYGROUND_API_KEY", "").strip(),
            predictions_address=environ.get("PLAYGROUND_PREDICTIONS_ADDRESS", "").strip()
            or DEFAULT_PREDICTIONS_ADDRESS,
            refresh_seconds=refresh,
        )


class FormError(ValueError):
    """A form value the app cannot send; the message names the control."""


def sampling_options(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    seed: str = "",
    stop: str = "",
) -> ChatOptions:
    """The request's sampling knobs from the form's values, passed on as they are so that the
    API judges their range; top_k 0, an empty seed and empty stop are left out (server default)."""
    options: ChatOptions = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_tokens}
    if top_k:
        options["top_k"] = top_k
    if seed.strip():
        try:
            options["seed"] = int(seed.strip())
        except ValueError:
            raise FormError(f"Seed must be a whole number, got {seed.strip()!r}") from None
    stops = [item.strip() for item in stop.split(",") if item.strip()]
    if stops:
        options["stop"] = stops
    return options


def error_text(error: InferenceError) -> str:
    """The API's own words: the status code and its message (which names the field and limit)."""
    return f"{error.code.name}: {error.message}"


def conversation(system_prompt: str, turns: Iterable[Turn]) -> list[tuple[str, str]]:
    """The messages to send: the system prompt (when given) and then the turns that have text."""
    messages = [("system", system_prompt.strip())] if system_prompt.strip() else []
    messages.extend((turn.role, turn.content) for turn in turns if turn.content)
    return messages


@dataclass
class Timing:
    """Client-side timings of one streamed reply: time to first token, rate and count."""

    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0

    def token(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first_token is None:
            self.first_token = now
        self.tokens += 1

    def end(self, now: float | None = None) -> None:
        self.ended = time.monotonic() if now is None else now

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tokens_per_second(self) -> float:
        """Tokens after the first over the time they took (the decode rate the user saw), up to
        now while the reply is still running."""
        if self.first_token is None or self.tokens < 2:
            return 0.0
        elapsed = (time.monotonic() if self.ended is None else self.ended) - self.first_token
        return (self.tokens - 1) / elapsed if elapsed > 0 else 0.0


FINISH_WORDS = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop sequence",
    FinishReason.LENGTH: "length",
    FinishReason.CONSTRAINT_COMPLETE: "constraint",
    FinishReason.UNSPECIFIED: "unspecified",
}
STOPPED = "stopped"
"""The finish shown for a reply the user interrupted."""


def finish_word(reason: FinishReason | None) -> str:
    return STOPPED if reason is None else FINISH_WORDS[reason]


def caption(timing: Timing, finish: str, summary: StreamSummary | None = None) -> str:
    """e.g. "TTFT 0.12 s · 23.4 tokens/s · 40 tokens · finish: stop"; the server's token count
    and rate when its final message arrived, the client's otherwise."""
    ttft = "TTFT –" if timing.ttft is None else f"TTFT {timing.ttft:.2f} s"
    tokens = summary.tokens_generated if summary else timing.tokens
    rate = summary.tokens_per_second if summary and summary.tokens_per_second else timing.tokens_per_second
    return f"{ttft} · {rate:.1f} tokens/s · {tokens} tokens · finish: {finish}"


class Streamed(Protocol):
    """What `follow` needs of a stream: the client's TokenStream."""

    def __iter__(self) -> Iterator[StreamToken]: ...

    def cancel(self) -> None: ...

    @property
    def summaries(self) -> dict[int, StreamSummary]: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass
class Reply:
    """A streamed reply as far as it got: its text, timings, and (when it ended normally) the
    server's summary with the finish reason, answer or code."""

    text: str = ""
    timing: Timing = field(default_factory=Timing)
    summary: StreamSummary | None = None
    stopped: bool = False
    stream: Cancellable | None = None

    def cancel(self) -> None:
        """Cancels the call if it is still running (harmless once it ended)."""
        if self.stream is not None:
            self.stream.cancel()

    @property
    def caption(self) -> str:
        finish = STOPPED if self.stopped or self.summary is None else finish_word(self.summary.finish_reason)
        return caption(self.timing, finish, self.summary)


def follow(stream: Streamed, reply: Reply, show: Callable[[str], object]) -> None:
    """Fills `reply` from the stream, calling `show` with the text so far after each token. The
    stream is cancelled however this ends (an exception from `show`, such as Streamlit's stop of
    an interrupted script run, included), which frees the server's slot; `reply.stopped` stays
    True unless the server ended the stream."""
    reply.stopped = True
    reply.stream = stream
    try:
        for token in stream:
            reply.timing.token()
            if token.text:
                reply.text += token.text
                show(reply.text)
        reply.summary = stream.summaries.get(0)
        reply.stopped = False
    finally:
        stream.cancel()
        reply.timing.end()


@dataclass
class Turn:
    """One message of the conversation: the user's text, or the assistant's reply (which may
    still be streaming, or stopped)."""

    role: str
    text: str = ""
    reply: Reply | None = None

    @property
    def content(self) -> str:
        return self.reply.text if self.reply is not None else self.text


def cosine_matrix(vectors: Sequence[Sequence[float]]) -> list[list[float]]:
    """Cosine similarity of every pair of vectors (zero for a zero vector)."""
    norms = [math.sqrt(sum(x * x for x in vector)) for vector in vectors]
    return [
        [
            sum(x * y for x, y in zip(a, b, strict=True)) / (norm_a * norm_b) if norm_a and norm_b else 0.0
            for b, norm_b in zip(vectors, norms, strict=True)
        ]
        for a, norm_a in zip(vectors, norms, strict=True)
    ]


@dataclass(frozen=True)
class Neighbour:
    sentence: str
    nearest: str
    similarity: float


def nearest_neighbours(sentences: Sequence[str], matrix: Sequence[Sequence[float]]) -> list[Neighbour]:
    """Each sentence's most similar other sentence (none for a single sentence)."""
    result = []
    for i, row in enumerate(matrix):
        others = [(value, j) for j, value in enumerate(row) if j != i]
        if others:
            value, j = max(others)
            result.append(Neighbour(sentences[i], sentences[j], value))
    return result


def sentences_of(text: str) -> list[str]:
    """The non-empty lines of the text area."""
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Sample:
    """One poll of the generators' figures (summed over replicas), for the status charts."""

    at: float
    """Unix time in seconds."""
    generated_tokens: int
    """The generators' running total."""
    tokens_per_second: float
    """Tokens generated since the previous poll over the time between them: the throughput now,
    where the servers' own figure is a mean since they started."""
    time_to_first_token: float
    running: int
    waiting: int


class History:
    """The last `limit` samples, oldest first."""

    def __init__(self, limit: int = HISTORY_LENGTH) -> None:
        self.samples: deque[Sample] = deque(maxlen=limit)

    def add(self, stats: Sequence[ComponentStats], at: float | None = None) -> Sample | None:
        """Adds a sample from the generators' stats; None when no generator reported."""
        generators = [item for item in stats if item.component == "generator"]
        if not generators:
            return None
        now = time.time() if at is None else at
        generated = sum(item.generated_tokens_total for item in generators)
        rate = 0.0
        if self.samples:
            last = self.samples[-1]
            # A restarted generator starts its total again: no rate across that.
            if now > last.at and generated >= last.generated_tokens:
                rate = (generated - last.generated_tokens) / (now - last.at)
        sample = Sample(
            at=now,
            generated_tokens=generated,
            tokens_per_second=rate,
            time_to_first_token=max(item.mean_time_to_first_token_seconds for item in generators),
            running=sum(item.requests_running for item in generators),
            waiting=sum(item.requests_waiting for item in generators),
        )
        self.samples.append(sample)
        return sample

    def columns(self) -> dict[str, list[float]]:
        """Column name to values, for a chart indexed by time."""
        return {
            "time": [sample.at for sample in self.samples],
            "tokens/s": [sample.tokens_per_second for sample in self.samples],
            "TTFT (s)": [sample.time_to_first_token for sample in self.samples],
            "running": [float(sample.running) for sample in self.samples],
            "waiting": [float(sample.waiting) for sample in self.samples],
        }


def tls_credentials(environ: Mapping[str, str] = os.environ) -> grpc.ChannelCredentials | None:
    """TLS to the gateway and the predictions service when PLAYGROUND_TLS_CA is set (the servers
    are verified against it), presenting PLAYGROUND_TLS_CERT and _KEY for mutual TLS; else None."""
    ca = environ.get("PLAYGROUND_TLS_CA", "")
    if not ca:
        return None
    cert, key = environ.get("PLAYGROUND_TLS_CERT", ""), environ.get("PLAYGROUND_TLS_KEY", "")

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def connect(address: str, api_key: str) -> InferenceClient:
    return InferenceClient(address, api_key=api_key or None, credentials=tls_credentials())


def answers_health(address: str, timeout: float = 0.5) -> bool:
    """True when a gRPC server at `address` reports SERVING on the standard health service."""
    try:
        credentials = tls_credentials()
        opened = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        with opened as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


EXAMPLE_MATH = {
    "Apples": "Tom has 3 apples and buys 5 more. He gives 2 to a friend. How many apples does he have?",
    "Train speed": "A train travels 120 km in 2 hours. What is its average speed in km/h?",
    "Equation": "Solve for x: 2x + 6 = 14.",
    "Percent": "What is 15% of 80?",
}

EXAMPLE_CODING = {
    "Reverse a string": "Write a Python function that returns a string reversed.",
    "FizzBuzz": "Write a Python function fizzbuzz(n) that returns the FizzBuzz list from 1 to n.",
    "Is prime": "Write a Python function is_prime(n) that tells whether n is a prime number.",
    "Word count": "Write a Python function that counts how often each word appears in a text.",
}

EXAMPLE_SENTENCES = (
    "The cat sits on the mat.\nA kitten is resting on the rug.\nThe stock market fell sharply today."
)


# ---------------------------------------------------------------- predictions

PREDICTION_STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
ALL_STATUSES = "all"
PROMPT = "Prompt"
JSON_INPUT = "JSON"
INPUT_KINDS = (PROMPT, JSON_INPUT)
RECENT_PREDICTIONS = 20
"""Rows in the Predictions tab's table: one page, newest first."""

EXAMPLE_INPUTS = {
    "generation": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "parameters": {"max_new_tokens": 32},
    },
    "embedding": {"input": ["A cat sits on the mat.", "A kitten rests on a rug."]},
}


class Predictions(Protocol):
    """What the Predictions tab calls: the typed client's PredictionsClient."""

    def create(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        webhook: str | None = None,
        timeout: float | None = None,
    ) -> Prediction: ...

    def get(self, prediction_id: str, *, timeout: float | None = None) -> Prediction: ...

    def list(
        self,
        *,
        status: str | None = None,
        cursor: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> PredictionPage: ...

    def cancel(self, prediction_id: str, *, timeout: float | None = None) -> Prediction: ...


class Watched(Protocol):
    """What `watch` needs of a prediction's stream: the client's PredictionStream."""

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...

    @property
    def summaries(self) -> dict[int, StreamSummary]: ...


def connect_predictions(address: str, api_key: str) -> PredictionsClient:
    return PredictionsClient(address, api_key=api_key or None, credentials=tls_credentials())


def example_input(model_task: str) -> str:
    """The JSON area's starting text for a model of this task ("generation" or "embedding")."""
    return json.dumps(EXAMPLE_INPUTS.get(model_task, EXAMPLE_INPUTS["generation"]), indent=2)


def is_example_input(text: str) -> bool:
    """True when the JSON area still holds one of the examples (so a model change may replace it)."""
    return not text.strip() or any(text == example_input(task) for task in EXAMPLE_INPUTS)


def prediction_input(
    kind: str, model_task: str, prompt: str, json_text: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """A prediction's `input` from the form: the prompt with the sidebar's sampling `options` as
    `parameters` (an embedding model embeds the prompt instead), or the JSON area's object as it
    is written. Raises FormError naming the control when there is nothing to send."""
    if kind == PROMPT:
        if not prompt.strip():
            raise FormError("Prompt is empty")
        if model_task == "embedding":
            return {"input": [prompt]}
        return {"prompt": prompt, "parameters": dict(options)}
    try:
        value = json.loads(json_text)
    except json.JSONDecodeError as error:
        raise FormError(
            f"Input (JSON) is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(value, dict):
        raise FormError(f"Input (JSON) must be a JSON object, got {type(value).__name__}")
    return value


def create_prediction(
    client: Predictions, model: str, input: Mapping[str, Any], webhook: str = "", timeout: float = 10.0
) -> Prediction:
    """Creates the prediction (with the client's key); an empty webhook sends none. Raises the
    API's InferenceError, which names the field (`input.prompt`, `webhook`, ...)."""
    return client.create(model, input, webhook=webhook.strip() or None, timeout=timeout)


def recent_predictions(
    client: Predictions, status: str = ALL_STATUSES, limit: int = RECENT_PREDICTIONS, timeout: float = 5.0
) -> builtins.list[Prediction]:
    """The key's newest predictions (an admin key's: everyone's), only `status` unless "all"."""
    page = client.list(status=None if status == ALL_STATUSES else status, page_size=limit, timeout=timeout)
    return builtins.list(page.results)


def short_time(moment: datetime.datetime | None) -> str:
    """Local time to the second, "" for none."""
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def prediction_rows(predictions: Iterable[Prediction]) -> builtins.list[dict[str, Any]]:
    """The table's records, in the order given."""
    return [
        {
            "ID": item.id,
            "Status": item.status,
            "Model": item.model,
            "Task": item.task,
            "Created": short_time(item.created_at),
            "Predict time (s)": round(item.metrics.predict_time, 3) if item.metrics.predict_time else None,
        }
        for item in predictions
    ]


def prediction_label(prediction: Prediction) -> str:
    """How the prediction is named in the picker: id, status, model."""
    return f"{prediction.id} · {prediction.status} · {prediction.model}"


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value else ""


def prediction_facts(prediction: Prediction) -> builtins.list[dict[str, str]]:
    """Field and value rows for the details: status, task, times and metrics that are known."""
    metrics = prediction.metrics
    facts = [
        ("Status", prediction.status),
        ("Model", prediction.model + (f" (version {prediction.version})" if prediction.version else "")),
        ("Task", prediction.task),
        ("Created", short_time(prediction.created_at)),
        ("Started", short_time(prediction.started_at)),
        ("Completed", short_time(prediction.completed_at)),
        ("Predict time", seconds(metrics.predict_time)),
        ("Total time", seconds(metrics.total_time)),
        (
            "Time to first token",
            f"{metrics.time_to_first_token:.3f} s" if metrics.time_to_first_token else "",
        ),
        ("Input tokens", str(metrics.input_token_count) if metrics.input_token_count else ""),
        ("Output tokens", str(metrics.output_token_count) if metrics.output_token_count else ""),
        ("Webhook", prediction.webhook),
    ]
    return [{"Field": name, "Value": value} for name, value in facts if value]


def output_text(output: Any) -> str:
    """The text in a prediction's output: the partial `text` while it runs, else the task's
    answer (generated text, the chat message, the math or coding solution); "" for none (an
    embedding's output is numbers: shown as JSON)."""
    if not isinstance(output, dict):
        return output if isinstance(output, str) else ""
    for name in ("text", "generated_text", "solution"):
        if isinstance(output.get(name), str):
            return str(output[name])
    message = output.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    return ""


def watch(stream: Watched, reply: Reply, show: Callable[[str], object]) -> None:
    """Fills `reply` with a prediction's text as it is produced, calling `show` with the text so
    far; like `follow`, the stream is cancelled however this ends (which stops only the
    watching: the prediction goes on) and `reply.stopped` stays True unless the server ended it."""
    reply.stopped = True
    reply.stream = stream
    try:
        for text in stream:
            reply.timing.token()
            if text:
                reply.text += text
                show(reply.text)
        reply.summary = stream.summaries.get(0)
        reply.stopped = False
    finally:
        stream.cancel()
        reply.timing.end()
