"""PredictionService over gRPC: checks each request, then calls the store, the runner and the
change notifier (services/predictions/{store,runner,notify}.py), protobuf in and out."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import grpc
import grpc.aio
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2
from inference.v1 import (
    common_pb2,
    generation_pb2,
    predictions_pb2,
    predictions_pb2_grpc,
)

from services.common import sampling, sse
from services.common.auth import ApiKey, current_claims, current_key
from services.common.errors import RpcFailure, error_info
from services.common.interceptors import Context
from services.predictions import convert, metrics, tasks
from services.predictions.errors import (
    ERROR_DOMAIN,
    MAPPING,
    already_exists,
    invalid_argument,
    not_found,
    permission_denied,
    prediction_restarted,
)
from services.predictions.models import (  # GatewayModels: server.py imports it from here.
    GatewayModels as GatewayModels,
)
from services.predictions.models import ModelDirectory
from services.predictions.prefer import prefer_wait
from services.predictions.records import (
    EVENTS,
    STATUSES,
    TASKS,
    TERMINAL,
    Deployment,
    DeploymentExists,
    Event,
    NewPrediction,
    Prediction,
    QueueFull,
    Store,
    Task,
)
from services.predictions.stream import TextDiverged, TextFollower, final_message, partial_text, text_delta

# The metadata a prediction forwards to the gateway when it runs.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
DEPLOYMENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_SERVICE = "/inference.v1.PredictionService/"
# The scope each method needs ("" = any valid key). Creating also needs the task's own scope
# (generate or embed), which the servicer checks once it knows the task.
METHOD_SCOPES: dict[str, str] = {
    **{
        _SERVICE + m.name: ""
        for m in predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"].methods
    },
    _SERVICE + "CreateDeployment": "admin",
    _SERVICE + "UpdateDeployment": "admin",
    _SERVICE + "DeleteDeployment": "admin",
    _SERVICE + "GetWebhookSecret": "admin",
}


class RunnerControl(Protocol):
    """What the servicer asks of the runner."""

    def wake(self) -> None: ...

    def cancel_local(self, prediction_id: str) -> bool: ...


class ChangeWaiter(Protocol):
    async def wait(self, prediction_id: str, timeout: float) -> bool: ...  # noqa: ASYNC109


WebhookCheck = Callable[[str, bool], Awaitable[str | None]]


def new_id() -> str:
    """A Replicate-like id: 26 lower-case base32 characters (128 random bits)."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def credentials(context: Context) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in context.invocation_metadata() or ():
        if name in CREDENTIAL_HEADERS and isinstance(value, str):
            found[name] = value
    # A JWT caller's verified claims (Envoy has dropped the token itself): its runs carry them.
    claims = current_claims.get()
    if claims is not None:
        found[claims[0]] = claims[1]
    return found


def input_size(input: dict[str, Any]) -> int:
    return len(json.dumps(input, ensure_ascii=False).encode())


def visible_owner(key: ApiKey) -> str | None:
    """The owner whose predictions `key` sees; None (all) for an admin key."""
    return None if "admin" in key.scopes else key.name


def task_scope(task: Task) -> str:
    return "embed" if task == "embed" else "generate"


def deployment_violations(
    prefix: str, name: str | None, model: str | None, task: str | None, schema: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """The problems of a deployment's fields (None: not being set), named `prefix` + field."""
    violations: list[tuple[str, str]] = []
    if name is not None and not DEPLOYMENT_NAME.fullmatch(name):
        violations.append(
            (
                f"{prefix}name",
                "must be 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or a digit",
            )
        )
    if model is not None and not model.strip():
        violations.append((f"{prefix}model", "must name a served model"))
    if task is not None and task not in TASKS:
        violations.append((f"{prefix}task", f"must be one of {', '.join(TASKS)}, got {task!r}"))
    if schema is not None:
        problem = tasks.schema_problem(schema)
        if problem:
            violations.append((f"{prefix}input_schema", problem))
    return violations


def refuse_non_finite(structs: dict[str, struct_pb2.Struct]) -> None:
    """Refuses NaN and infinities (a gRPC client can send them) by path, before json_format,
    which cannot print them, turns the JSON fields into dicts."""
    bad = [path for name, struct in structs.items() for path in sampling.non_finite(struct, name)]
    if bad:
        raise invalid_argument([(path, sampling.NON_FINITE) for path in bad])


def prediction_failed(prediction: Prediction) -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.UNKNOWN,
        f"prediction {prediction.id} failed: {prediction.error or 'no reason given'}",
        (error_info("PREDICTION_FAILED", ERROR_DOMAIN, id=prediction.id),),
    )


class PredictionServicer(predictions_pb2_grpc.PredictionServiceServicer):
    def __init__(
        self,
        store: Store,
        runner: RunnerControl,
        changes: ChangeWaiter,
        models: ModelDirectory,
        webhook_check: WebhookCheck,
        *,
        public_url: str,
        webhook_secret: str,
        allow_private_webhooks: bool = False,
        max_input_bytes: int = 1 << 20,
        max_wait_seconds: int = 60,
        max_waiting_per_key: int = 100,
        max_waiting_total: int = 1000,
        poll_seconds: float = 0.5,
    ) -> None:
        self._store = store
        self._runner = runner
        self._changes = changes
        self._models = models
        self._webhook_check = webhook_check
        self._public_url = public_url.rstrip("/")
        self._secret = webhook_secret
        self._allow_private = allow_private_webhooks
        self._max_input_bytes = max_input_bytes
        self._max_wait = max_wait_seconds
        self._max_per_key = max_waiting_per_key
        self._max_total = max_waiting_total
        self._poll = poll_seconds

    def _proto(self, prediction: Prediction) -> predictions_pb2.Prediction:
        return convert.prediction_to_proto(prediction, self._public_url)

    async def _request_violations(
        self, request: predictions_pb2.CreatePredictionRequest
    ) -> list[tuple[str, str]]:
        violations: list[tuple[str, str]] = []
        if not request.model.strip():
            violations.append(("model", "must name a deployment or a served model"))
        size = input_size(convert.struct_to_dict(request.input))
        if size > self._max_input_bytes:
            violations.append(("input", f"is {size} bytes of JSON; the limit is {self._max_input_bytes}"))
        if request.webhook:
            problem = await self._webhook_check(request.webhook, self._allow_private)
            if problem:
                violations.append(("webhook", problem))
        for index, event in enumerate(request.webhook_events_filter):
            if event not in EVENTS:
                violations.append(
                    (f"webhook_events_filter[{index}]", f"must be one of {', '.join(EVENTS)}, got {event!r}")
                )
        return violations

    async def _target(
        self, request: predictions_pb2.CreatePredictionRequest, input: dict[str, Any], context: Context
    ) -> tuple[Task, str, str, dict[str, Any], dict[str, Any] | None]:
        """(task, served model id, version, defaults, input schema) for the requested model."""
        deployment = await self._store.get_deployment(request.model)
        if deployment is not None:
            if request.version and request.version != deployment.version:
                raise invalid_argument(
                    [
                        (
                            "version",
                            f"deployment {deployment.name!r} is at version {deployment.version!r}, "
                            f"not {request.version!r}",
                        )
                    ]
                )
            return (
                deployment.task,
                deployment.model,
                deployment.version,
                deployment.defaults,
                deployment.input_schema,
            )
        served = await self._models.served(tuple(credentials(context).items()))
        entry = served.get(request.model)
        if entry is None:
            known = sorted({model.id for model in served.values()})
            names = sorted(d.name for d in await self._store.list_deployments())
            raise not_found(
                "model",
                request.model,
                [*known, *(f"deployment {name}" for name in names)],
            )
        if request.version:
            raise invalid_argument(
                [("version", f"{request.model!r} is a served model, which has no version")]
            )
        task = tasks.infer_task(input, entry.embedding)
        if task is None:
            raise invalid_argument(
                [
                    (
                        "input",
                        "cannot tell the task: send 'messages' (chat), 'problem' (math; with 'language': "
                        "coding) or 'prompt' (generation), or name an embedding model or a deployment",
                    )
                ]
            )
        return task, entry.id, "", {}, None

    async def CreatePrediction(
        self, request: predictions_pb2.CreatePredictionRequest, context: Context
    ) -> predictions_pb2.Prediction:
        wait = prefer_wait(context.invocation_metadata() or (), self._max_wait)
        refuse_non_finite({"input": request.input})
        violations = await self._request_violations(request)
        if violations:
            raise invalid_argument(violations)
        input = convert.struct_to_dict(request.input)
        task, served_model, version, defaults, schema = await self._target(request, input, context)
        effective = tasks.merge_defaults(defaults, input) if defaults else input
        problems = tasks.input_violations(task, effective, schema)
        if problems:
            raise invalid_argument(problems)
        key = current_key.get()
        scope = task_scope(task)
        if scope not in key.scopes:
            raise permission_denied(
                f"API key {key.name!r} lacks the {scope!r} scope a {task} prediction needs", scope
            )
        # Order kept, duplicates dropped; none given means every event.
        chosen: tuple[Event, ...] = (
            tuple(e for e in EVENTS if e in set(request.webhook_events_filter)) or EVENTS
        )
        new = NewPrediction(
            id=new_id(),
            owner=key.name,
            model=request.model,
            version=version,
            task=task,
            served_model=served_model,
            input=input,
            effective_input=effective,
            webhook=request.webhook,
            webhook_events_filter=chosen if request.webhook else (),
            credentials=credentials(context),
            created_at=datetime.now(UTC),
        )
        try:
            prediction = await self._store.create(new, self._max_per_key, self._max_total)
        except QueueFull as error:
            metrics.QUEUE_FULL.labels(error.scope).inc()
            raise
        metrics.CREATED.labels(task).inc()
        self._runner.wake()
        if wait is not None:
            prediction = await self._wait(prediction, wait)
        return self._proto(prediction)

    async def _wait(self, prediction: Prediction, seconds: float) -> Prediction:
        """The prediction once it ended, or as it is after `seconds`; another replica may run it,
        so the store is re-read at least every poll interval."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while prediction.status not in TERMINAL:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self._changes.wait(prediction.id, min(remaining, self._poll))
            fresh = await self._store.get(prediction.id)
            if fresh is None:
                break
            prediction = fresh
        return prediction

    async def _owned(self, prediction_id: str) -> Prediction:
        prediction = await self._store.get(prediction_id, visible_owner(current_key.get()))
        if prediction is None:
            raise not_found("prediction", prediction_id)
        return prediction

    async def GetPrediction(
        self, request: predictions_pb2.GetPredictionRequest, context: Context
    ) -> predictions_pb2.Prediction:
        return self._proto(await self._owned(request.id))

    async def CancelPrediction(
        self, request: predictions_pb2.CancelPredictionRequest, context: Context
    ) -> predictions_pb2.Prediction:
        prediction = await self._store.cancel(request.id, visible_owner(current_key.get()))
        if prediction is None:
            raise not_found("prediction", request.id)
        if prediction.status not in TERMINAL:
            # Running here: stop it now; running elsewhere: its worker sees cancel_requested.
            self._runner.cancel_local(prediction.id)
        return self._proto(prediction)

    def _page_url(self, cursor: str | None, status: str, page_size: int) -> str:
        if cursor is None:
            return ""
        query: dict[str, str] = {"cursor": cursor}
        if status:
            query["status"] = status
        if page_size:
            query["page_size"] = str(page_size)
        return f"{self._public_url}/v1/predictions?{urlencode(query)}"

    async def ListPredictions(
        self, request: predictions_pb2.ListPredictionsRequest, context: Context
    ) -> predictions_pb2.ListPredictionsResponse:
        violations: list[tuple[str, str]] = []
        if request.status and request.status not in STATUSES:
            violations.append(("status", f"must be one of {', '.join(STATUSES)}, got {request.status!r}"))
        # uint32 without presence: 0 is "not given" (the default), anything else must be in range.
        if request.page_size and not 1 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(
                (
                    "page_size",
                    f"must be from 1 to {MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE}), "
                    f"got {request.page_size}",
                )
            )
        if violations:
            raise invalid_argument(violations)
        try:
            page = await self._store.list_predictions(
                visible_owner(current_key.get()),
                request.status or None,
                request.cursor or None,
                request.page_size or DEFAULT_PAGE_SIZE,
            )
        except ValueError:
            raise invalid_argument(
                [("cursor", "is not a cursor of this API (use a page's next or previous)")]
            ) from None
        return predictions_pb2.ListPredictionsResponse(
            next=self._page_url(page.next_cursor, request.status, request.page_size),
            previous=self._page_url(page.previous_cursor, request.status, request.page_size),
            results=[self._proto(p) for p in page.results],
        )

    async def StreamPrediction(
        self, request: predictions_pb2.StreamPredictionRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        """One message per new piece of text while the prediction runs, then the final message
        (finish reason, whole text, usage). A failed prediction fails the call (UNKNOWN, with its
        error); a canceled one ends with FINISH_REASON_UNSPECIFIED (the model did not finish) and
        the text produced until then."""
        prediction = await self._owned(request.id)
        follower = TextFollower()
        try:
            while True:
                piece = follower.delta(partial_text(prediction))
                if piece:
                    yield text_delta(prediction.id, piece)
                if prediction.status in TERMINAL:
                    break
                await self._changes.wait(prediction.id, self._poll)
                fresh = await self._store.get(prediction.id)
                if fresh is None:
                    # Purged while watched: it ended long ago.
                    raise not_found("prediction", request.id)
                prediction = fresh
            if prediction.status == "failed":
                raise prediction_failed(prediction)
            if prediction.status == "canceled":
                yield generation_pb2.GenerateStreamResponse(
                    request_id=prediction.id,
                    finish_reason=common_pb2.FINISH_REASON_UNSPECIFIED,
                    generated_text=follower.sent,
                )
                return
            final = final_message(prediction)
            piece = follower.delta(final.generated_text)
            if piece:
                yield text_delta(prediction.id, piece)
            if follower.sent != final.generated_text:
                raise TextDiverged
            yield final
        except TextDiverged:
            raise prediction_restarted(prediction.id, prediction.attempt) from None

    async def StreamPredictionEvents(
        self, request: predictions_pb2.StreamPredictionRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in sse.native_sse(self.StreamPrediction(request, context), MAPPING.failure_of):
            yield event

    async def CreateDeployment(
        self, request: predictions_pb2.CreateDeploymentRequest, context: Context
    ) -> predictions_pb2.Deployment:
        given = request.deployment
        refuse_non_finite(
            {"deployment.defaults": given.defaults, "deployment.input_schema": given.input_schema}
        )
        schema = convert.struct_to_dict(given.input_schema) if given.HasField("input_schema") else None
        violations = deployment_violations("deployment.", given.name, given.model, given.task, schema)
        if violations:
            raise invalid_argument(violations)
        now = datetime.now(UTC)
        deployment = Deployment(
            name=given.name,
            model=given.model,
            task=given.task,  # type: ignore[arg-type]  # checked against TASKS above
            version=given.version or "1",
            defaults=convert.struct_to_dict(given.defaults),
            input_schema=schema,
            description=given.description,
            created_at=now,
            updated_at=now,
        )
        try:
            created = await self._store.create_deployment(deployment)
        except DeploymentExists:
            raise already_exists(given.name) from None
        return convert.deployment_to_proto(created)

    async def GetDeployment(
        self, request: predictions_pb2.GetDeploymentRequest, context: Context
    ) -> predictions_pb2.Deployment:
        deployment = await self._store.get_deployment(request.name)
        if deployment is None:
            raise not_found("deployment", request.name)
        return convert.deployment_to_proto(deployment)

    async def ListDeployments(
        self, request: predictions_pb2.ListDeploymentsRequest, context: Context
    ) -> predictions_pb2.ListDeploymentsResponse:
        deployments = await self._store.list_deployments()
        return predictions_pb2.ListDeploymentsResponse(
            results=[convert.deployment_to_proto(d) for d in deployments]
        )

    async def UpdateDeployment(
        self, request: predictions_pb2.UpdateDeploymentRequest, context: Context
    ) -> predictions_pb2.Deployment:
        refuse_non_finite({"defaults": request.defaults, "input_schema": request.input_schema})
        changes: dict[str, Any] = {}
        for name in ("model", "task", "version", "description"):
            if request.HasField(name):
                changes[name] = getattr(request, name)
        if "version" in changes and not changes["version"]:
            changes["version"] = "1"
        if request.HasField("defaults"):
            changes["defaults"] = convert.struct_to_dict(request.defaults)
        if request.HasField("input_schema"):
            changes["input_schema"] = convert.struct_to_dict(request.input_schema)
        violations = deployment_violations(
            "", None, changes.get("model"), changes.get("task"), changes.get("input_schema")
        )
        if violations:
            raise invalid_argument(violations)
        deployment = await self._store.update_deployment(request.name, changes)
        if deployment is None:
            raise not_found("deployment", request.name)
        return convert.deployment_to_proto(deployment)

    async def DeleteDeployment(
        self, request: predictions_pb2.DeleteDeploymentRequest, context: Context
    ) -> predictions_pb2.DeleteDeploymentResponse:
        if not await self._store.delete_deployment(request.name):
            raise not_found("deployment", request.name)
        return predictions_pb2.DeleteDeploymentResponse()

    async def GetWebhookSecret(
        self, request: predictions_pb2.GetWebhookSecretRequest, context: Context
    ) -> predictions_pb2.WebhookSecret:
        return predictions_pb2.WebhookSecret(key=self._secret)
