"""gRPC servicers: protobuf in, an engine call, protobuf out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from inference.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
)

from services.common.machine import device_info, memory_info
from services.generator import errors, tasks
from services.generator.engine import (
    Engine,
    FinishReason,
    GenerationResult,
    InvalidRequest,
    SamplingParams,
)

FINISH = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos": common_pb2.FINISH_REASON_EOS_TOKEN,
    "stop": common_pb2.FINISH_REASON_STOP_SEQUENCE,
}
ROLES = {"system", "user", "assistant"}
_KNOBS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "do_sample",
    "num_return_sequences",
    "num_beams",
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

    def count_failure(self) -> None:
        """Counts a failed request in the engine's totals (for GetStats) once there is an engine."""
        if self.engine is not None:
            self.engine.stats.requests_failed += 1


def _has(message: Message, name: str) -> bool:
    fields = message.DESCRIPTOR.fields_by_name
    return name in fields and message.HasField(name)


def _stop_sequences(message: Message) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    if not _has(message, "stop"):
        return (), []
    value: struct_pb2.Value = message.stop  # type: ignore[attr-defined]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return ((value.string_value,) if value.string_value else ()), []
    if kind == "null_value" or kind is None:
        return (), []
    if kind == "list_value" and all(v.WhichOneof("kind") == "string_value" for v in value.list_value.values):
        return tuple(v.string_value for v in value.list_value.values), []
    return (), [("stop", "must be a string or a list of strings")]


def sampling_params(message: Message, default_max_new_tokens: int) -> SamplingParams:
    """The request's knobs with the server's defaults; raises InvalidRequest for unreadable ones."""
    stop, bad = _stop_sequences(message)
    if bad:
        raise InvalidRequest(bad)

    def get(name: str, default: Any) -> Any:
        return getattr(message, name) if _has(message, name) else default

    temperature = float(get("temperature", 1.0))
    if _has(message, "do_sample"):
        do_sample = bool(message.do_sample)  # type: ignore[attr-defined]
    else:
        do_sample = any(_has(message, name) for name in ("temperature", "top_p", "top_k"))
    if temperature == 0.0:
        do_sample, temperature = False, 1.0
    seed = int(message.seed) if _has(message, "seed") else None  # type: ignore[attr-defined]
    return SamplingParams(
        max_new_tokens=int(get("max_new_tokens", default_max_new_tokens)),
        do_sample=do_sample,
        temperature=temperature,
        top_k=int(get("top_k", 0)),
        top_p=float(get("top_p", 1.0)),
        repetition_penalty=float(get("repetition_penalty", 1.0)),
        seed=seed,
        stop=stop,
        num_return_sequences=int(get("num_return_sequences", 1)),
        num_beams=int(get("num_beams", 1)),
    )


def _usage(prompt: int, completion: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, info: ServedInfo, default_max_new_tokens: int) -> None:
        self._info = info
        self._default_max_new_tokens = default_max_new_tokens

    # ----- shared plumbing -----

    def _engine(self) -> Engine:
        if self._info.engine is None:
            raise errors.unavailable("the model is still loading")
        return self._info.engine

    def _check_model(self, name: str) -> None:
        engine = self._engine()
        if name and name not in (engine.model_id, self._info.source):
            raise errors.model_not_found(name, engine.model_id)

    def _prompt_ids(self, message: Message) -> list[int]:
        engine = self._engine()
        prompt: str = getattr(message, "prompt", "")
        chat = list(getattr(message, "messages", []))
        if prompt and chat:
            raise errors.invalid_argument([("prompt", "set either prompt or messages, not both")])
        if chat:
            return engine.encode_chat(self._conversation(chat))
        if not prompt:
            raise errors.invalid_argument([("prompt", "must not be empty (or give messages)")])
        return engine.encode_prompt(prompt)

    @staticmethod
    def _conversation(chat: list[common_pb2.ChatMessage]) -> list[tuple[str, str]]:
        bad = [
            (f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}")
            for i, m in enumerate(chat)
            if m.role not in ROLES
        ]
        if bad:
            raise errors.invalid_argument(bad)
        return [(m.role, m.content) for m in chat]

    async def _generate(self, message: Message, prompt_ids: list[int] | None = None) -> GenerationResult:
        self._check_model(getattr(message, "model", ""))
        ids = prompt_ids if prompt_ids is not None else self._prompt_ids(message)
        params = sampling_params(message, self._default_max_new_tokens)
        return await self._engine().generate(ids, params)

    def _chat_ids(self, system: str, user: str) -> list[int]:
        return self._engine().encode_chat([("system", system), ("user", user)])

    # ----- RPCs -----

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        result = await self._generate(request)
        first = result.sequences[0]
        return generation_pb2.GenerateResponse(
            request_id=result.request_id,
            generated_text=first.text,
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            tokens_per_second=_rate(result.completion_tokens, result.generation_time),
            finish_reason=FINISH[first.finish_reason],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            sequences=[
                common_pb2.GeneratedSequence(
                    index=s.index,
                    text=s.text,
                    tokens_generated=s.tokens_generated,
                    finish_reason=FINISH[s.finish_reason],
                )
                for s in result.sequences
            ],
            model=self._engine().model_id,
        )

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        self._check_model(request.model)
        ids = self._prompt_ids(request)
        params = sampling_params(request, self._default_max_new_tokens)
        handle = self._engine().submit(ids, params)
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
                    token=common_pb2.Token(
                        id=event.token_id, text=event.text, logprob=event.logprob, special=event.special
                    ),
                )
                if event.finish_reason is not None:
                    finished += 1
                    elapsed = time.monotonic() - handle.admitted_at
                    reply.finish_reason = FINISH[event.finish_reason]
                    reply.generated_text = "".join(texts[event.index])
                    reply.tokens_generated = counts[event.index]
                    reply.generation_time = elapsed
                    reply.tokens_per_second = _rate(counts[event.index], elapsed)
                    if finished == params.num_return_sequences:
                        reply.usage.CopyFrom(_usage(len(ids), sum(counts.values())))
                yield reply
        finally:
            # A cancelled or failed stream leaves the batch at the next step.
            handle.cancel()

    async def Chat(
        self, request: generation_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.ChatResponse:
        if not request.messages:
            raise errors.invalid_argument([("messages", "must hold at least one message")])
        result = await self._generate(request)
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
        )

    async def SolveMath(
        self, request: generation_pb2.SolveMathRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.SolveMathResponse:
        if not request.problem.strip():
            raise errors.invalid_argument([("problem", "must not be empty")])
        self._check_model(request.model)
        ids = self._chat_ids(tasks.MATH_SYSTEM, request.problem)
        result = await self._generate(request, ids)
        first = result.sequences[0]
        return generation_pb2.SolveMathResponse(
            request_id=result.request_id,
            solution=first.text,
            answer=tasks.extract_answer(first.text),
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            finish_reason=_finish(first.finish_reason),
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self._engine().model_id,
        )

    async def SolveCoding(
        self, request: generation_pb2.SolveCodingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.SolveCodingResponse:
        if not request.problem.strip():
            raise errors.invalid_argument([("problem", "must not be empty")])
        self._check_model(request.model)
        language = request.language.strip() or "python"
        ids = self._chat_ids(tasks.coding_system(language), request.problem)
        result = await self._generate(request, ids)
        first = result.sequences[0]
        return generation_pb2.SolveCodingResponse(
            request_id=result.request_id,
            solution=first.text,
            code=tasks.extract_code(first.text),
            language=language,
            tokens_generated=first.tokens_generated,
            generation_time=result.generation_time,
            finish_reason=_finish(first.finish_reason),
            usage=_usage(result.prompt_tokens, result.completion_tokens),
            model=self._engine().model_id,
        )


def _finish(reason: FinishReason) -> common_pb2.FinishReason.ValueType:
    return FINISH[reason]


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
        engine = self._info.engine
        if engine is not None:
            stats = engine.stats
            component.requests_total = stats.requests_total
            component.requests_failed = stats.requests_failed
            component.requests_running = stats.running
            component.requests_waiting = stats.waiting
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
