"""gRPC servicers: protobuf in, an engine call, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format
from google.protobuf.message import Message
from inference.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from services.common import sampling, sse
from services.common.load_reports import load_reports
from services.common.machine import device_info, memory_info
from services.common.sampling import SamplingParams
from services.generator import tasks
from services.generator.engine import (
    Engine,
    GenerationResult,
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    PromptToken,
    TokenEvent,
)
from services.generator.errors import MAPPING
from services.generator.metrics import RequestTally

FINISH = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos": common_pb2.FINISH_REASON_EOS_TOKEN,
    "stop": common_pb2.FINISH_REASON_STOP_SEQUENCE,
    "constraint": common_pb2.FINISH_REASON_CONSTRAINT_COMPLETE,
}
ROLES = {"system", "user", "assistant", "tool"}
GenerationRequest = (
    generation_pb2.GenerateRequest
    | generation_pb2.ChatRequest
    | generation_pb2.SolveMathRequest
    | generation_pb2.SolveCodingRequest
)


@dataclass
class ServedInfo:
    """What this process serves, for InfoService (filled in once the model is loaded)."""

    address: str
    engine: Engine | None = None
    source: str = ""
    dtype: str = ""
    device: str = ""
    message: str = "loading the model"
    started_at: float = 0.0
    # Every generation call received (while loading too), and those refused before admission.
    tally: RequestTally = field(default_factory=RequestTally)


def sampling_params(parameters: common_pb2.SamplingParameters, default_max_new_tokens: int) -> SamplingParams:
    """The request's knobs with the server's defaults; raises InvalidRequest for unreadable stop
    items and contradicting aliases (the engine checks the ranges when the request is submitted)."""
    unreadable = sampling.wire_violations(parameters)
    if unreadable:
        raise InvalidRequest(unreadable)
    return sampling.from_proto(parameters, default_max_new_tokens)


def _usage(prompt: int, completion: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _alternatives(engine: Engine, top: list[tuple[int, float]]) -> list[common_pb2.TopLogprob]:
    result = []
    for token_id, logprob in top:
        text, raw = engine.pieces(token_id)
        result.append(common_pb2.TopLogprob(id=token_id, text=text, logprob=logprob, bytes=raw))
    return result


def token_message(engine: Engine, event: TokenEvent, detail: bool) -> common_pb2.Token:
    """A generated token; with `detail` (the request asked for logprobs) its piece, bytes and
    alternatives too."""
    token = common_pb2.Token(id=event.token_id, text=event.text, logprob=event.logprob, special=event.special)
    if detail:
        token.piece, token.piece_bytes = engine.pieces(event.token_id)
        token.top_logprobs.extend(_alternatives(engine, event.top))
    return token


def prompt_token_messages(engine: Engine, prompt: list[PromptToken] | None) -> list[common_pb2.Token]:
    """The prompt's tokens with their logprobs; the first has none (0, no alternatives)."""
    result = []
    for item in prompt or []:
        text, raw = engine.pieces(item.token_id)
        result.append(
            common_pb2.Token(
                id=item.token_id,
                text=text,
                logprob=item.logprob or 0.0,
                special=item.token_id in engine.special_ids,
                top_logprobs=_alternatives(engine, item.top),
                piece=text,
                piece_bytes=raw,
            )
        )
    return result


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, info: ServedInfo, default_max_new_tokens: int) -> None:
        self._info = info
        self._default_max_new_tokens = default_max_new_tokens

    # ----- shared plumbing -----

    def _engine(self) -> Engine:
        if self._info.engine is None:
            raise ModelLoading("the model is still loading")
        return self._info.engine

    def _check_model(self, name: str) -> None:
        engine = self._engine()
        if name and name not in (engine.model_id, self._info.source):
            raise ModelNotFound(name, engine.model_id)

    def _prompt_ids(self, message: Message) -> list[int]:
        engine = self._engine()
        prompt: str = getattr(message, "prompt", "")
        chat = list(getattr(message, "messages", []))
        if prompt and chat:
            raise InvalidRequest([("prompt", "set either prompt or messages, not both")])
        if chat:
            tools = [json_format.MessageToDict(t) for t in getattr(message, "tools", [])]
            return engine.encode_chat(self._conversation(chat), tools)
        if not prompt:
            raise InvalidRequest([("prompt", "must not be empty (or give messages)")])
        return engine.encode_prompt(prompt)

    @staticmethod
    def _conversation(chat: list[common_pb2.ChatMessage]) -> list[tuple[str, str]]:
        bad = [
            (f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}")
            for i, m in enumerate(chat)
            if m.role not in ROLES
        ]
        if bad:
            raise InvalidRequest(bad)
        return [(m.role, m.content) for m in chat]

    async def _generate(
        self, message: GenerationRequest, prompt_ids: list[int] | None = None
    ) -> GenerationResult:
        self._check_model(message.model)
        ids = prompt_ids if prompt_ids is not None else self._prompt_ids(message)
        params = sampling_params(message.parameters, self._default_max_new_tokens)
        return await self._engine().generate(ids, params)

    def _chat_ids(self, system: str, user: str) -> list[int]:
        return self._engine().encode_chat([("system", system), ("user", user)])

    def _chat_prompt(self, request: generation_pb2.ChatRequest) -> list[int]:
        if not request.messages:
            raise InvalidRequest([("messages", "must hold at least one message")])
        self._check_model(request.model)
        return self._prompt_ids(request)

    def _math_prompt(self, request: generation_pb2.SolveMathRequest) -> list[int]:
        if not request.problem.strip():
            raise InvalidRequest([("problem", "must not be empty")])
        self._check_model(request.model)
        return self._chat_ids(tasks.MATH_SYSTEM, request.problem)

    def _coding_prompt(self, request: generation_pb2.SolveCodingRequest) -> tuple[list[int], str]:
        """The prompt's ids and the language ("python" when none is given)."""
        if not request.problem.strip():
            raise InvalidRequest([("problem", "must not be empty")])
        self._check_model(request.model)
        language = request.language.strip() or "python"
        return self._chat_ids(tasks.coding_system(language), request.problem), language

    # ----- RPCs -----

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        result = await self._generate(request)
        first = result.sequences[0]
        engine = self._engine()
        sequences = [
            common_pb2.GeneratedSequence(
                index=s.index,
                text=s.text,
                tokens_generated=s.tokens_generated,
                finish_reason=FINISH[s.finish_reason],
                tokens=[token_message(engine, event, True) for event in s.tokens],
            )
            for s in result.sequences
        ]
        return generation_pb2.GenerateResponse(
            request_id=result.request_id,
            generated_text=first.text,
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            tokens_per_second=_rate(result.completion_tokens, result.generation_time),
            finish_reason=FINISH[first.finish_reason],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            sequences=sequences,
            model=engine.model_id,
            prompt_tokens=prompt_token_messages(engine, result.prompt_logprobs),
            tokens=sequences[0].tokens,
        )

    async def _stream(
        self,
        message: GenerationRequest | generation_pb2.GenerateStreamRequest,
        ids: list[int],
        finish: Callable[[generation_pb2.GenerateStreamResponse], None] | None = None,
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        """One message per token; the last of each sequence gets its summary (and `finish`'s
        additions), the last of the stream the usage."""
        params = sampling_params(message.parameters, self._default_max_new_tokens)
        engine = self._engine()
        # Compiled before the request queues: a refused grammar is an error before any token.
        handle = engine.submit(ids, params, await engine.compile_constraint(params))
        try:
            texts: dict[int, list[str]] = {}
            counts: dict[int, int] = {}
            finished = 0
            async for event in handle.events():
                texts.setdefault(event.index, []).append(event.text)
                counts[event.index] = counts.get(event.index, 0) + 1
                reply = generation_pb2.GenerateStreamResponse(
                    request_id=handle.id,
                    index=event.index,
                    token=token_message(engine, event, params.logprobs),
                )
                if handle.prompt_logprobs is not None:
                    # Set before the first event; sent once, on the stream's first message.
                    reply.prompt_tokens.extend(prompt_token_messages(engine, handle.prompt_logprobs))
                    handle.prompt_logprobs = None
                if event.finish_reason is not None:
                    finished += 1
                    elapsed = time.monotonic() - handle.admitted_at
                    reply.finish_reason = FINISH[event.finish_reason]
                    reply.generated_text = "".join(texts[event.index])
                    reply.tokens_generated = counts[event.index]
                    reply.generation_time = elapsed
                    reply.tokens_per_second = _rate(counts[event.index], elapsed)
                    if finish is not None:
                        finish(reply)
                    if finished == params.num_return_sequences:
                        reply.usage.CopyFrom(_usage(len(ids), sum(counts.values())))
                yield reply
        finally:
            # A cancelled or failed stream leaves the batch at the next step.
            handle.cancel()

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        self._check_model(request.model)
        async for reply in self._stream(request, self._prompt_ids(request)):
            yield reply

    async def ChatStream(
        self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for reply in self._stream(request, self._chat_prompt(request)):
            yield reply

    async def SolveMathStream(
        self, request: generation_pb2.SolveMathRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        ids = self._math_prompt(request)

        def answer(reply: generation_pb2.GenerateStreamResponse) -> None:
            reply.answer = tasks.extract_answer(reply.generated_text)

        async for reply in self._stream(request, ids, answer):
            yield reply

    async def SolveCodingStream(
        self, request: generation_pb2.SolveCodingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        ids, language = self._coding_prompt(request)

        def code(reply: generation_pb2.GenerateStreamResponse) -> None:
            reply.code = tasks.extract_code(reply.generated_text)
            reply.language = language

        async for reply in self._stream(request, ids, code):
            yield reply

    async def GenerateStreamEvents(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in sse.native_sse(self.GenerateStream(request, context), MAPPING.failure_of):
            yield event

    async def ChatStreamEvents(
        self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in sse.native_sse(self.ChatStream(request, context), MAPPING.failure_of):
            yield event

    async def SolveMathStreamEvents(
        self, request: generation_pb2.SolveMathRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in sse.native_sse(self.SolveMathStream(request, context), MAPPING.failure_of):
            yield event

    async def SolveCodingStreamEvents(
        self, request: generation_pb2.SolveCodingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in sse.native_sse(self.SolveCodingStream(request, context), MAPPING.failure_of):
            yield event

    async def Chat(
        self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.ChatResponse:
        result = await self._generate(request, self._chat_prompt(request))
        first = result.sequences[0]
        return generation_pb2.ChatResponse(
            request_id=result.request_id,
            message=common_pb2.ChatMessage(role="assistant", content=first.text),
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            tokens_per_second=_rate(first.tokens_generated, result.generation_time),
            finish_reason=FINISH[first.finish_reason],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self._engine().model_id,
            tokens=[token_message(self._engine(), event, True) for event in first.tokens],
        )

    async def SolveMath(
        self, request: generation_pb2.SolveMathRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.SolveMathResponse:
        result = await self._generate(request, self._math_prompt(request))
        first = result.sequences[0]
        return generation_pb2.SolveMathResponse(
            request_id=result.request_id,
            solution=first.text,
            answer=tasks.extract_answer(first.text),
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            finish_reason=FINISH[first.finish_reason],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self._engine().model_id,
        )

    async def SolveCoding(
        self, request: generation_pb2.SolveCodingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.SolveCodingResponse:
        ids, language = self._coding_prompt(request)
        result = await self._generate(request, ids)
        first = result.sequences[0]
        return generation_pb2.SolveCodingResponse(
            request_id=result.request_id,
            solution=first.text,
            code=tasks.extract_code(first.text),
            language=language,
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            finish_reason=FINISH[first.finish_reason],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self._engine().model_id,
        )


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    def __init__(self, info: ServedInfo) -> None:
        self._info = info

    def _uptime(self) -> float:
        return time.monotonic() - self._info.started_at

    async def GetHealth(
        self, request: info_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> info_pb2.GetHealthResponse:
        engine = self._info.engine
        serving = engine is not None and not self._info.message
        status = info_pb2.SERVING_STATUS_SERVING if serving else info_pb2.SERVING_STATUS_NOT_SERVING
        component = info_pb2.ComponentHealth(
            component="generator",
            address=self._info.address,
            status=status,
            device=device_info(self._info.device),
            memory=memory_info(self._info.device),
            models=[engine.model_id] if engine is not None else [],
            uptime_seconds=self._uptime(),
            message=self._info.message,
        )
        return info_pb2.GetHealthResponse(status=status, components=[component])

    async def GetStats(
        self, request: info_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> info_pb2.GetStatsResponse:
        component = info_pb2.ComponentStats(
            component="generator", address=self._info.address, uptime_seconds=self._uptime()
        )
        # Every generation call received; failed: admitted ones that failed (refusals are in
        # generator_requests_rejected_total, not here).
        component.requests_total = self._info.tally.received
        engine = self._info.engine
        if engine is not None:
            stats = engine.stats
            # Live, as WatchLoad reports it: a stream holds its first token before the step that
            # sent it ends, and a prompt being prefilled in chunks is running too.
            load = engine.load()
            component.requests_failed = stats.requests_failed
            component.requests_running = load.running
            component.requests_waiting = load.waiting
            component.prompt_tokens_total = stats.prompt_tokens_total
            component.generated_tokens_total = stats.generated_tokens_total
            component.mean_time_to_first_token_seconds = stats.ttft_sum / max(1, stats.ttft_count)
            component.mean_tokens_per_second = stats.tps_sum / max(1, stats.tps_count)
            component.mean_batch_size = stats.batch_size_sum / max(1, stats.steps)
        return info_pb2.GetStatsResponse(components=[component])

    async def ListServedModels(
        self, request: info_pb2.ListServedModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> info_pb2.ListServedModelsResponse:
        engine = self._info.engine
        if engine is None:
            return info_pb2.ListServedModelsResponse()
        model = info_pb2.ServedModel(
            id=engine.model_id,
            task="generation",
            source=self._info.source,
            dtype=self._info.dtype,
            device=self._info.device,
            max_sequence_length=engine.max_model_len,
            loaded=True,
        )
        return info_pb2.ListServedModelsResponse(models=[model])

    def _load(self) -> info_pb2.WatchLoadResponse:
        engine = self._info.engine
        if engine is None:  # still loading: nothing runs, and no room yet
            return info_pb2.WatchLoadResponse()
        load = engine.load()
        return info_pb2.WatchLoadResponse(
            running=load.running,
            waiting=load.waiting,
            capacity=load.capacity,
            free_kv_tokens=load.free_kv_tokens,
            models=[engine.model_id],
        )

    def _draining(self) -> bool:
        engine = self._info.engine
        return engine is not None and self._info.message != ""

    async def WatchLoad(
        self, request: info_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[info_pb2.WatchLoadResponse]:
        """This replica's load, at once and on every change; ends when the generator drains."""
        async for report in load_reports(request, self._load, self._draining):
            yield report
