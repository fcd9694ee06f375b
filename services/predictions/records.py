"""The predictions service's plain records (protobuf conversion happens in the servicer) and the
store contract the service, the runner and the webhook sender share."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("starting", "processing", "succeeded", "failed", "canceled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

Event = Literal["start", "output", "logs", "completed"]
EVENTS: tuple[Event, ...] = ("start", "output", "logs", "completed")

Task = Literal["generate", "chat", "math", "coding", "embed"]
TASKS: tuple[Task, ...] = ("generate", "chat", "math", "coding", "embed")


@dataclass(frozen=True)
class Deployment:
    name: str
    model: str
    task: Task
    version: str = "1"
    defaults: dict[str, Any] = field(default_factory=dict)
    input_schema: dict[str, Any] | None = None
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class NewPrediction:
    """What the servicer stores on create, after every check passed."""

    id: str
    owner: str
    model: str
    version: str
    task: Task
    served_model: str
    input: dict[str, Any]
    # The input the runner sends: the deployment's defaults merged under `input`.
    effective_input: dict[str, Any]
    webhook: str
    webhook_events_filter: tuple[Event, ...]
    # gRPC metadata (authorization, x-api-key) the runner forwards to the gateway; never returned
    # by the API and cleared when the prediction ends.
    credentials: dict[str, str]
    created_at: datetime


@dataclass(frozen=True)
class Prediction:
    id: str
    owner: str
    model: str
    version: str
    task: Task
    served_model: str
    input: dict[str, Any]
    effective_input: dict[str, Any]
    status: Status
    output: Any | None
    error: str
    logs: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    # predict_time, total_time, input_token_count, output_token_count, time_to_first_token.
    metrics: dict[str, float]
    webhook: str
    webhook_events_filter: tuple[Event, ...]
    credentials: dict[str, str]
    # Runs started so far (a run is retried after its worker lost the lease).
    attempt: int
    cancel_requested: bool
    worker: str
    lease_expires_at: datetime | None


@dataclass(frozen=True)
class Page:
    results: list[Prediction]
    # Opaque cursors for the older and the newer page; None at either end.
    next_cursor: str | None
    previous_cursor: str | None


@dataclass(frozen=True)
class Lease:
    """What a heartbeat learns: whether the worker still holds the prediction, and whether a
    cancel was asked for since."""

    held: bool
    cancel_requested: bool


@dataclass(frozen=True)
class Delivery:
    """One webhook event in the outbox: the same id and body on every attempt."""

    id: str
    prediction_id: str
    event: Event
    url: str
    body: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime


class QueueFull(Exception):
    """Too many predictions waiting: per owner (scope "owner") or in total (scope "total")."""

    def __init__(self, scope: Literal["owner", "total"], limit: int) -> None:
        super().__init__(f"{limit} predictions are already waiting ({scope})")
        self.scope = scope
        self.limit = limit


class DeploymentExists(Exception):
    pass


# Renders a prediction to the JSON body its webhooks carry (the API's own JSON for it).
WebhookBody = Callable[[Prediction], str]


class Store(Protocol):
    """Durable predictions, deployments, webhook outbox and settings. Every state change that
    emits a webhook event inserts its outbox row in the same transaction (only when the
    prediction has a webhook and the event is in its filter)."""

    async def create(
        self, new: NewPrediction, max_waiting_per_owner: int, max_waiting_total: int
    ) -> Prediction:
        """Stores a `starting` prediction; raises QueueFull when either bound (0: none) is reached."""
        ...

    async def get(self, prediction_id: str, owner: str | None = None) -> Prediction | None:
        """The prediction; None when absent or (with `owner`) another owner's."""
        ...

    async def list_predictions(
        self, owner: str | None, status: str | None, cursor: str | None, limit: int
    ) -> Page:
        """Newest first (created_at, then id); raises ValueError on a cursor it did not make."""
        ...

    async def claim(
        self,
        worker: str,
        lease_seconds: float,
        limit: int,
        max_attempts: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[Prediction]:
        """Takes up to `limit` runnable predictions (starting, or processing with an expired lease)
        for `worker`, oldest first, each exactly once across replicas: status processing, attempt+1,
        started_at set on the first run, the `start` event on the first run. Never one of `exclude`
        (what the worker runs already, whose lease may have lapsed). A prediction whose lease
        expired after `max_attempts` runs ends failed instead (with the `completed` event)."""
        ...

    # `attempt` in the calls below: the run (Prediction.attempt as claimed) the caller speaks
    # for; a write of an older run of the same worker is refused like one of another worker.

    async def heartbeat(
        self, prediction_id: str, worker: str, lease_seconds: float, *, attempt: int | None = None
    ) -> Lease:
        """Extends the lease while `worker` holds it."""
        ...

    async def progress(
        self,
        prediction_id: str,
        worker: str,
        output: Any | None,
        logs: str,
        events: Sequence[Event],
        *,
        attempt: int | None = None,
    ) -> bool:
        """Saves partial output and logs while `worker` holds the lease, with the given events
        (output and/or logs) in the outbox; False when the lease was lost."""
        ...

    async def release(
        self,
        prediction_id: str,
        worker: str,
        delay_seconds: float,
        logs: str,
        *,
        attempt: int | None = None,
    ) -> bool:
        """Gives the prediction back (status starting, runnable after the delay) for a retry."""
        ...

    async def finish(
        self,
        prediction_id: str,
        worker: str,
        status: Status,
        output: Any | None,
        error: str,
        logs: str,
        metrics: dict[str, float],
        *,
        attempt: int | None = None,
    ) -> Prediction | None:
        """Ends a prediction `worker` holds (credentials cleared, `completed` event); None when
        the lease was lost (another worker or run owns the outcome)."""
        ...

    async def cancel(self, prediction_id: str, owner: str | None) -> Prediction | None:
        """Starting: canceled now (`completed` event). Processing: cancel_requested, the worker
        ends it. Ended: unchanged. None when absent or another owner's."""
        ...

    async def due_deliveries(self, worker: str, limit: int, lock_seconds: float) -> list[Delivery]:
        """Outbox rows due now, locked for `worker` so that one replica sends each attempt."""
        ...

    async def delivered(self, delivery_id: str) -> None: ...

    async def retry_delivery(self, delivery_id: str, next_attempt_at: datetime, error: str) -> None: ...

    async def abandon_delivery(self, delivery_id: str, error: str) -> None: ...

    async def purge(self, older_than: datetime, *, batch_size: int = 500) -> int:
        """Deletes ended predictions completed before `older_than`, with their outbox rows, except
        those with a delivery still pending (neither delivered nor abandoned); `batch_size`
        predictions per transaction."""
        ...

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """A shared setting (e.g. the webhook secret), created with `make()` by whoever asks first."""
        ...

    async def create_deployment(self, deployment: Deployment) -> Deployment:
        """Raises DeploymentExists."""
        ...

    async def get_deployment(self, name: str) -> Deployment | None: ...

    async def list_deployments(self) -> list[Deployment]: ...

    async def update_deployment(self, name: str, changes: dict[str, Any]) -> Deployment | None: ...

    async def delete_deployment(self, name: str) -> bool: ...

    async def close(self) -> None: ...
