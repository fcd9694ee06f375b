"""The generation engine: one model, one scheduler, continuous batching; no gRPC in here. The forward passes
and the KV cache layout belong to a runner (services/generator/runner.py); sampling, stop rules and text
are the same whichever runner serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jinja2
import torch

from services.common.sampling import DEFAULT_LIMITS, Constraint, SamplingLimits, params_violations
from services.common.sampling import SamplingParams as SamplingParams  # re-exported for callers
from services.generator import metrics
from services.generator.constraints import (
    CompiledConstraint,
    ConstraintCompiler,
    ConstraintRefused,
    fill_masks,
)
from services.generator.prefix_cache import common_prefix
from services.generator.runner import BeamSettings, ChunkedPrefill, Runner, position_logits
from services.generator.sampling import (
    BatchKnobs,
    RowKnobs,
    TokenMasks,
    penalties_of,
    record_tokens,
    sample,
)
from services.generator.textstream import IncrementalDetokenizer, StopMatcher, TokenPieces

log = logging.getLogger(__name__)

# "constraint": the row's constraint was complete and allowed no further token.
FinishReason = Literal["length", "eos", "stop", "constraint"]
PROMPT_CONTEXT_IDS = 4
# A new prompt sharing this many more tokens with a prompt still being prefilled than with the prefix
# cache waits for that prompt to finish (and be cached) rather than compute the shared part again.
SHARED_WITH_FILLING = 16
# The share of --max-step-tokens a step always keeps for prompt chunks, however many rows decode,
# so that prompts still progress when the running rows alone fill (or pass) the budget.
MIN_PROMPT_SHARE = 4


def prompt_budget(max_step_tokens: int, running_rows: int) -> int:
    """The prompt tokens one step may compute: what the running rows leave of `max_step_tokens`,
    but at least a quarter of it (and at least 1)."""
    return max(1, max_step_tokens // MIN_PROMPT_SHARE, max_step_tokens - running_rows)


def template_has_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders a `tools` list (its own tool-call format)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[tuple[str, str]], tools: Sequence[dict[str, Any]] = ()
) -> list[int]:
    """The prompt of (role, content) messages (and tools, for a template with a tool format)
    through the model's chat template, ready to answer."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, **extra)
    # A dict (BatchEncoding) in recent transformers, a list of ids in older ones.
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


class EngineError(Exception):
    """A request the engine refuses; the service maps each kind to a status code."""


class InvalidRequest(EngineError):
    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{name}: {why}" for name, why in self.violations))


class OverCapacity(EngineError):
    def __init__(self, message: str, retry_after: float, reason: str) -> None:
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(message)


class ShuttingDown(EngineError):
    pass


class ModelLoading(EngineError):
    """No engine yet: the model is still loading."""


class ModelNotFound(EngineError):
    def __init__(self, name: str, served: str) -> None:
        self.name = name
        self.served = served
        super().__init__(f"model {name!r} not found (available: {served})")


def _row_knobs(params: SamplingParams) -> RowKnobs:
    return RowKnobs(
        params.do_sample,
        params.temperature,
        params.top_k,
        params.top_p,
        params.repetition_penalty,
        params.top_logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=params.logit_bias,
    )


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_sequences: int = 32
    max_waiting_requests: int = 128
    max_total_tokens: int = 262144
    max_prefill_tokens: int = 4096
    max_model_len: int = 0
    # Tokens one step computes, decode rows first, prompt chunks in the rest; 0: whole-prompt joins.
    max_step_tokens: int = 0
    sampling: SamplingLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        # A request's sequences must fit the running batch together.
        if self.sampling.max_num_return_sequences > self.max_running_sequences:
            clamped = replace(self.sampling, max_num_return_sequences=self.max_running_sequences)
            object.__setattr__(self, "sampling", clamped)


@dataclass
class TokenEvent:
    """One generated token of sequence `index`; the last one of a sequence has finish_reason."""

    index: int
    token_id: int
    text: str
    logprob: float
    special: bool
    finish_reason: FinishReason | None = None
    # (id, logprob) of the most likely tokens, best first, when the request asks for top_logprobs.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class PromptToken:
    """A prompt token with its logprob given the tokens before it (None for the first one) and
    the most likely tokens at its position, best first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class SequenceResult:
    index: int
    text: str
    tokens_generated: int
    finish_reason: FinishReason
    # Every token's event when the request asks for logprobs, else empty.
    tokens: list[TokenEvent] = field(default_factory=list)


@dataclass
class GenerationResult:
    request_id: str
    sequences: list[SequenceResult]
    prompt_tokens: int
    generation_time: float
    prompt_logprobs: list[PromptToken] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(s.tokens_generated for s in self.sequences)


class _Sequence:
    """One returned sequence: its sampler state, text assembly and stop rules."""

    def __init__(self, request: Request, index: int, tokenizer: Any, special_ids: frozenset[int]) -> None:
        self.request = request
        self.index = index
        params = request.params
        self.generator: torch.Generator | None = None
        if params.seed is not None and params.do_sample:
            self.generator = torch.Generator().manual_seed((params.seed + index) & 0xFFFF_FFFF_FFFF_FFFF)
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_ids[-PROMPT_CONTEXT_IDS:])
        self.stop = StopMatcher(params.stop)
        self.special_ids = special_ids
        self.parts: list[str] = []
        self.events: list[TokenEvent] = []
        self.token_ids: list[int] = []
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        # The row's own copy of the request's constraint, advanced by each accepted token.
        self.matcher = request.grammar.matcher() if request.grammar is not None else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.request.cancelled

    def accept(
        self,
        token_id: int,
        logprob: float,
        eos_ids: frozenset[int],
        top: list[tuple[int, float]] | None = None,
        complete: bool = False,
    ) -> TokenEvent:
        """Appends a token; `complete`: it completed the row's constraint."""
        self.generated += 1
        self.token_ids.append(token_id)
        special = token_id in self.special_ids
        finish: FinishReason | None = None
        if token_id in eos_ids:
            text, finish = self.stop.flush(), "eos"
        else:
            piece = "" if special else self.detok.add(token_id)
            text, hit = self.stop.feed(piece)
            if hit:
                finish = "stop"
            elif complete:
                text += self.stop.flush()
                finish = "constraint"
            elif self.generated >= self.request.params.max_new_tokens:
                text += self.stop.flush()
                finish = "length"
        self.parts.append(text)
        self.finish_reason = finish
        event = TokenEvent(self.index, token_id, text, logprob, special, finish, top or [])
        if self.request.params.logprobs:
            self.events.append(event)
        return event

    def result(self) -> SequenceResult:
        return SequenceResult(
            self.index, "".join(self.parts), self.generated, self.finish_reason or "length", self.events
        )


class Request:
    """A submitted request: its sequences' events arrive on `events()`."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: CompiledConstraint | None = None,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.grammar = grammar
        self.cancelled = False
        self.sequences: list[_Sequence] = []
        # Set by the worker when the request joins, before its first event (prompt_logprobs).
        self.prompt_logprobs: list[PromptToken] | None = None
        # Set by the worker when this request alone failed to join; the scheduler reports it.
        self.failure: Exception | None = None
        self.unfinished = params.num_return_sequences
        self.reserved_tokens = (len(prompt_ids) + params.max_new_tokens) * params.num_return_sequences
        self.submitted_at = time.monotonic()
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.finished_at = 0.0
        self._queue: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def results(self) -> list[SequenceResult]:
        return [s.result() for s in self.sequences]


@dataclass
class SchedulerStats:
    """The engine's own totals: `requests_admitted` queued by `submit`, `requests_failed` those of
    them that failed (a failed step or prompt pass). Refusals never reach these."""

    requests_admitted: int = 0
    requests_failed: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    tps_sum: float = 0.0
    tps_count: int = 0
    batch_size_sum: int = 0
    steps: int = 0
    started_at: float = field(default_factory=time.monotonic)


class _Batch:
    """The running rows and the runner's state for them (touched by the worker thread only)."""

    def __init__(self) -> None:
        self.rows: list[_Sequence] = []
        self.state: Any = None
        self.last = torch.zeros(0, dtype=torch.long)
        self.presence: torch.Tensor | None = None
        # Generated-token counts [B, V] and their presence/frequency penalties, kept only while some
        # row has such a penalty.
        self.counts: torch.Tensor | None = None
        self.penalties: torch.Tensor | None = None
        self.knobs = BatchKnobs([], [])
        # Indices of the rows with a constraint, rebuilt with the rows.
        self.constrained: list[int] = []


@dataclass(eq=False)
class _Filling:
    """A request whose prompt is prefilled a chunk per step: `row` in the engine's filling state
    once its first chunk is planned (-1 before), `done` prompt tokens in place there."""

    request: Request
    row: int = -1
    done: int = 0


def _constrained(rows: list[_Sequence]) -> list[int]:
    return [i for i, row in enumerate(rows) if row.matcher is not None]


@dataclass
class _PendingMasks:
    """The masks of the rows `rows` [R], being computed on the mask thread."""

    rows: torch.Tensor
    future: Future[torch.Tensor]


def _advance(row: _Sequence, token: int) -> bool:
    """Feeds `token` to the row's matcher; whether the constraint is now complete."""
    matcher = row.matcher
    assert matcher is not None
    if not matcher.consume_token(token):
        # Masked sampling cannot pick a refused token; should it happen, the next mask allows EOS only.
        log.error("constraint refused token %d: %s", token, matcher.get_error())
        return False
    return matcher.is_stopped()


class Engine:
    def __init__(self, runner: Runner, tokenizer: Any, model_id: str, limits: SchedulerLimits) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.limits = limits
        facts = runner.facts
        context = facts.context_length
        self.max_model_len = min(limits.max_model_len, context) if limits.max_model_len else context
        self.vocab_size = facts.vocab_size
        self.eos_ids = facts.eos_token_ids
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.pieces = TokenPieces(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.stats = SchedulerStats()
        self._waiting: deque[Request] = deque()
        # Rows of the requests taken from the queue and not finished yet (event loop side: the
        # batch's own rows change on the worker thread during a step).
        self._rows_taken = 0
        self._reserved_tokens = 0
        self._batch = _Batch()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator-step")
        self.constraints = ConstraintCompiler(tokenizer, self.vocab_size, sorted(self.eos_ids))
        # Compiles run apart from the step worker: a request waits for its grammar, the batch does not.
        self._compile_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="generator-compile")
        self._compiling: dict[Constraint, asyncio.Future[CompiledConstraint]] = {}
        # Masks are computed here while the step worker runs the forward pass.
        self._mask_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator-mask")
        self._mask_eos = min(self.eos_ids, default=self.pad_id)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._admitting = True
        self._active: set[Request] = set()
        self._step_time_ema: float | None = None
        # Time the step worker waited for masks after the forward pass, and how many waits.
        self.mask_wait_seconds = 0.0
        self.mask_waits = 0
        # Chunked prefill, where the runner can continue a prompt: the requests being prefilled (in
        # arrival order) and the runner's state of their rows (worker thread; the loop reads them
        # between steps only).
        self._chunker: ChunkedPrefill | None = None
        if limits.max_step_tokens > 0 and callable(getattr(runner, "prefill_chunks", None)):
            self._chunker = runner  # type: ignore[assignment]
        self._filling: list[_Filling] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fill_state: Any = None
        self._fill_rows = 0

    # ----- tokenization -----

    def encode_prompt(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(prompt)
        return ids

    def encode_chat(
        self, messages: Sequence[tuple[str, str]], tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        if tools and not template_has_tools(self.tokenizer):
            raise InvalidRequest(
                [
                    (
                        "tools",
                        f"the chat template of {self.model_id} has no tool format: describe the "
                        "tools in a message, or constrain the reply (tool_choice required or a "
                        "named function through /v1/chat/completions)",
                    )
                ]
            )
        try:
            return chat_prompt_ids(self.tokenizer, messages, tools)
        except jinja2.TemplateError as error:  # raise_exception() in a template, an unknown role...
            raise InvalidRequest(
                [("messages", f"the chat template of {self.model_id} refused the conversation: {error}")]
            ) from error

    # ----- admission -----

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises InvalidRequest naming every bad field: the knobs' shared ranges under this
        server's limits, and what depends on the model (context length, vocabulary)."""
        bad: list[tuple[str, str]] = []
        if not prompt_ids:
            bad.append(("prompt", "must not be empty"))
        bad.extend(params_violations(params, self.limits.sampling))
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            bad.append(
                (
                    "parameters.max_new_tokens",
                    f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                    f"exceeds the model's context of {self.max_model_len} tokens",
                )
            )
        if params.top_k > self.vocab_size:
            bad.append(("parameters.top_k", f"must be between 0 and the vocabulary size {self.vocab_size}"))
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                bad.append(
                    (
                        f"parameters.logit_bias[{token}]",
                        f"token id {token} is not below the model's vocabulary size {self.vocab_size}",
                    )
                )
        if bad:
            raise InvalidRequest(bad)

    async def compile_constraint(self, params: SamplingParams) -> CompiledConstraint | None:
        """The request's constraint compiled for this model, None without one: from the cache at
        once, else on the compile threads (one compile per distinct constraint at a time). Raises
        InvalidRequest for knobs out of range or a constraint the library refuses."""
        constraint = params.constraint
        if constraint is None:
            return None
        bad = params_violations(params, self.limits.sampling)
        if bad:  # before compiling: the length limit bounds the compile's work
            raise InvalidRequest(bad)
        compiled = self.constraints.cached(constraint)
        if compiled is not None:
            return compiled
        pending = self._compiling.get(constraint)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._compile_executor, self.constraints.compile, constraint)
            )
            self._compiling[constraint] = pending

            def settled(future: asyncio.Future[CompiledConstraint]) -> None:
                self._compiling.pop(constraint, None)
                if not future.cancelled():
                    future.exception()  # retrieved here: every waiter may have gone

            pending.add_done_callback(settled)
        try:
            # Shielded: a waiter that goes away leaves the compile to the others (and the cache).
            return await asyncio.shield(pending)
        except ConstraintRefused as error:
            raise InvalidRequest([(error.field, error.reason)]) from error

    def _compile_now(self, constraint: Constraint) -> CompiledConstraint:
        try:
            return self.constraints.compile(constraint)
        except ConstraintRefused as error:
            raise InvalidRequest([(error.field, error.reason)]) from error

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, grammar: CompiledConstraint | None = None
    ) -> Request:
        """Queue a request (validated here); raises InvalidRequest, OverCapacity or ShuttingDown.
        A constrained request passes its `compile_constraint` result, else it compiles here, on
        the caller's thread."""
        self.validate(prompt_ids, params)
        if not self._admitting:
            raise ShuttingDown("the generator is shutting down and admits no new requests")
        if params.constraint is None:
            grammar = None
        elif grammar is None or grammar.constraint != params.constraint:
            grammar = self._compile_now(params.constraint)
        request = Request(f"gen-{uuid.uuid4().hex[:16]}", list(prompt_ids), params, grammar)
        if request.reserved_tokens > self.limits.max_total_tokens:
            raise InvalidRequest(
                [
                    (
                        "parameters.max_new_tokens",
                        f"needs more than the server's {self.limits.max_total_tokens}-token budget",
                    )
                ]
            )
        queued = len(self._waiting) - self._joinable()
        if queued >= self.limits.max_waiting_requests:
            raise OverCapacity(
                f"{queued} requests already wait for a free row of the batch "
                f"(limit {self.limits.max_waiting_requests})",
                self._retry_after(),
                "WAITING_QUEUE_FULL",
            )
        if self._reserved_tokens + request.reserved_tokens > self.limits.max_total_tokens:
            raise OverCapacity(
                f"the token budget of {self.limits.max_total_tokens} tokens is in use",
                self._retry_after(),
                "TOKEN_BUDGET_EXHAUSTED",
            )
        self._reserved_tokens += request.reserved_tokens
        self._waiting.append(request)
        self._active.add(request)
        self.stats.requests_admitted += 1
        metrics.WAITING.set(len(self._waiting))
        self._wake.set()
        return request

    def _joinable(self) -> int:
        """How many waiting requests, from the head, fit in the batch's free rows: they join at the
        next step, so the waiting limit does not count them (else a burst that arrives during the
        first step fills the queue while most of the batch stands empty)."""
        free = self.limits.max_running_sequences - self._rows_taken
        joinable = 0
        for request in self._waiting:
            rows = request.params.num_return_sequences
            if request.params.num_beams > 1 or rows > free:
                break
            free -= rows
            joinable += 1
        return joinable

    def _retry_after(self) -> float:
        mean_step = self._step_time_ema or 0.05
        # Roughly the time for the oldest running sequences to make room.
        return max(0.5, min(30.0, mean_step * 32))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        request = self.submit(prompt_ids, params, await self.compile_constraint(params))
        try:
            async for _ in request.events():
                pass
        finally:
            request.cancel()
        return GenerationResult(
            request.id,
            request.results(),
            len(prompt_ids),
            request.finished_at - request.admitted_at,
            request.prompt_logprobs,
        )

    # ----- lifecycle -----

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="generator-scheduler")

    def stop_admitting(self) -> None:
        self._admitting = False

    @property
    def idle(self) -> bool:
        return not self._active

    async def wait_idle(self, grace: float) -> bool:
        """Whether every request finished within `grace` seconds."""
        deadline = time.monotonic() + grace
        while self._active and time.monotonic() < deadline:  # noqa: ASYNC110 - polled only at shutdown
            await asyncio.sleep(0.05)
        return not self._active

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._mask_executor.shutdown(wait=True, cancel_futures=True)
        self._compile_executor.shutdown(wait=False, cancel_futures=True)

    # ----- scheduler (event loop side) -----

    def _take_joiners(self) -> tuple[list[Request], Request | None]:
        """Waiting requests that fit in the batch now, or one beam-search request on its own."""
        joiners: list[Request] = []
        # Finished rows leave the batch at the start of the next step, before joiners join.
        room = self.limits.max_running_sequences - sum(not row.done for row in self._batch.rows)
        room -= sum(e.request.params.num_return_sequences for e in self._filling if not e.request.cancelled)
        # Chunked prefill bounds each step's work itself: every request that fits a row joins.
        budget = self.limits.max_prefill_tokens
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._finish(head)
                continue
            if head.params.num_beams > 1:
                if joiners:
                    break
                self._waiting.popleft()
                self._rows_taken += head.params.num_return_sequences
                return [], head
            if head.params.num_return_sequences > room:
                break
            if self._chunker is None and joiners and len(head.prompt_ids) > budget:
                break
            self._waiting.popleft()
            joiners.append(head)
            self._rows_taken += head.params.num_return_sequences
            room -= head.params.num_return_sequences
            budget -= len(head.prompt_ids)
        return joiners, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._batch.rows and not self._waiting and not self._filling:
                self._wake.clear()
                await self._wake.wait()
                continue
            joiners, beam = self._take_joiners()
            now = time.monotonic()
            for request in [*joiners, *([beam] if beam else [])]:
                request.admitted_at = now
                metrics.QUEUE_TIME.observe(now - request.submitted_at)
            metrics.WAITING.set(len(self._waiting))
            started = time.monotonic()
            try:
                if beam is not None:
                    events = await loop.run_in_executor(self._executor, self._beam_search, beam)
                else:
                    events = await loop.run_in_executor(self._executor, self._step, joiners)
            except Exception as error:  # a failed step must not take the server down with it
                log.exception("generation step failed")
                # Every admitted request was in this step: in the batch, being prefilled, or just
                # done with its prompt (no longer in _filling, not yet merged into the batch).
                admitted = [r for r in self._active if r.admitted_at]
                self._fail_all(error, [*joiners, *([beam] if beam else []), *admitted])
                continue
            elapsed = time.monotonic() - started
            self._step_time_ema = (
                elapsed if self._step_time_ema is None else 0.9 * self._step_time_ema + 0.1 * elapsed
            )
            rows = len(self._batch.rows)
            if beam is None and rows:
                metrics.INTER_TOKEN.observe(elapsed)
                metrics.BATCH_SIZE.observe(rows)
                self.stats.batch_size_sum += rows
                self.stats.steps += 1
            metrics.RUNNING.set(rows)
            self._dispatch(events)
            # Not only this step's joiners: a chunked prompt taken in an earlier step fails when
            # its prefill ends (its prompt logprobs pass), and must end and free its share too.
            for request in [r for r in self._active if r.failure is not None]:
                if request.failure is not None:
                    self.stats.requests_failed += 1
                    request._queue.put_nowait(RuntimeError(f"generation failed: {request.failure}"))
                    self._finish(request)

    def _dispatch(self, events: list[tuple[Request, TokenEvent]], sweep: bool = True) -> None:
        """Hands the events to their requests; `sweep`: at a step's end, also finishes the
        cancelled requests that left the batch."""
        now = time.monotonic()
        generated = 0
        for request, event in events:
            generated += 1
            if not request.first_token_at:
                request.first_token_at = now
                ttft = now - request.submitted_at
                metrics.TTFT.observe(ttft)
                self.stats.ttft_sum += ttft
                self.stats.ttft_count += 1
            if request.cancelled:
                continue
            request._queue.put_nowait(event)
            if event.finish_reason is not None:
                request.unfinished -= 1
                if request.unfinished == 0:
                    self._finish(request)
        self.stats.generated_tokens_total += generated
        metrics.GENERATED_TOKENS.inc(generated)
        if not sweep:
            return
        for request in [r for r in self._active if r.cancelled and r.admitted_at and not self._in_batch(r)]:
            self._finish(request)

    def _in_batch(self, request: Request) -> bool:
        return any(row.request is request for row in self._batch.rows)

    def _finish(self, request: Request) -> None:
        if request not in self._active:
            return
        self._active.discard(request)
        self._reserved_tokens -= request.reserved_tokens
        request.finished_at = time.monotonic()
        if request.admitted_at:
            self._rows_taken -= request.params.num_return_sequences
            self.stats.prompt_tokens_total += len(request.prompt_ids)
            metrics.PROMPT_TOKENS.inc(len(request.prompt_ids))
            metrics.E2E.observe(request.finished_at - request.submitted_at)
            tokens = sum(s.generated for s in request.sequences)
            duration = request.finished_at - request.admitted_at
            if tokens and duration > 0 and not request.cancelled:
                self.stats.tps_sum += tokens / duration
                self.stats.tps_count += 1
        request._queue.put_nowait(None)

    def _fail_all(self, error: Exception, extra: list[Request]) -> None:
        """Fails the step's requests (the batch and `extra`, its joiners); the waiting ones stay."""
        for request in list(self._active):
            if request in extra or self._in_batch(request):
                self.stats.requests_failed += 1
                request._queue.put_nowait(RuntimeError(f"generation failed: {error}"))
                self._finish(request)
        self._batch = _Batch()
        self._filling, self._fill_state, self._fill_rows = [], None, 0

    # ----- worker thread: the only place that touches the model and the batch -----

    @torch.inference_mode()
    def _step(self, joiners: list[Request]) -> list[tuple[Request, TokenEvent]]:
        events: list[tuple[Request, TokenEvent]] = []
        self._evict()
        if self._chunker is not None:
            self._filling.extend(_Filling(request) for request in joiners)
            if self._filling:
                self._fill(self._chunker, events)
        elif joiners:
            self._join(joiners, events)
        batch = self._batch
        if not batch.rows:
            return events
        if events and self._loop is not None:
            # The joiners' first tokens go out now, not after the step's decode (their second).
            self._loop.call_soon_threadsafe(self._dispatch, events, False)
            events = []
        masks = self._start_masks(batch.rows, batch.constrained)
        logits = self.runner.decode(batch.state, batch.last)
        self._sample_rows(
            batch.rows, logits, batch.presence, batch.counts, batch.penalties, batch.knobs, events, masks
        )
        return events

    def _start_masks(self, rows: list[_Sequence], constrained: list[int]) -> _PendingMasks | None:
        """Starts computing the constrained rows' masks on the mask thread, to overlap the forward
        pass that follows; None (no thread hop) when no row is constrained."""
        if not constrained:
            return None
        matchers = [m for m in (rows[i].matcher for i in constrained) if m is not None]
        assert len(matchers) == len(constrained), "a constrained row without its matcher"
        future = self._mask_executor.submit(
            fill_masks, matchers, self.constraints.words, self.vocab_size, self._mask_eos
        )
        return _PendingMasks(torch.tensor(constrained, dtype=torch.long), future)

    def _sample_rows(
        self,
        rows: list[_Sequence],
        logits: torch.Tensor,
        presence: torch.Tensor | None,
        counts: torch.Tensor | None,
        penalties: torch.Tensor | None,
        knobs: BatchKnobs,
        events: list[tuple[Request, TokenEvent]],
        pending: _PendingMasks | None = None,
    ) -> torch.Tensor:
        masks = None
        if pending is not None:
            started = time.perf_counter()
            masks = TokenMasks(pending.rows, pending.future.result())
            self.mask_wait_seconds += time.perf_counter() - started
            self.mask_waits += 1
        sampled = sample(logits, presence, knobs, penalties, masks)
        tokens = sampled.tokens
        if presence is not None:
            presence[torch.arange(len(rows)), tokens] = True
        if counts is not None and penalties is not None:
            record_tokens(counts, penalties, tokens, knobs)
        if rows is self._batch.rows:
            self._batch.last = tokens
        tops: dict[int, list[tuple[int, float]]] = {}
        if sampled.top is not None:
            top = sampled.top
            for row_index, ids, values in zip(top.rows, top.ids.tolist(), top.logprobs.tolist(), strict=True):
                wanted = rows[row_index].request.params.top_logprobs
                # A token the row's constraint refuses (-inf) is no alternative.
                pairs = zip(ids[:wanted], values[:wanted], strict=True)
                tops[row_index] = [(t, v) for t, v in pairs if v != float("-inf")]
        for i, (row, token, logprob) in enumerate(
            zip(rows, tokens.tolist(), sampled.logprobs.tolist(), strict=True)
        ):
            if row.done:
                continue
            complete = row.matcher is not None and token not in self.eos_ids and _advance(row, token)
            events.append((row.request, row.accept(token, logprob, self.eos_ids, tops.get(i), complete)))
        return tokens

    def _evict(self) -> None:
        batch = self._batch
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep, dtype=torch.long)
        batch.state = self.runner.select(batch.state, keep)
        batch.rows = [batch.rows[i] for i in keep]
        batch.last = batch.last.index_select(0, index)
        if batch.presence is not None:
            batch.presence = batch.presence.index_select(0, index)
        batch.knobs = BatchKnobs(
            [_row_knobs(r.request.params) for r in batch.rows], [r.generator for r in batch.rows]
        )
        batch.constrained = _constrained(batch.rows)
        if batch.counts is not None and batch.penalties is not None:
            # Dropped with the last row that needs them, so a batch without penalties pays nothing.
            keep_counts = batch.knobs.any_count_penalty
            batch.counts = batch.counts.index_select(0, index) if keep_counts else None
            batch.penalties = batch.penalties.index_select(0, index) if keep_counts else None

    def _with_prompt_logprobs(self, joiners: list[Request]) -> list[Request]:
        """Computes the prompt logprobs the joiners ask for; those whose pass failed are left out."""
        for request in joiners:
            params = request.params
            if params.prompt_logprobs:
                try:
                    request.prompt_logprobs = self._prompt_logprobs(request.prompt_ids, params.top_logprobs)
                except Exception as error:  # this request's own pass: the others still join
                    log.exception("prompt logprobs failed")
                    request.failure = error
        return [r for r in joiners if r.failure is None]

    def _new_rows(self, joiners: list[Request]) -> tuple[list[_Sequence], list[int]]:
        """The joiners' sequences and, for each, the index of its request."""
        rows: list[_Sequence] = []
        origin: list[int] = []
        for i, request in enumerate(joiners):
            for index in range(request.params.num_return_sequences):
                sequence = _Sequence(request, index, self.tokenizer, self.special_ids)
                request.sequences.append(sequence)
                rows.append(sequence)
                origin.append(i)
        return rows, origin

    def _join(self, joiners: list[Request], events: list[tuple[Request, TokenEvent]]) -> None:
        joiners = self._with_prompt_logprobs(joiners)
        if not joiners:
            return
        rows, origin = self._new_rows(joiners)
        # The first token's masks (the start state) overlap the prefill.
        masks = self._start_masks(rows, _constrained(rows))
        logits, state = self.runner.prefill([r.prompt_ids for r in joiners])
        self._admit(joiners, rows, origin, logits, state, masks, events)

    def _fill(self, chunker: ChunkedPrefill, events: list[tuple[Request, TokenEvent]]) -> None:
        """One step's prompt chunks: in arrival order, as many prompt tokens as the step's budget
        leaves after its decode rows; a prompt whose last chunk this is samples its first token
        and joins the batch."""
        if any(entry.request.cancelled for entry in self._filling):
            # A cancelled prompt's rows are freed at once: a long one may hold much memory.
            self._compact_filling([e for e in self._filling if not e.request.cancelled], force=True)
        budget = prompt_budget(self.limits.max_step_tokens, len(self._batch.rows))
        planned: list[tuple[_Filling, int]] = []
        opening: list[_Filling] = []
        for entry in self._filling:
            if budget <= 0:
                break
            prompt = entry.request.prompt_ids
            if entry.row < 0:
                cached = chunker.cached_prefix(prompt)
                if cached is not None and any(
                    common_prefix(prompt, other.request.prompt_ids) >= cached + SHARED_WITH_FILLING
                    for other in self._filling
                    if other is not entry and (other.row >= 0 or other in opening)
                ):
                    # It waits for that prompt to be cached; unrelated prompts behind it use the
                    # budget meanwhile (in arrival order), and it goes first once it can.
                    continue
                entry.done = cached or 0
                opening.append(entry)
            count = min(budget, len(prompt) - entry.done)
            planned.append((entry, count))
            budget -= count
        if opening:
            self._fill_state, held = chunker.open_rows(
                self._fill_state, [e.request.prompt_ids for e in opening]
            )
            for entry, cached in zip(opening, held, strict=True):
                entry.row, entry.done = self._fill_rows, cached
                self._fill_rows += 1
        # open_rows found what cached_prefix did (nothing was cached in between); min() keeps it safe.
        planned = [(e, min(count, len(e.request.prompt_ids) - e.done)) for e, count in planned]
        if not planned:
            return
        pieces = [(entry.row, entry.request.prompt_ids, count) for entry, count in planned]
        logits = chunker.prefill_chunks(self._fill_state, pieces)
        finished: list[int] = []
        for i, (entry, count) in enumerate(planned):
            entry.done += count
            if entry.done == len(entry.request.prompt_ids):
                finished.append(i)
        if not finished:
            return
        done = {planned[i][0] for i in finished}
        state = self.runner.select(self._fill_state, [planned[i][0].row for i in finished])
        self._compact_filling([entry for entry in self._filling if entry not in done])
        joiners = [planned[i][0].request for i in finished]
        logits = logits.index_select(0, torch.tensor(finished, dtype=torch.long))
        passed = self._with_prompt_logprobs(joiners)
        if len(passed) < len(joiners):
            keep = [i for i, request in enumerate(joiners) if request.failure is None]
            state = self.runner.select(state, keep)
            logits = logits.index_select(0, torch.tensor(keep, dtype=torch.long))
        if not passed:
            return
        rows, origin = self._new_rows(passed)
        masks = self._start_masks(rows, _constrained(rows))
        self._admit(passed, rows, origin, logits, state, masks, events)

    def _compact_filling(self, remaining: list[_Filling], force: bool = False) -> None:
        """Keeps the requests still being prefilled; the rows of the others are freed once they
        are half of the filling state (all of it when no row is left), or at once with `force`."""
        self._filling = remaining
        opened = [entry for entry in remaining if entry.row >= 0]
        if not opened:
            self._fill_state, self._fill_rows = None, 0
        elif len(opened) < self._fill_rows and (force or 2 * len(opened) <= self._fill_rows):
            self._fill_state = self.runner.select(self._fill_state, [entry.row for entry in opened])
            for row, entry in enumerate(opened):
                entry.row = row
            self._fill_rows = len(opened)

    def _admit(
        self,
        joiners: list[Request],
        rows: list[_Sequence],
        origin: list[int],
        logits: torch.Tensor,
        state: Any,
        masks: _PendingMasks | None,
        events: list[tuple[Request, TokenEvent]],
    ) -> None:
        """Samples the joiners' first tokens from their prompts' last logits [joiners, V] and
        merges their live rows (of `state`, one per joiner) into the batch."""
        logits = logits.index_select(0, torch.tensor(origin, dtype=torch.long))
        need_presence = any(r.request.params.repetition_penalty != 1.0 for r in rows) or (
            self._batch.presence is not None
        )
        presence = self._presence_of(rows) if need_presence else None
        knobs = BatchKnobs([_row_knobs(r.request.params) for r in rows], [r.generator for r in rows])
        counts = self._counts_of(rows) if knobs.any_count_penalty else None
        penalties = penalties_of(counts, knobs) if counts is not None else None
        tokens = self._sample_rows(rows, logits, presence, counts, penalties, knobs, events, masks)
        alive = [i for i, row in enumerate(rows) if not row.done]
        if not alive:
            return
        keep = torch.tensor(alive, dtype=torch.long)
        picked = [origin[i] for i in alive]
        if picked != list(range(len(joiners))):  # else every prompt's one row joins, in order
            state = self.runner.select(state, picked)
        new_rows = [rows[i] for i in alive]
        new_last = tokens.index_select(0, keep)
        new_presence = presence.index_select(0, keep) if presence is not None else None
        new_counts = counts.index_select(0, keep) if counts is not None else None
        self._merge(state, new_rows, new_last, new_presence, new_counts)

    def _merge(
        self,
        state: Any,
        rows: list[_Sequence],
        last: torch.Tensor,
        presence: torch.Tensor | None,
        counts: torch.Tensor | None,
    ) -> None:
        batch = self._batch
        if not batch.rows:
            batch.state, batch.rows, batch.last, batch.presence = state, rows, last, presence
            batch.counts = counts
        else:
            batch.state = self.runner.merge(batch.state, state)
            if batch.presence is not None or presence is not None:
                mine = batch.presence if batch.presence is not None else self._presence_of(batch.rows)
                theirs = presence if presence is not None else self._presence_of(rows)
                batch.presence = torch.cat([mine, theirs])
            if batch.counts is not None or counts is not None:
                mine_counts = batch.counts if batch.counts is not None else self._counts_of(batch.rows)
                theirs_counts = counts if counts is not None else self._counts_of(rows)
                batch.counts = torch.cat([mine_counts, theirs_counts])
            batch.rows = batch.rows + rows
            batch.last = torch.cat([batch.last, last])
        batch.knobs = BatchKnobs(
            [_row_knobs(r.request.params) for r in batch.rows], [r.generator for r in batch.rows]
        )
        batch.constrained = _constrained(batch.rows)
        # Recomputed at a join only (steps update them in place): each row's own knobs.
        batch.penalties = penalties_of(batch.counts, batch.knobs) if batch.counts is not None else None

    def _prompt_logprobs(self, prompt: list[int], top: int) -> list[PromptToken]:
        """Each prompt token's logprob under the model's own distribution given the tokens before
        it (no temperature or penalty, as vLLM's prompt logprobs), and `top` alternatives. Computed
        apart from the batch and the prefix cache, so a cached prefix cannot leave positions out."""
        result = [PromptToken(prompt[0], None, [])]
        if len(prompt) < 2:
            return result
        at = 1
        for chunk in position_logits(self.runner, prompt[:-1]):
            logprobs = chunk.float()
            logprobs -= logprobs.logsumexp(dim=-1, keepdim=True)  # in place: a chunk may be large
            following = prompt[at : at + len(logprobs)]
            chosen = logprobs.gather(1, torch.tensor(following, dtype=torch.long)[:, None]).squeeze(1)
            alternatives: list[list[tuple[int, float]]] = [[] for _ in following]
            if top:
                values, ids = logprobs.topk(top, dim=-1)
                alternatives = [
                    list(zip(row_ids, row_values, strict=True))
                    for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
                ]
            result.extend(
                PromptToken(token, value, alt)
                for token, value, alt in zip(following, chosen.tolist(), alternatives, strict=True)
            )
            at += len(logprobs)
        return result

    def _presence_of(self, rows: list[_Sequence]) -> torch.Tensor:
        """Seen-token masks (prompt and generated ids) for repetition penalties."""
        presence = torch.zeros((len(rows), self.vocab_size), dtype=torch.bool)
        for i, row in enumerate(rows):
            presence[i, torch.tensor(row.request.prompt_ids, dtype=torch.long)] = True
            seen = row.token_ids
            if seen:
                presence[i, torch.tensor(seen, dtype=torch.long)] = True
        return presence

    def _counts_of(self, rows: list[_Sequence]) -> torch.Tensor:
        """How often each row has generated each token so far (the prompt does not count)."""
        counts = torch.zeros((len(rows), self.vocab_size), dtype=torch.float32)
        for i, row in enumerate(rows):
            if row.token_ids:
                seen = torch.tensor(row.token_ids, dtype=torch.long)
                counts[i].scatter_add_(0, seen, torch.ones(len(seen), dtype=torch.float32))
        return counts

    @torch.inference_mode()
    def _beam_search(self, request: Request) -> list[tuple[Request, TokenEvent]]:
        params = request.params
        settings = BeamSettings(
            num_beams=params.num_beams,
            num_return_sequences=params.num_return_sequences,
            max_new_tokens=params.max_new_tokens,
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            pad_token_id=self.pad_id,
        )
        events: list[tuple[Request, TokenEvent]] = []
        for index, row in enumerate(self.runner.beam_search(request.prompt_ids, settings)):
            sequence = _Sequence(request, index, self.tokenizer, self.special_ids)
            request.sequences.append(sequence)
            for token in row:
                if token == self.pad_id and token not in self.eos_ids:
                    break
                events.append((request, sequence.accept(token, 0.0, self.eos_ids)))
                if sequence.finish_reason is not None:
                    break
            if sequence.finish_reason is None:
                # The beam stopped at EOS; the pad after it was trimmed above.
                sequence.finish_reason = "eos"
                events.append(
                    (request, TokenEvent(index, self.pad_id, sequence.stop.flush(), 0.0, True, "eos"))
                )
        return events

    # ----- load report -----

    def load(self) -> EngineLoad:
        """The figures a WatchLoad report carries: rows in the batch, requests waiting, the batch's
        rows, and the tokens of the token budget (prompt plus max_new_tokens) not yet reserved."""
        return EngineLoad(
            # Rows taken from the queue and not finished: current between steps, where the batch's
            # own count lags by a step.
            running=self._rows_taken,
            waiting=len(self._waiting),
            capacity=self.limits.max_running_sequences,
            free_kv_tokens=max(0, self.limits.max_total_tokens - self._reserved_tokens),
        )


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is (see `Engine.load`)."""

    running: int
    waiting: int
    capacity: int
    free_kv_tokens: int
