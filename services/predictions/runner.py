"""The worker that runs predictions: it claims them from the store under a lease, calls the
gateway with each prediction's own credentials, saves throttled progress, and ends every run in
`finish` (succeeded, failed, canceled) or `release` (tried again later), never in neither."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterable, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from inference.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2, generation_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common import keepalive, tls
from services.common.auth import claims_expired_at
from services.predictions import tasks
from services.predictions.config import PredictionsConfig
from services.predictions.convert import message_dict
from services.predictions.notify import Changes
from services.predictions.records import Event, Prediction, Status, Store

log = logging.getLogger(__name__)

RUNNING = Gauge("predictions_running", "Predictions this worker is running now.")
FINISHED = Counter(
    "predictions_finished_total",
    "Runs that ended, by outcome (succeeded, failed, canceled, or released for a retry).",
    ["status"],
)
RUN_SECONDS = Histogram(
    "predictions_run_seconds",
    "Seconds one run took, from claim to its end.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_WAIT = Histogram(
    "predictions_queue_wait_seconds",
    "Seconds from creation to the first run's start.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# Statuses a gateway answers when it is busy or away (CANCELLED: e.g. it restarted mid-call; a
# cancel of ours never gets here): the prediction is tried again later.
RETRYABLE = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
)

# As the gateway's own backend channels: big embedding answers fit, and idle links are noticed.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    *keepalive.client_options(),
]

StopReason = Literal["cancel", "lease", "shutdown", "too_large"]

T = TypeVar("T")


# The service's own defaults: settings built without a config agree with one built from it.
_DEFAULTS = PredictionsConfig()


@dataclass(frozen=True)
class RunnerSettings:
    """How the runner works; each field is the PredictionsConfig field of its name (the server
    builds it from the config), except the busy-gateway backoff below."""

    concurrency: int = _DEFAULTS.concurrency
    lease_seconds: float = _DEFAULTS.lease_seconds
    poll_seconds: float = _DEFAULTS.poll_seconds
    max_attempts: int = _DEFAULTS.max_attempts
    # At most one progress write (and so one output/logs webhook) per this many seconds.
    progress_seconds: float = _DEFAULTS.progress_seconds
    max_output_bytes: int = _DEFAULTS.max_output_bytes
    retention_seconds: float = _DEFAULTS.retention_seconds
    purge_seconds: float = _DEFAULTS.purge_seconds
    # The gateway call's deadline; a run past it fails (a stuck backend must not hold a slot forever).
    predict_timeout_seconds: float = _DEFAULTS.predict_timeout_seconds
    # The header a JWT caller's saved claims are in (empty: JWTs off); a run whose token expired
    # since is refused rather than run on claims no longer valid.
    jwt_claims_header: str = _DEFAULTS.jwt_claims_header
    # Backoff of a run the gateway refused as busy, when it sends no RetryInfo: base * 2^(attempt-1).
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0


@dataclass
class _Sequence:
    text: str = ""
    final: generation_pb2.GenerateStreamResponse | None = None
    tokens: list[common_pb2.Token] = field(default_factory=list)


@dataclass
class _Run:
    """One claimed prediction while this worker runs it."""

    prediction: Prediction
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    call: asyncio.Task[Any] | None = None
    stop_reason: StopReason | None = None
    logs: list[str] = field(default_factory=list)
    first_output: float | None = None
    # The output's size when it went over the limit.
    oversize: int = 0
    # The last progress write, which goes on to its end when the call is cancelled meanwhile.
    writing: asyncio.Future[Any] | None = None

    def stop(self, reason: StopReason) -> None:
        """Cancels the gateway call (the generator frees the slot); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
        call = self.call
        if call is not None and not call.done() and call is not asyncio.current_task():
            call.cancel()


class _Ended(Exception):
    """A run ended on purpose before its output (canceled, lease lost, shut down, too large)."""


def _retrieved(write: asyncio.Future[Any]) -> None:
    # Whoever awaited the write sees its failure; one whose caller was cancelled is only logged.
    if not write.cancelled() and write.exception() is not None:
        log.debug("a store write failed after its caller was cancelled", exc_info=write.exception())


async def _whole(write: Awaitable[T]) -> T:
    """Awaits a store write that runs to its end even if the caller is cancelled meanwhile (a
    transaction is never cut in half); the caller still sees the cancel at once."""
    task = asyncio.ensure_future(write)
    task.add_done_callback(_retrieved)
    return await asyncio.shield(task)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a failed call, when it carries one."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


class Runner:
    """Claims and runs predictions for `worker` until stopped; see the module docstring."""

    def __init__(
        self,
        store: Store,
        gateway_address: str,
        settings: RunnerSettings,
        changes: Changes,
        worker: str,
        tls_files: tls.TlsFiles = tls.PLAINTEXT,
    ) -> None:
        self._store = store
        self._address = gateway_address
        self._tls = tls_files
        self._settings = settings
        self._changes = changes
        self._worker = worker
        self._runs: dict[str, _Run] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._channel: tls.ReloadingChannel | None = None
        self._stubs_of: grpc.aio.Channel | None = None
        self._generation: generation_pb2_grpc.GenerationServiceAsyncStub | None = None
        self._embedding: embedding_pb2_grpc.EmbeddingServiceAsyncStub | None = None

    @property
    def running(self) -> int:
        return len(self._runs)

    async def start(self) -> None:
        # Rebuilt when the client certificate is renewed (tls.ReloadingChannel).
        self._channel = tls.ReloadingChannel.to(
            self._address, self._tls, "predictions -> gateway", CHANNEL_OPTIONS
        )
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="predictions-claim"),
            asyncio.create_task(self._purge_loop(), name="predictions-purge"),
        ]

    def wake(self) -> None:
        """Claims at once (e.g. right after a prediction was created)."""
        self._wake.set()

    def cancel_local(self, prediction_id: str) -> bool:
        """Cancels the run of `prediction_id` now when this worker runs it (it ends canceled)."""
        run = self._runs.get(prediction_id)
        if run is None:
            return False
        run.stop("cancel")
        return True

    async def stop(self, grace: float) -> None:
        """Stops claiming, lets running predictions finish for `grace` seconds, then gives the rest
        back to the store (starting, runnable at once) so another worker runs them."""
        self._stopping = True
        self._wake.set()
        # The claim loop ends on its own, so that a claim in flight is not cut in half; its
        # predictions join the runs handled below.
        for loop in self._loops[1:]:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        pending = [run.task for run in self._runs.values() if run.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, grace))
        for run in list(self._runs.values()):
            run.stop("shutdown")
        pending = [run.task for run in self._runs.values() if run.task is not None]
        if pending:
            await asyncio.wait(pending)
        if self._channel is not None:
            await self._channel.close()

    async def _claim_loop(self) -> None:
        settings = self._settings
        while not self._stopping:
            self._wake.clear()
            free = settings.concurrency - len(self._runs)
            claimed: list[Prediction] = []
            if free > 0:
                try:
                    # A run whose lease lapsed (a slow heartbeat) is still ours: not a new claim.
                    claimed = await self._store.claim(
                        self._worker,
                        settings.lease_seconds,
                        free,
                        settings.max_attempts,
                        exclude=frozenset(self._runs),
                    )
                except Exception:
                    log.exception("claiming predictions failed; trying again")
            for prediction in claimed:
                self._begin(prediction)
            if free > 0 and len(claimed) == free:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), settings.poll_seconds)

    def _begin(self, prediction: Prediction) -> None:
        if prediction.id in self._runs:
            # Never two runs of one prediction here; the store refuses the older run's writes,
            # so it stops, and the claim's lease lapses for a later claim to run it once.
            log.warning("prediction %s: claimed while already running here; not run twice", prediction.id)
            return
        run = _Run(prediction)
        self._runs[prediction.id] = run
        RUNNING.inc()
        if prediction.attempt <= 1:
            QUEUE_WAIT.observe(max(0.0, (datetime.now(UTC) - _utc(prediction.created_at)).total_seconds()))
        self._changes.changed(prediction.id)
        run.task = asyncio.create_task(self._supervise(run), name=f"prediction-{prediction.id}")

    async def _purge_loop(self) -> None:
        while not self._stopping:
            try:
                older = datetime.now(UTC) - timedelta(seconds=self._settings.retention_seconds)
                purged = await self._store.purge(older)
                if purged:
                    log.info("purged %d predictions that ended before %s", purged, older.isoformat())
            except Exception:
                log.exception("purging old predictions failed")
            await asyncio.sleep(self._settings.purge_seconds)

    async def _supervise(self, run: _Run) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(run))
        try:
            await self._execute(run)
        except Exception:
            log.exception(
                "prediction %s: its run could not be ended; its lease will expire", run.prediction.id
            )
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            RUN_SECONDS.observe(time.monotonic() - run.started)
            RUNNING.dec()
            self._runs.pop(run.prediction.id, None)
            if not self._stopping:
                self._wake.set()

    async def _heartbeat(self, run: _Run) -> None:
        interval = max(0.05, self._settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                lease = await _whole(
                    self._store.heartbeat(
                        run.prediction.id,
                        self._worker,
                        self._settings.lease_seconds,
                        attempt=run.prediction.attempt,
                    )
                )
            except Exception:
                log.exception("prediction %s: heartbeat failed", run.prediction.id)
                continue
            if not lease.held:
                run.stop("lease")
            elif lease.cancel_requested:
                run.stop("cancel")

    def _logs(self, run: _Run) -> str:
        previous = run.prediction.logs
        lines = "\n".join(run.logs)
        return f"{previous}\n{lines}" if previous and lines else previous or lines

    async def _execute(self, run: _Run) -> None:
        prediction = run.prediction
        run.logs.append(f"run {prediction.attempt} on worker {self._worker}")
        if prediction.cancel_requested:
            run.stop("cancel")
        output: dict[str, Any] | None = None
        usage: tuple[int, int] = (0, 0)
        expired = self._token_expired(prediction)
        if expired and run.stop_reason is None:
            await self._fail(run, expired)
            return
        try:
            if run.stop_reason is not None:
                raise _Ended
            request = tasks.build_request(
                prediction.task, prediction.served_model, prediction.effective_input
            )
            run.call = asyncio.create_task(self._call(run, request))
            output, usage = await run.call
        except asyncio.CancelledError:
            if run.stop_reason is None:
                # This coroutine itself was cancelled (not the call): give the prediction back.
                run.stop_reason = "shutdown"
                await asyncio.shield(self._end_stopped(run))
                raise
        except _Ended:
            pass
        except tasks.InputError as error:
            await self._fail(run, f"INVALID_ARGUMENT: {error}")
            return
        except grpc.aio.AioRpcError as error:
            if run.stop_reason is None:
                await self._gateway_failed(run, error)
                return
        except Exception as error:
            log.exception("prediction %s: run failed", prediction.id)
            await self._fail(run, f"INTERNAL: {type(error).__name__}: {error}")
            return
        if output is None or run.stop_reason == "lease":
            await self._end_stopped(run)
            return
        # A cancel or a stop that comes after the whole output arrived does not waste it.
        size = _json_size(output)
        if size > self._settings.max_output_bytes:
            await self._fail(run, self._too_large(size))
            return
        elapsed = time.monotonic() - run.started
        if prediction.task != "embed":
            run.logs.append(f"{usage[1]} tokens in {elapsed:.3f} s")
        await self._finish(run, "succeeded", output, "", usage)

    def _token_expired(self, prediction: Prediction) -> str:
        """The error of a run whose JWT caller's token has expired since it was created; ''."""
        header = self._settings.jwt_claims_header
        claims = prediction.credentials.get(header) if header else None
        expired = claims_expired_at(claims, time.time()) if claims else None
        if expired is None:
            return ""
        when = datetime.fromtimestamp(expired, UTC).isoformat(timespec="seconds")
        return (
            f"UNAUTHENTICATED: the token this prediction was created with expired at {when}, before "
            "it ran; create it again with a fresh token"
        )

    def _too_large(self, size: int) -> str:
        limit = self._settings.max_output_bytes
        return f"output is {size} bytes, over the limit of {limit} bytes (PREDICTIONS_MAX_OUTPUT_BYTES)"

    async def _end_stopped(self, run: _Run) -> None:
        reason = run.stop_reason
        prediction = run.prediction
        if reason == "lease":
            log.info("prediction %s: lease lost; the worker that holds it now ends it", prediction.id)
            FINISHED.labels("lost").inc()
        elif reason == "cancel":
            run.logs.append("canceled")
            await self._finish(run, "canceled", None, "", (0, 0))
        elif reason == "too_large":
            await self._fail(run, self._too_large(run.oversize))
        else:
            run.logs.append(f"worker {self._worker} stopped; the prediction is given back")
            await self._release(run, 0.0)

    async def _gateway_failed(self, run: _Run, error: grpc.aio.AioRpcError) -> None:
        code = error.code()
        described = f"{code.name}: {error.details() or ''}"
        attempt = run.prediction.attempt
        if code == grpc.StatusCode.CANCELLED:
            # The cancel may still be ours: asked for on another replica, or the lease lost,
            # just before the heartbeat would have said so.
            lease = await _whole(
                self._store.heartbeat(
                    run.prediction.id, self._worker, self._settings.lease_seconds, attempt=attempt
                )
            )
            if not lease.held or lease.cancel_requested:
                run.stop("lease" if not lease.held else "cancel")
                await self._end_stopped(run)
                return
        limit = self._settings.predict_timeout_seconds
        # Our deadline, not one the gateway hit on its own side sooner.
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - run.started >= limit:
            described += f" (the run took longer than {limit:g} s: PREDICTIONS_PREDICT_TIMEOUT_SECONDS)"
        if code in RETRYABLE and attempt < self._settings.max_attempts:
            delay = _retry_delay(error)
            if delay is None:
                base = self._settings.retry_base_seconds * 2 ** max(0, attempt - 1)
                delay = min(self._settings.retry_max_seconds, base) * random.uniform(0.5, 1.0)
            run.logs.append(f"{described}; retrying in {delay:.2f} s")
            await self._release(run, delay)
            return
        if code in RETRYABLE:
            described += f" (after {attempt} attempts)"
        await self._fail(run, described)

    async def _fail(self, run: _Run, error: str) -> None:
        run.logs.append(f"failed: {error}")
        await self._finish(run, "failed", None, error, (0, 0))

    async def _finish(
        self, run: _Run, status: Status, output: Any | None, error: str, usage: tuple[int, int]
    ) -> None:
        prediction = run.prediction
        now = datetime.now(UTC)
        metrics: dict[str, float] = {
            "predict_time": time.monotonic() - run.started,
            "total_time": max(0.0, (now - _utc(prediction.created_at)).total_seconds()),
        }
        if usage != (0, 0):
            metrics["input_token_count"] = float(usage[0])
            metrics["output_token_count"] = float(usage[1])
        if run.first_output is not None:
            metrics["time_to_first_token"] = run.first_output - run.started
        await self._settled(run)
        ended = await _whole(
            self._store.finish(
                prediction.id,
                self._worker,
                status,
                output,
                error,
                self._logs(run),
                metrics,
                attempt=prediction.attempt,
            )
        )
        FINISHED.labels(status if ended is not None else "lost").inc()
        self._changes.changed(prediction.id)

    async def _release(self, run: _Run, delay: float) -> None:
        await self._settled(run)
        await _whole(
            self._store.release(
                run.prediction.id, self._worker, delay, self._logs(run), attempt=run.prediction.attempt
            )
        )
        FINISHED.labels("released").inc()
        self._changes.changed(run.prediction.id)

    async def _settled(self, run: _Run) -> None:
        """Waits for a progress write the cancel left running, so the run's last write is last."""
        if run.writing is not None and not run.writing.done():
            await asyncio.wait([run.writing])

    async def _call(self, run: _Run, request: Message) -> tuple[dict[str, Any], tuple[int, int]]:
        """Calls the gateway; returns the task's unary-shaped output and (input, output) tokens."""
        prediction = run.prediction
        metadata = (*prediction.credentials.items(), ("x-request-id", prediction.id))
        timeout = self._settings.predict_timeout_seconds
        assert self._channel is not None
        channel = self._channel.current()
        if channel is not self._stubs_of:
            self._stubs_of = channel
            self._generation = generation_pb2_grpc.GenerationServiceStub(channel)
            self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        assert self._generation is not None and self._embedding is not None
        if prediction.task == "embed":
            response = await self._embedding.Embed(
                cast(embedding_pb2.EmbedRequest, request), metadata=metadata, timeout=timeout
            )
            run.first_output = time.monotonic()
            return message_dict(response), (response.usage.prompt_tokens, 0)
        generation = self._generation
        streams: dict[str, grpc.aio.UnaryStreamMultiCallable[Any, generation_pb2.GenerateStreamResponse]] = {
            "generate": generation.GenerateStream,
            "chat": generation.ChatStream,
            "math": generation.SolveMathStream,
            "coding": generation.SolveCodingStream,
        }
        call = streams[prediction.task](request, metadata=metadata, timeout=timeout)
        try:
            messages = await self._consume(run, call, request)
        finally:
            call.cancel()
        return messages

    async def _consume(
        self, run: _Run, call: AsyncIterable[generation_pb2.GenerateStreamResponse], request: Message
    ) -> tuple[dict[str, Any], tuple[int, int]]:
        parameters: Any = request.parameters  # type: ignore[attr-defined]
        keep_tokens = parameters.logprobs or parameters.top_logprobs > 0
        sequences: dict[int, _Sequence] = {}
        usage = common_pb2.Usage()
        request_id = ""
        prompt_tokens: list[common_pb2.Token] = []
        saved_text = ""
        saved_logs = self._logs(run)
        last_save = 0.0
        async for message in call:
            request_id = request_id or message.request_id
            if message.prompt_tokens:
                prompt_tokens = list(message.prompt_tokens)
            if message.HasField("usage"):
                usage = message.usage
            sequence = sequences.setdefault(message.index, _Sequence())
            if message.HasField("token"):
                sequence.text += message.token.text
                if keep_tokens:
                    sequence.tokens.append(message.token)
            if message.finish_reason:
                sequence.final = message
                sequence.text = message.generated_text
            if run.first_output is None and sequence.text:
                run.first_output = time.monotonic()
                run.logs.append(f"first output after {run.first_output - run.started:.3f} s")
            partial = sequences[min(sequences)].text
            if len(partial) > self._settings.max_output_bytes:
                run.oversize = len(partial.encode())
                run.stop("too_large")
                raise _Ended
            now = time.monotonic()
            if partial != saved_text and now - last_save >= self._settings.progress_seconds:
                logs = self._logs(run)
                events: tuple[Event, ...] = ("output", "logs") if logs != saved_logs else ("output",)
                write = asyncio.ensure_future(
                    self._store.progress(
                        run.prediction.id,
                        self._worker,
                        {"text": partial},
                        logs,
                        events,
                        attempt=run.prediction.attempt,
                    )
                )
                run.writing = write
                held = await _whole(write)
                self._changes.changed(run.prediction.id)
                if not held:
                    run.stop("lease")
                    raise _Ended
                saved_text, saved_logs, last_save = partial, logs, now
        output = self._assemble(run.prediction, sequences, usage, request_id, prompt_tokens)
        return output, (usage.prompt_tokens, usage.completion_tokens)

    def _assemble(
        self,
        prediction: Prediction,
        sequences: dict[int, _Sequence],
        usage: common_pb2.Usage,
        request_id: str,
        prompt_tokens: list[common_pb2.Token],
    ) -> dict[str, Any]:
        """The unary RPC's response, built from the stream's messages."""
        ordered = [sequences[index] for index in sorted(sequences)] or [_Sequence()]
        first = ordered[0]
        final = first.final or generation_pb2.GenerateStreamResponse(generated_text=first.text)
        model = prediction.served_model
        common: dict[str, Any] = {
            "request_id": request_id,
            "tokens_generated": final.tokens_generated,
            "generation_time": final.generation_time,
            "finish_reason": final.finish_reason,
            "usage": usage,
            "model": model,
        }
        response: Message
        if prediction.task == "generate":
            response = generation_pb2.GenerateResponse(
                generated_text=final.generated_text,
                tokens_per_second=final.tokens_per_second,
                sequences=[
                    common_pb2.GeneratedSequence(
                        index=index,
                        text=seq.final.generated_text if seq.final else seq.text,
                        tokens_generated=seq.final.tokens_generated if seq.final else 0,
                        finish_reason=seq.final.finish_reason
                        if seq.final
                        else common_pb2.FINISH_REASON_UNSPECIFIED,
                        tokens=seq.tokens,
                    )
                    for index, seq in zip(sorted(sequences), ordered, strict=False)
                ],
                prompt_tokens=prompt_tokens,
                tokens=first.tokens,
                **common,
            )
        elif prediction.task == "chat":
            response = generation_pb2.ChatResponse(
                message=common_pb2.ChatMessage(role="assistant", content=final.generated_text),
                tokens_per_second=final.tokens_per_second,
                tokens=first.tokens,
                **common,
            )
        elif prediction.task == "math":
            response = generation_pb2.SolveMathResponse(
                solution=final.generated_text, answer=final.answer, **common
            )
        else:
            response = generation_pb2.SolveCodingResponse(
                solution=final.generated_text, code=final.code, language=final.language, **common
            )
        return message_dict(response)
