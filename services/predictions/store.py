"""The durable store: predictions, deployments, the webhook outbox and settings in SQL (SQLAlchemy 2
Core, async) on SQLite or PostgreSQL. The schema comes only from the Alembic migrations in
services/predictions/migrations, which `open_store` runs to head."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from services.predictions.records import (
    EVENTS,
    STATUSES,
    TERMINAL,
    Delivery,
    Deployment,
    DeploymentExists,
    Event,
    Lease,
    NewPrediction,
    Page,
    Prediction,
    QueueFull,
    Status,
    WebhookBody,
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Events whose newest delivery supersedes the earlier ones still unsent: each carries the whole
# prediction, so only the latest matters (`start` and `completed` are never superseded).
SUPERSEDED_EVENTS: frozenset[str] = frozenset({"output", "logs"})

# Marks, in a connection's info, a transaction that queued outbox rows.
_EMITTED = "predictions_emitted"

# Advisory lock numbers of our own (PostgreSQL): replicas starting together migrate one after
# the other, and creators check the queue bounds one after the other.
_PG_MIGRATION_LOCK = 0x70726564
_PG_CREATE_LOCK = 0x70726565


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timestamps in UTC, always timezone-aware in Python. SQLite keeps naive UTC text, whose
    order is the time order; PostgreSQL keeps `timestamp with time zone`."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The tables as this module queries them; the migrations create them (tests check they agree).
metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("task", sa.String(16), nullable=False),
    sa.Column("served_model", sa.String(200), nullable=False),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("effective_input", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("output", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("logs", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("webhook", sa.Text, nullable=False),
    sa.Column("webhook_events_filter", sa.JSON, nullable=False),
    sa.Column("credentials", sa.JSON, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("worker", sa.String(200), nullable=False),
    # Processing: when the worker's lease ends. Starting: not runnable before (a release delay).
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Index("ix_predictions_owner_created", "owner", "created_at", "id"),
    sa.Index("ix_predictions_created", "created_at", "id"),
    sa.Index("ix_predictions_runnable", "status", "lease_expires_at", "created_at"),
    sa.Index("ix_predictions_waiting", "status", "owner"),
    sa.Index("ix_predictions_completed", "completed_at"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("prediction_id", sa.String(64), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    sa.Column("locked_by", sa.String(200), nullable=True),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("delivered_at", UTCDateTime, nullable=True),
    sa.Column("abandoned_at", UTCDateTime, nullable=True),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Index("ix_webhook_deliveries_prediction", "prediction_id"),
    sa.Index("ix_webhook_deliveries_due", "delivered_at", "abandoned_at", "next_attempt_at"),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("task", sa.String(16), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("defaults", sa.JSON, nullable=False),
    sa.Column("input_schema", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_DEPLOYMENT_FIELDS = frozenset(f.name for f in fields(Deployment))
_DEPLOYMENT_FIXED = frozenset({"name", "created_at", "updated_at"})


def _prediction(row: sa.Row[Any]) -> Prediction:
    values = _fields_of(row, Prediction)
    # JSON gives back a list, and SQLite a 0/1 for a boolean.
    values["webhook_events_filter"] = tuple(values["webhook_events_filter"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Prediction(**values)


def _fields_of(row: sa.Row[Any], kind: type[Any]) -> dict[str, Any]:
    """The columns of `row` named like the fields of the dataclass `kind`."""
    return {item.name: row._mapping[item.name] for item in fields(kind)}


def _deployment(row: sa.Row[Any]) -> Deployment:
    return Deployment(**_fields_of(row, Deployment))


def _delivery(row: sa.Row[Any]) -> Delivery:
    return Delivery(**_fields_of(row, Delivery))


def _encode_cursor(direction: str, p: Prediction) -> str:
    raw = json.dumps([direction, p.created_at.isoformat(), p.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        direction, created, pid = json.loads(raw)
        when = datetime.fromisoformat(created)
        if direction not in ("n", "p") or not isinstance(pid, str) or when.tzinfo is None:
            raise ValueError
        return direction, when, pid
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"cursor {cursor[:40]!r} is not one this service made") from None


def _older(t: datetime, pid: str) -> sa.ColumnElement[bool]:
    c = predictions.c
    return sa.or_(c.created_at < t, sa.and_(c.created_at == t, c.id < pid))


def _newer(t: datetime, pid: str) -> sa.ColumnElement[bool]:
    c = predictions.c
    return sa.or_(c.created_at > t, sa.and_(c.created_at == t, c.id > pid))


class SqlStore:
    """records.Store over one SQLAlchemy async engine. Every state change and the outbox rows it
    emits commit in one transaction; on SQLite write transactions take the file's write lock up
    front (BEGIN IMMEDIATE), on PostgreSQL contended rows are taken with FOR UPDATE SKIP LOCKED."""

    def __init__(self, engine: AsyncEngine, render: WebhookBody, serialize: bool = False) -> None:
        self._engine = engine
        self._render = render
        self.dialect = engine.dialect.name
        # An in-memory SQLite database lives in one connection, which transactions take in turn.
        self._serial = asyncio.Lock() if serialize else None
        # SQLite has one writer at a time. Writers of this process queue here, in order, rather
        # than in SQLite's busy handler, whose sleeps starve some of them for seconds under load;
        # the busy timeout is left for writers in other processes.
        self._writer = asyncio.Lock() if self.dialect == "sqlite" and not serialize else None
        self._event_listeners: list[Callable[[], None]] = []

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def on_events(self, listener: Callable[[], None]) -> None:
        """Calls `listener` (e.g. the webhook sender's wake) after each commit that queued
        webhook events in this process, so they go out without waiting for the next poll."""
        self._event_listeners.append(listener)

    @asynccontextmanager
    async def _tx(self, write: bool = True) -> AsyncIterator[AsyncConnection]:
        if self._serial is not None:
            async with self._serial, self._connection(write) as conn:
                yield conn
        elif write and self._writer is not None:
            async with self._writer, self._connection(write) as conn:
                yield conn
        else:
            async with self._connection(write) as conn:
                yield conn

    @asynccontextmanager
    async def _connection(self, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if write:
                await conn.execution_options(sqlite_immediate=True)
            # The info outlives the checkout: a failed transaction's mark must not carry over.
            conn.info.pop(_EMITTED, None)
            async with conn.begin():
                yield conn
            emitted = conn.info.pop(_EMITTED, False)
        if emitted:
            for listener in self._event_listeners:
                listener()

    # --- predictions -------------------------------------------------------------------------

    async def create(
        self, new: NewPrediction, max_waiting_per_owner: int, max_waiting_total: int
    ) -> Prediction:
        """Stores a `starting` prediction; raises QueueFull when either bound (0: none) is
        reached. Waiting = status starting (queued, not running)."""
        c = predictions.c
        async with self._tx() as conn:
            if max_waiting_per_owner or max_waiting_total:
                if self.dialect == "postgresql":
                    # Creators serialize on the count so that concurrent ones cannot overshoot.
                    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CREATE_LOCK})
                waiting = sa.select(sa.func.count()).select_from(predictions).where(c.status == "starting")
                if max_waiting_per_owner:
                    mine = (await conn.execute(waiting.where(c.owner == new.owner))).scalar_one()
                    if mine >= max_waiting_per_owner:
                        raise QueueFull("owner", max_waiting_per_owner)
                if max_waiting_total:
                    total = (await conn.execute(waiting)).scalar_one()
                    if total >= max_waiting_total:
                        raise QueueFull("total", max_waiting_total)
            prediction = Prediction(
                id=new.id,
                owner=new.owner,
                model=new.model,
                version=new.version,
                task=new.task,
                served_model=new.served_model,
                input=new.input,
                effective_input=new.effective_input,
                status="starting",
                output=None,
                error="",
                logs="",
                created_at=new.created_at.astimezone(UTC),
                started_at=None,
                completed_at=None,
                metrics={},
                webhook=new.webhook,
                webhook_events_filter=tuple(new.webhook_events_filter),
                credentials=dict(new.credentials),
                attempt=0,
                cancel_requested=False,
                worker="",
                lease_expires_at=None,
            )
            values = {f.name: getattr(prediction, f.name) for f in fields(Prediction)}
            values["webhook_events_filter"] = list(prediction.webhook_events_filter)
            await conn.execute(predictions.insert().values(**values))
        return prediction

    async def get(self, prediction_id: str, owner: str | None = None) -> Prediction | None:
        """The prediction; None when absent or (with `owner`) another owner's."""
        query = predictions.select().where(predictions.c.id == prediction_id)
        if owner is not None:
            query = query.where(predictions.c.owner == owner)
        async with self._tx(write=False) as conn:
            row = (await conn.execute(query)).first()
        return _prediction(row) if row is not None else None

    async def list_predictions(
        self, owner: str | None, status: str | None, cursor: str | None, limit: int
    ) -> Page:
        """Newest first (created_at, then id); raises ValueError on a cursor it did not make or a
        status that is not one."""
        if status and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        limit = max(1, limit)
        c = predictions.c
        scope: list[sa.ColumnElement[bool]] = []
        if owner is not None:
            scope.append(c.owner == owner)
        if status:
            scope.append(c.status == status)
        base = predictions.select().where(*scope)

        async def exists(conn: AsyncConnection, condition: sa.ColumnElement[bool]) -> bool:
            query = sa.select(c.id).where(*scope, condition).limit(1)
            return (await conn.execute(query)).first() is not None

        async with self._tx(write=False) as conn:
            if cursor is None or _decode_cursor(cursor)[0] == "n":
                query = base.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
                if cursor is not None:
                    _, t, pid = _decode_cursor(cursor)
                    query = query.where(_older(t, pid))
                rows = [_prediction(r) for r in (await conn.execute(query))]
                results = rows[:limit]
                more_older = len(rows) > limit
                more_newer = bool(
                    cursor is not None
                    and results
                    and await exists(conn, _newer(results[0].created_at, results[0].id))
                )
            else:
                _, t, pid = _decode_cursor(cursor)
                query = base.where(_newer(t, pid)).order_by(c.created_at, c.id).limit(limit + 1)
                rows = [_prediction(r) for r in (await conn.execute(query))]
                more_newer = len(rows) > limit
                results = list(reversed(rows[:limit]))
                more_older = bool(results) and await exists(
                    conn, _older(results[-1].created_at, results[-1].id)
                )
        return Page(
            results=results,
            next_cursor=_encode_cursor("n", results[-1]) if results and more_older else None,
            previous_cursor=_encode_cursor("p", results[0]) if results and more_newer else None,
        )

    async def claim(
        self,
        worker: str,
        lease_seconds: float,
        limit: int,
        max_attempts: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[Prediction]:
        """Takes up to `limit` runnable predictions for `worker`, oldest first, each exactly once
        across replicas (see records.Store.claim), never one of `exclude`. A run whose lease expired
        after `max_attempts` runs ends failed, and one whose cancel was asked for ends canceled,
        instead of rerunning."""
        c = predictions.c
        claimed: list[Prediction] = []
        async with self._tx() as conn:
            now = utcnow()
            runnable = sa.or_(
                sa.and_(
                    c.status == "starting", sa.or_(c.lease_expires_at.is_(None), c.lease_expires_at <= now)
                ),
                sa.and_(c.status == "processing", c.lease_expires_at < now),
            )
            query = (
                predictions.select()
                .where(runnable, *([c.id.not_in(list(exclude))] if exclude else []))
                .order_by(c.created_at, c.id)
                .limit(max(1, limit))
                .with_for_update(skip_locked=True)
            )
            for row in (await conn.execute(query)).all():
                before = _prediction(row)
                # Guarded on what we read, so that a racing writer (none on PostgreSQL: the row
                # is locked) makes this a no-op instead of a second claim.
                guard = sa.and_(
                    c.id == before.id,
                    c.status == before.status,
                    c.attempt == before.attempt,
                    c.worker == before.worker,
                )
                if before.cancel_requested or (
                    before.status == "processing" and before.attempt >= max_attempts
                ):
                    if before.cancel_requested:
                        end: dict[str, Any] = {"status": "canceled", "error": ""}
                    else:
                        end = {
                            "status": "failed",
                            "error": f"the prediction's worker was lost {before.attempt} times",
                        }
                    end.update(completed_at=now, credentials={}, lease_expires_at=None)
                    if (await conn.execute(predictions.update().where(guard).values(**end))).rowcount == 1:
                        await self._emit(conn, replace(before, **end), ("completed",), now)
                    continue
                values: dict[str, Any] = {
                    "status": "processing",
                    "attempt": before.attempt + 1,
                    "worker": worker,
                    "lease_expires_at": now + timedelta(seconds=lease_seconds),
                    "started_at": before.started_at or now,
                }
                if (await conn.execute(predictions.update().where(guard).values(**values))).rowcount != 1:
                    continue
                after = replace(before, **values)
                if after.attempt == 1:
                    await self._emit(conn, after, ("start",), now)
                claimed.append(after)
        return claimed

    def _held(self, prediction_id: str, worker: str, attempt: int | None) -> sa.ColumnElement[bool]:
        """The row while `worker` runs it; with `attempt`, only in that run (the same worker may
        have claimed it again after its own lease lapsed: the older run must lose)."""
        c = predictions.c
        held = sa.and_(c.id == prediction_id, c.worker == worker, c.status == "processing")
        return held if attempt is None else sa.and_(held, c.attempt == attempt)

    async def _held_row(
        self, conn: AsyncConnection, prediction_id: str, worker: str, attempt: int | None
    ) -> Prediction | None:
        query = predictions.select().where(self._held(prediction_id, worker, attempt)).with_for_update()
        row = (await conn.execute(query)).first()
        return _prediction(row) if row is not None else None

    async def heartbeat(
        self, prediction_id: str, worker: str, lease_seconds: float, *, attempt: int | None = None
    ) -> Lease:
        """Extends the lease while `worker` holds it (in run `attempt`, when given); says whether
        a cancel was asked for."""
        async with self._tx() as conn:
            now = utcnow()
            result = await conn.execute(
                predictions.update()
                .where(self._held(prediction_id, worker, attempt))
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                .returning(predictions.c.cancel_requested)
            )
            row = result.first()
        if row is None:
            return Lease(held=False, cancel_requested=False)
        return Lease(held=True, cancel_requested=bool(row[0]))

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
        """Saves partial output and logs while `worker` holds the lease (in run `attempt`, when
        given), with the given events in the outbox; False when the lease was lost."""
        async with self._tx() as conn:
            now = utcnow()
            before = await self._held_row(conn, prediction_id, worker, attempt)
            if before is None:
                return False
            values: dict[str, Any] = {"output": output, "logs": logs}
            await conn.execute(predictions.update().where(predictions.c.id == prediction_id).values(**values))
            await self._emit(conn, replace(before, **values), events, now)
        return True

    async def release(
        self,
        prediction_id: str,
        worker: str,
        delay_seconds: float,
        logs: str,
        *,
        attempt: int | None = None,
    ) -> bool:
        """Gives the prediction back (status starting, runnable after the delay) for a retry;
        False when `worker` (in run `attempt`, when given) no longer holds it."""
        async with self._tx() as conn:
            now = utcnow()
            result = await conn.execute(
                predictions.update()
                .where(self._held(prediction_id, worker, attempt))
                .values(
                    status="starting",
                    worker="",
                    logs=logs,
                    lease_expires_at=now + timedelta(seconds=max(0.0, delay_seconds)),
                )
            )
            return result.rowcount == 1

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
        """Ends a prediction `worker` holds (in run `attempt`, when given; credentials cleared,
        `completed` event); None when the lease was lost."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status, not {status!r}")
        async with self._tx() as conn:
            now = utcnow()
            before = await self._held_row(conn, prediction_id, worker, attempt)
            if before is None:
                return None
            values: dict[str, Any] = {
                "status": status,
                "output": output,
                "error": error,
                "logs": logs,
                "metrics": dict(metrics),
                "completed_at": now,
                "credentials": {},
                "lease_expires_at": None,
            }
            await conn.execute(predictions.update().where(predictions.c.id == prediction_id).values(**values))
            after = replace(before, **values)
            await self._emit(conn, after, ("completed",), now)
        return after

    async def cancel(self, prediction_id: str, owner: str | None) -> Prediction | None:
        """Starting, or processing by a worker whose lease lapsed: canceled now (`completed`
        event). Processing: cancel_requested, the worker ends it. Ended: unchanged. None when
        absent or another owner's."""
        c = predictions.c
        query = predictions.select().where(c.id == prediction_id).with_for_update()
        if owner is not None:
            query = query.where(c.owner == owner)
        async with self._tx() as conn:
            now = utcnow()
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            before = _prediction(row)
            values: dict[str, Any]
            lapsed = before.lease_expires_at is not None and before.lease_expires_at < now
            if before.status == "starting" or (before.status == "processing" and lapsed):
                values = {
                    "status": "canceled",
                    "cancel_requested": True,
                    "completed_at": now,
                    "credentials": {},
                    "lease_expires_at": None,
                }
            elif before.status == "processing" and not before.cancel_requested:
                values = {"cancel_requested": True}
            else:
                return before
            await conn.execute(predictions.update().where(c.id == prediction_id).values(**values))
            after = replace(before, **values)
            if after.status == "canceled":
                await self._emit(conn, after, ("completed",), now)
        return after

    async def purge(self, older_than: datetime, *, batch_size: int = 500) -> int:
        """Deletes ended predictions completed before `older_than`, with their outbox rows; one
        with a delivery still to be sent (neither delivered nor abandoned) waits for it. At most
        `batch_size` predictions a transaction, so other writers get the database in between."""
        c = predictions.c
        d = webhook_deliveries.c
        pending = sa.exists().where(
            d.prediction_id == c.id, d.delivered_at.is_(None), d.abandoned_at.is_(None)
        )
        ended = (
            sa.select(c.id)
            .where(c.status.in_(TERMINAL), c.completed_at < older_than, ~pending)
            .limit(max(1, batch_size))
        )
        purged = 0
        while True:
            async with self._tx() as conn:
                ids = list((await conn.execute(ended)).scalars())
                if ids:
                    await conn.execute(webhook_deliveries.delete().where(d.prediction_id.in_(ids)))
                    purged += (await conn.execute(predictions.delete().where(c.id.in_(ids)))).rowcount
            if len(ids) < max(1, batch_size):
                return purged

    # --- webhook outbox ----------------------------------------------------------------------

    async def _emit(
        self, conn: AsyncConnection, after: Prediction, events: Sequence[Event], now: datetime
    ) -> None:
        """Queues the events the prediction's webhook asked for (an empty filter: all); a new
        output or logs event abandons the prediction's unsent ones of the same kind."""
        if not after.webhook:
            return
        wanted = [
            e
            for e in events
            if e in EVENTS and (not after.webhook_events_filter or e in after.webhook_events_filter)
        ]
        if not wanted:
            return
        body = self._render(after)
        newer = [e for e in wanted if e in SUPERSEDED_EVENTS]
        if newer:
            d = webhook_deliveries.c
            await conn.execute(
                webhook_deliveries.update()
                .where(
                    d.prediction_id == after.id,
                    d.event.in_(newer),
                    d.delivered_at.is_(None),
                    d.abandoned_at.is_(None),
                )
                .values(abandoned_at=now, last_error="superseded by a newer event of its kind")
            )
        # Ids sort in the order the events happened (as KSUIDs do), so the outbox sends them so.
        stamp = f"{time.time_ns():016x}"
        await conn.execute(
            webhook_deliveries.insert(),
            [
                {
                    "id": f"msg_{stamp}{index:02x}{secrets.token_hex(8)}",
                    "prediction_id": after.id,
                    "event": event,
                    "url": after.webhook,
                    "body": body,
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                    "locked_by": None,
                    "locked_until": None,
                    "delivered_at": None,
                    "abandoned_at": None,
                    "last_error": "",
                }
                for index, event in enumerate(wanted)
            ],
        )
        conn.info[_EMITTED] = True

    async def due_deliveries(self, worker: str, limit: int, lock_seconds: float) -> list[Delivery]:
        """Outbox rows due now, oldest first, locked for `worker` for `lock_seconds` so that one
        replica sends each attempt. `attempts` counts the attempt being handed out (1 = first)."""
        d = webhook_deliveries.c
        due: list[Delivery] = []
        async with self._tx() as conn:
            now = utcnow()
            query = (
                webhook_deliveries.select()
                .where(
                    d.delivered_at.is_(None),
                    d.abandoned_at.is_(None),
                    d.next_attempt_at <= now,
                    sa.or_(d.locked_until.is_(None), d.locked_until < now),
                )
                .order_by(d.next_attempt_at, d.created_at, d.id)
                .limit(max(1, limit))
                .with_for_update(skip_locked=True)
            )
            for row in (await conn.execute(query)).all():
                before = _delivery(row)
                result = await conn.execute(
                    webhook_deliveries.update()
                    .where(d.id == before.id, d.attempts == before.attempts)
                    .values(
                        locked_by=worker,
                        locked_until=now + timedelta(seconds=lock_seconds),
                        attempts=before.attempts + 1,
                    )
                )
                if result.rowcount == 1:
                    due.append(replace(before, attempts=before.attempts + 1))
        return due

    async def _delivery_update(self, delivery_id: str, **values: Any) -> None:
        async with self._tx() as conn:
            await conn.execute(
                webhook_deliveries.update()
                .where(webhook_deliveries.c.id == delivery_id)
                .values(locked_by=None, locked_until=None, **values)
            )

    async def delivered(self, delivery_id: str) -> None:
        await self._delivery_update(delivery_id, delivered_at=utcnow(), last_error="")

    async def retry_delivery(self, delivery_id: str, next_attempt_at: datetime, error: str) -> None:
        await self._delivery_update(delivery_id, next_attempt_at=next_attempt_at, last_error=error)

    async def abandon_delivery(self, delivery_id: str, error: str) -> None:
        await self._delivery_update(delivery_id, abandoned_at=utcnow(), last_error=error)

    async def delivery_state(self, delivery_id: str) -> dict[str, Any] | None:
        """The outbox row as stored (for tests and operators)."""
        async with self._tx(write=False) as conn:
            row = (
                await conn.execute(webhook_deliveries.select().where(webhook_deliveries.c.id == delivery_id))
            ).first()
        return dict(row._mapping) if row is not None else None

    async def deliveries_for(self, prediction_id: str) -> list[dict[str, Any]]:
        """A prediction's outbox rows, oldest first (for tests and operators)."""
        d = webhook_deliveries.c
        query = (
            webhook_deliveries.select().where(d.prediction_id == prediction_id).order_by(d.created_at, d.id)
        )
        async with self._tx(write=False) as conn:
            return [dict(r._mapping) for r in await conn.execute(query)]

    # --- settings and deployments ------------------------------------------------------------

    async def setting(self, name: str, make: Callable[[], str]) -> str:
        """A shared setting, created with `make()` by whoever asks first (the others read it)."""
        select = sa.select(settings.c.value).where(settings.c.name == name)
        async with self._tx(write=False) as conn:
            value = (await conn.execute(select)).scalar_one_or_none()
        if value is not None:
            return cast(str, value)
        insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(settings)
        async with self._tx() as conn:
            await conn.execute(
                insert.values(name=name, value=make()).on_conflict_do_nothing(index_elements=["name"])
            )
        async with self._tx(write=False) as conn:
            return cast(str, (await conn.execute(select)).scalar_one())

    async def create_deployment(self, deployment: Deployment) -> Deployment:
        """Raises DeploymentExists."""
        now = utcnow()
        stored = replace(deployment, created_at=now, updated_at=now)
        try:
            async with self._tx() as conn:
                await conn.execute(
                    deployments.insert().values(
                        **{f.name: getattr(stored, f.name) for f in fields(Deployment)}
                    )
                )
        except IntegrityError:
            raise DeploymentExists(deployment.name) from None
        return stored

    async def get_deployment(self, name: str) -> Deployment | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(deployments.select().where(deployments.c.name == name))).first()
        return _deployment(row) if row is not None else None

    async def list_deployments(self) -> list[Deployment]:
        async with self._tx(write=False) as conn:
            return [
                _deployment(r) for r in await conn.execute(deployments.select().order_by(deployments.c.name))
            ]

    async def update_deployment(self, name: str, changes: dict[str, Any]) -> Deployment | None:
        """Applies `changes` (keys: Deployment fields other than name and the timestamps; a
        ValueError names any other) and sets updated_at; None when absent."""
        unknown = sorted(set(changes) - (_DEPLOYMENT_FIELDS - _DEPLOYMENT_FIXED))
        if unknown:
            raise ValueError(f"deployment fields that cannot change: {', '.join(unknown)}")
        async with self._tx() as conn:
            result = await conn.execute(
                deployments.update().where(deployments.c.name == name).values(**changes, updated_at=utcnow())
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(deployments.select().where(deployments.c.name == name))).one()
        return _deployment(row)

    async def delete_deployment(self, name: str) -> bool:
        async with self._tx() as conn:
            result = await conn.execute(deployments.delete().where(deployments.c.name == name))
            return result.rowcount == 1

    async def close(self) -> None:
        await self._engine.dispose()


def _enter_wal(cursor: Any, attempts: int = 100) -> None:
    """Switch the file to WAL. Replicas opening a new file together can get "database is locked"
    at once here (seen in CI): the switch needs the file alone, and SQLite may skip the busy
    handler for it, so it is retried for up to ten seconds."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.1)


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL (readers do not block the writer), a busy timeout, and our own BEGIN: IMMEDIATE for
    writes, so that two processes on one file serialize instead of failing on a stale read."""

    @sa.event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy's "begin" event emits BEGIN, not the driver (nor its COMMIT before DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _enter_wal(cursor)
        # A commit survives a power cut too, not just a crash (measured: no slower here).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(url: str) -> Config:
    """Alembic's configuration for this store, built in code (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _upgrade(connection: Connection, url: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _make_parent(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


async def open_store(url: str, render: WebhookBody, *, pool_size: int = 5) -> SqlStore:
    """Connects, runs the migrations to head, and returns the store, with `pool_size` pooled
    connections (beyond them, up to 10 more while busy). SQLite file URLs get their folder
    created."""
    parsed = make_url(url)
    options: dict[str, Any] = {}
    in_memory = False
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
        if in_memory:
            options["poolclass"] = StaticPool
        else:
            await asyncio.to_thread(_make_parent, database)
        options["connect_args"] = {"timeout": 30}
        if not in_memory:
            options["pool_size"] = pool_size
    else:
        options.update(pool_size=pool_size, pool_pre_ping=True)
    engine = create_async_engine(url, **options)
    if parsed.get_backend_name() == "sqlite":
        _sqlite_setup(engine)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(sqlite_immediate=True)
            async with conn.begin():
                await conn.run_sync(_upgrade, url)
    except BaseException:
        await engine.dispose()
        raise
    return SqlStore(engine, render, serialize=in_memory)


__all__ = ["SqlStore", "alembic_config", "metadata", "open_store", "utcnow"]
