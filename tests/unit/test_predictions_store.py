"""The SQL store's contract (records.Store) on a SQLite file. tests/test_predictions_store_postgres.py
runs these same functions against a real PostgreSQL server by overriding the `store_url` fixture."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from services.predictions.records import (
    Deployment,
    DeploymentExists,
    Event,
    NewPrediction,
    Prediction,
    QueueFull,
)
from services.predictions.store import SqlStore, alembic_config, metadata, open_store

OpenStore = Callable[[], Awaitable[SqlStore]]


def render(p: Prediction) -> str:
    return json.dumps({"id": p.id, "status": p.status, "output": p.output, "error": p.error})


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/sub/predictions.db"


@pytest.fixture
async def open_at(store_url: str) -> AsyncIterator[OpenStore]:
    """Opens stores on the test's database (several act as replicas); closes them afterwards."""
    opened: list[SqlStore] = []

    async def make() -> SqlStore:
        store = await open_store(store_url, render)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_at: OpenStore) -> SqlStore:
    return await open_at()


T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def new(
    owner: str = "alice",
    created_at: datetime | None = None,
    webhook: str = "",
    events: tuple[Event, ...] = (),
    pid: str | None = None,
) -> NewPrediction:
    return NewPrediction(
        id=pid or f"p{secrets.token_hex(8)}",
        owner=owner,
        model="tiny",
        version="1",
        task="generate",
        served_model="tiny-gpt2",
        input={"prompt": "hi"},
        effective_input={"prompt": "hi", "parameters": {"max_tokens": 4}},
        webhook=webhook,
        webhook_events_filter=events,
        credentials={"x-api-key": "secret"},
        created_at=created_at or datetime.now(UTC),
    )


async def make_running(store: SqlStore, worker: str = "w1", **kwargs: Any) -> Prediction:
    created = await store.create(new(**kwargs), 0, 0)
    claimed = await store.claim(worker, 30, 1, 3)
    assert [p.id for p in claimed] == [created.id]
    return claimed[0]


async def expire(store: SqlStore) -> None:
    """Lets every lease lapse (leases in these tests are 0.01 s)."""
    await asyncio.sleep(0.05)


async def test_create_then_get_round_trips(store: SqlStore) -> None:
    created = await store.create(new(created_at=T0), 0, 0)
    got = await store.get(created.id)
    assert got == created
    assert got.status == "starting" and got.attempt == 0 and got.output is None
    assert got.created_at == T0 and got.created_at.utcoffset() == timedelta(0)
    assert got.credentials == {"x-api-key": "secret"}
    assert await store.get(created.id, owner="alice") == created
    assert await store.get(created.id, owner="bob") is None
    assert await store.get("absent") is None
    [claimed] = await store.claim("w1", 30, 1, 3)
    assert claimed.started_at is not None and claimed.started_at.utcoffset() == timedelta(0)
    again = await store.get(created.id)
    assert again is not None and again.lease_expires_at is not None
    assert again.lease_expires_at.utcoffset() == timedelta(0)


async def test_queue_bounds_per_owner_and_in_total(store: SqlStore) -> None:
    await store.create(new(owner="alice"), 2, 3)
    await store.create(new(owner="alice"), 2, 3)
    with pytest.raises(QueueFull) as owner_full:
        await store.create(new(owner="alice"), 2, 3)
    assert (owner_full.value.scope, owner_full.value.limit) == ("owner", 2)
    await store.create(new(owner="bob"), 2, 3)
    with pytest.raises(QueueFull) as total_full:
        await store.create(new(owner="carol"), 2, 3)
    assert (total_full.value.scope, total_full.value.limit) == ("total", 3)
    # A running prediction is no longer waiting.
    await store.claim("w1", 30, 1, 3)
    await store.create(new(owner="carol"), 2, 3)
    await store.create(new(owner="dave"), 0, 0)


async def test_list_pages_newest_first_both_ways(store: SqlStore) -> None:
    ids = []
    for i in range(7):
        # Two share a timestamp: the id breaks the tie.
        when = T0 + timedelta(seconds=min(i, 5))
        ids.append((await store.create(new(created_at=when, pid=f"p{i}"), 0, 0)).id)
    await store.create(new(owner="bob"), 0, 0)
    newest_first = list(reversed(ids))

    first = await store.list_predictions("alice", None, None, 3)
    assert [p.id for p in first.results] == newest_first[:3]
    assert first.previous_cursor is None and first.next_cursor
    second = await store.list_predictions("alice", None, first.next_cursor, 3)
    assert [p.id for p in second.results] == newest_first[3:6]
    assert second.previous_cursor and second.next_cursor
    third = await store.list_predictions("alice", None, second.next_cursor, 3)
    assert [p.id for p in third.results] == newest_first[6:]
    assert third.next_cursor is None and third.previous_cursor

    back = await store.list_predictions("alice", None, third.previous_cursor, 3)
    assert [p.id for p in back.results] == newest_first[3:6]
    assert back.previous_cursor and back.next_cursor
    top = await store.list_predictions("alice", None, back.previous_cursor, 3)
    assert [p.id for p in top.results] == newest_first[:3]
    assert top.previous_cursor is None and top.next_cursor

    everyone = await store.list_predictions(None, None, None, 100)
    assert len(everyone.results) == 8 and everyone.next_cursor is None

    await store.claim("w1", 30, 2, 3)  # the two oldest: p0, p1
    processing = await store.list_predictions("alice", "processing", None, 10)
    assert [p.id for p in processing.results] == ["p1", "p0"]
    assert (await store.list_predictions("bob", "processing", None, 10)).results == []

    for bad in ("garbage", "bm90IGpzb24", first.next_cursor[:-2] + "!!"):
        with pytest.raises(ValueError):
            await store.list_predictions("alice", None, bad, 3)
    with pytest.raises(ValueError, match="status"):
        await store.list_predictions("alice", "running", None, 3)


async def test_claim_takes_oldest_first_and_emits_start(store: SqlStore) -> None:
    older = await store.create(new(created_at=T0, webhook="https://hook.example/x"), 0, 0)
    newer = await store.create(new(created_at=T0 + timedelta(seconds=1)), 0, 0)
    [claimed] = await store.claim("w1", 30, 1, 3)
    assert claimed.id == older.id
    assert (claimed.status, claimed.attempt, claimed.worker) == ("processing", 1, "w1")
    assert claimed.started_at is not None and claimed.lease_expires_at is not None
    assert claimed.lease_expires_at > datetime.now(UTC) + timedelta(seconds=25)
    assert await store.get(older.id) == claimed
    [start] = await store.deliveries_for(older.id)
    assert start["event"] == "start" and start["url"] == "https://hook.example/x"
    assert json.loads(start["body"])["status"] == "processing"
    assert start["id"].startswith("msg_")
    assert [p.id for p in await store.claim("w2", 30, 5, 3)] == [newer.id]
    assert await store.claim("w2", 30, 5, 3) == []


async def test_two_stores_on_one_database_claim_each_prediction_once(open_at: OpenStore) -> None:
    stores = [await open_at(), await open_at()]
    created = {(await stores[0].create(new(), 0, 0)).id for _ in range(30)}
    claims: list[str] = []

    async def claimer(store: SqlStore, worker: str) -> None:
        while True:
            got = await store.claim(worker, 30, 3, 3)
            if not got:
                return
            claims.extend(p.id for p in got)

    await asyncio.gather(*(claimer(s, f"w{i}-{j}") for i, s in enumerate(stores) for j in range(2)))
    assert sorted(claims) == sorted(created)


async def test_expired_lease_is_taken_over_and_the_old_worker_loses(store: SqlStore) -> None:
    created = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    [first] = await store.claim("w1", 0.01, 1, 3)
    await expire(store)
    [second] = await store.claim("w2", 30, 1, 3)
    assert second.id == created.id
    assert (second.attempt, second.worker) == (2, "w2")
    assert second.started_at == first.started_at
    assert [d["event"] for d in await store.deliveries_for(created.id)] == ["start"]

    assert (await store.heartbeat(created.id, "w1", 30)).held is False
    assert await store.progress(created.id, "w1", {"text": "old"}, "", ["output"]) is False
    assert await store.release(created.id, "w1", 0, "") is False
    assert await store.finish(created.id, "w1", "succeeded", {"text": "old"}, "", "", {}) is None
    lease = await store.heartbeat(created.id, "w2", 30)
    assert lease.held and not lease.cancel_requested
    done = await store.finish(created.id, "w2", "succeeded", {"text": "new"}, "", "", {"predict_time": 1.5})
    assert done is not None and done.output == {"text": "new"}


async def test_a_worker_that_claims_its_own_lapsed_run_again_fences_the_old_run(store: SqlStore) -> None:
    created = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    [first] = await store.claim("w1", 0.01, 1, 3)
    await expire(store)
    # The worker still runs it: it asks claim to leave it out.
    assert await store.claim("w1", 30, 1, 3, exclude=[created.id]) == []
    assert (await store.heartbeat(created.id, "w1", 0.01, attempt=first.attempt)).held
    await expire(store)
    [second] = await store.claim("w1", 30, 1, 3)
    assert (second.attempt, second.worker) == (2, "w1")
    # Same worker, older run: every write of run 1 is refused.
    assert (await store.heartbeat(created.id, "w1", 30, attempt=1)).held is False
    assert await store.progress(created.id, "w1", {"text": "old"}, "", ["output"], attempt=1) is False
    assert await store.release(created.id, "w1", 0, "", attempt=1) is False
    assert await store.finish(created.id, "w1", "succeeded", {"text": "old"}, "", "", {}, attempt=1) is None
    assert (await store.heartbeat(created.id, "w1", 30, attempt=2)).held
    assert await store.progress(created.id, "w1", {"text": "new"}, "", ["output"], attempt=2)
    done = await store.finish(created.id, "w1", "succeeded", {"text": "new"}, "", "", {}, attempt=2)
    assert done is not None and done.output == {"text": "new"}


async def test_lease_lost_max_attempts_times_fails_the_prediction(store: SqlStore) -> None:
    created = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    assert len(await store.claim("w1", 0.01, 1, 2)) == 1
    await expire(store)
    assert len(await store.claim("w2", 0.01, 1, 2)) == 1
    await expire(store)
    assert await store.claim("w3", 30, 1, 2) == []
    failed = await store.get(created.id)
    assert failed is not None
    assert (failed.status, failed.error) == ("failed", "the prediction's worker was lost 2 times")
    assert failed.completed_at is not None and failed.credentials == {}
    events = await store.deliveries_for(created.id)
    assert [d["event"] for d in events] == ["start", "completed"]
    assert json.loads(events[-1]["body"])["status"] == "failed"


async def test_heartbeat_extends_the_lease_and_sees_a_cancel(store: SqlStore) -> None:
    running = await make_running(store)
    lease = await store.heartbeat(running.id, "w1", 120)
    assert lease.held and not lease.cancel_requested
    extended = await store.get(running.id)
    assert extended is not None and extended.lease_expires_at is not None
    assert extended.lease_expires_at > datetime.now(UTC) + timedelta(seconds=100)

    asked = await store.cancel(running.id, "alice")
    assert asked is not None and asked.status == "processing" and asked.cancel_requested
    assert (await store.heartbeat(running.id, "w1", 30)).cancel_requested
    done = await store.finish(running.id, "w1", "canceled", None, "", "", {})
    assert done is not None and done.status == "canceled"


async def test_cancel_of_starting_ended_and_foreign_predictions(store: SqlStore) -> None:
    waiting = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    assert await store.cancel(waiting.id, "bob") is None
    assert await store.cancel("absent", None) is None
    canceled = await store.cancel(waiting.id, "alice")
    assert canceled is not None and canceled.status == "canceled"
    assert canceled.completed_at is not None and canceled.credentials == {}
    assert await store.get(waiting.id) == canceled
    assert [d["event"] for d in await store.deliveries_for(waiting.id)] == ["completed"]
    assert await store.cancel(waiting.id, None) == canceled
    assert await store.claim("w1", 30, 5, 3) == []


async def test_cancel_of_a_run_whose_worker_died_ends_it_canceled(store: SqlStore) -> None:
    created = await store.create(new(), 0, 0)
    await store.claim("w1", 0.01, 1, 3)
    await store.cancel(created.id, None)
    await expire(store)
    assert await store.claim("w2", 30, 1, 3) == []
    ended = await store.get(created.id)
    assert ended is not None and ended.status == "canceled"


async def test_cancel_after_the_worker_died_ends_the_prediction_now(store: SqlStore) -> None:
    created = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    await store.claim("w1", 0.01, 1, 3)
    await expire(store)
    canceled = await store.cancel(created.id, "alice")
    assert canceled is not None and canceled.status == "canceled" and canceled.credentials == {}
    assert await store.get(created.id) == canceled
    assert [d["event"] for d in await store.deliveries_for(created.id)] == ["start", "completed"]
    assert await store.finish(created.id, "w1", "succeeded", None, "", "", {}) is None
    assert await store.claim("w2", 30, 1, 3) == []


async def test_progress_then_finish_store_output_and_events(store: SqlStore) -> None:
    running = await make_running(store, webhook="https://hook.example/x")
    assert await store.progress(running.id, "w1", {"text": "Hel"}, "step 1\n", ["output", "logs"])
    mid = await store.get(running.id)
    assert mid is not None and (mid.output, mid.logs) == ({"text": "Hel"}, "step 1\n")
    output = {"text": "Hello", "finish_reason": "length"}
    metrics = {"predict_time": 0.25, "output_token_count": 4.0}
    done = await store.finish(running.id, "w1", "succeeded", output, "", "step 1\nstep 2\n", metrics)
    assert done is not None and await store.get(running.id) == done
    assert (done.status, done.output, done.metrics, done.credentials) == ("succeeded", output, metrics, {})
    assert done.completed_at is not None
    events = await store.deliveries_for(running.id)
    assert [d["event"] for d in events] == ["start", "output", "logs", "completed"]
    assert json.loads(events[1]["body"])["output"] == {"text": "Hel"}
    assert json.loads(events[-1]["body"]) == {
        "id": running.id,
        "status": "succeeded",
        "output": output,
        "error": "",
    }
    assert await store.finish(running.id, "w1", "failed", None, "late", "", {}) is None


async def test_a_new_output_or_logs_event_supersedes_the_unsent_ones(store: SqlStore) -> None:
    running = await make_running(store, webhook="https://hook.example/x")
    assert await store.progress(running.id, "w1", {"text": "a"}, "1", ["output", "logs"])
    [_start, first_output, first_logs] = await store.due_deliveries("s1", 10, 30)
    await store.delivered(first_output.id)
    for text in ("ab", "abc"):
        assert await store.progress(running.id, "w1", {"text": text}, text, ["output", "logs"])
    await store.finish(running.id, "w1", "succeeded", {"text": "abcd"}, "", "", {})
    rows = await store.deliveries_for(running.id)
    pending = [(d["event"], json.loads(d["body"])["output"]) for d in rows if d["abandoned_at"] is None]
    assert pending == [
        ("start", None),
        ("output", {"text": "a"}),
        ("output", {"text": "abc"}),
        ("logs", {"text": "abc"}),
        ("completed", {"text": "abcd"}),
    ]
    superseded = [d for d in rows if d["abandoned_at"] is not None]
    assert [(d["event"], json.loads(d["body"])["output"]) for d in superseded] == [
        ("logs", {"text": "a"}),
        ("output", {"text": "ab"}),
        ("logs", {"text": "ab"}),
    ]
    assert all("superseded" in d["last_error"] for d in superseded)
    # Still in flight when superseded: its outcome is recorded, and it is not sent again.
    await store.retry_delivery(first_logs.id, datetime.now(UTC) - timedelta(seconds=1), "HTTP 503")
    due = await store.due_deliveries("s1", 10, 30)
    assert first_logs.id not in {d.id for d in due}


async def test_events_follow_the_webhook_and_its_filter(store: SqlStore) -> None:
    silent = await make_running(store)
    assert await store.progress(silent.id, "w1", {"text": "x"}, "", ["output"])
    await store.finish(silent.id, "w1", "succeeded", {"text": "x"}, "", "", {})
    assert await store.deliveries_for(silent.id) == []

    only_done = await make_running(store, webhook="https://hook.example/x", events=("completed",))
    assert await store.progress(only_done.id, "w1", {"text": "x"}, "l", ["output", "logs"])
    await store.finish(only_done.id, "w1", "failed", None, "boom", "", {})
    [done] = await store.deliveries_for(only_done.id)
    assert done["event"] == "completed" and json.loads(done["body"])["error"] == "boom"

    some = await make_running(store, webhook="https://hook.example/x", events=("start", "logs"))
    assert await store.progress(some.id, "w1", {"text": "x"}, "l", ["output", "logs"])
    await store.finish(some.id, "w1", "succeeded", None, "", "", {})
    assert [d["event"] for d in await store.deliveries_for(some.id)] == ["start", "logs"]


async def test_release_gives_the_prediction_back_after_the_delay(store: SqlStore) -> None:
    running = await make_running(store, webhook="https://hook.example/x")
    assert await store.release(running.id, "w1", 0.3, "retrying\n")
    released = await store.get(running.id)
    assert released is not None and (released.status, released.worker, released.logs) == (
        "starting",
        "",
        "retrying\n",
    )
    assert await store.claim("w2", 30, 1, 3) == []
    await asyncio.sleep(0.35)
    [again] = await store.claim("w2", 30, 1, 3)
    assert (again.attempt, again.worker) == (2, "w2")
    assert [d["event"] for d in await store.deliveries_for(running.id)] == ["start"]


async def test_outbox_hands_each_attempt_to_one_sender(store: SqlStore) -> None:
    running = await make_running(store, webhook="https://hook.example/x")
    [start] = await store.due_deliveries("s1", 10, 30)
    assert (start.event, start.prediction_id, start.attempts) == ("start", running.id, 1)
    assert await store.due_deliveries("s2", 10, 30) == []

    await store.retry_delivery(start.id, datetime.now(UTC) - timedelta(seconds=1), "HTTP 503")
    [again] = await store.due_deliveries("s2", 10, 30)
    assert (again.id, again.body, again.attempts) == (start.id, start.body, 2)
    state = await store.delivery_state(start.id)
    assert state is not None and state["last_error"] == "HTTP 503" and state["locked_by"] == "s2"

    await store.retry_delivery(start.id, datetime.now(UTC) + timedelta(hours=1), "HTTP 429")
    assert await store.due_deliveries("s2", 10, 30) == []
    await store.retry_delivery(start.id, datetime.now(UTC), "HTTP 500")
    [third] = await store.due_deliveries("s1", 10, 0.01)
    await asyncio.sleep(0.05)
    # The lock of a sender that died lapses: another one sends the attempt.
    [fourth] = await store.due_deliveries("s2", 10, 30)
    assert fourth.id == third.id and fourth.attempts == 4
    await store.delivered(start.id)
    state = await store.delivery_state(start.id)
    assert state is not None and state["delivered_at"] is not None

    await store.finish(running.id, "w1", "succeeded", None, "", "", {})
    [completed] = await store.due_deliveries("s1", 10, 30)
    await store.abandon_delivery(completed.id, "gave up after 1 h")
    state = await store.delivery_state(completed.id)
    assert state is not None and state["abandoned_at"] is not None
    await store.retry_delivery(completed.id, datetime.now(UTC) - timedelta(seconds=1), "x")
    assert await store.due_deliveries("s1", 10, 30) == []


async def test_purge_deletes_ended_predictions_and_their_outbox(store: SqlStore) -> None:
    ended = await make_running(store, webhook="https://hook.example/x")
    await store.finish(ended.id, "w1", "succeeded", None, "", "", {})
    for delivery in await store.due_deliveries("s1", 10, 30):
        await store.delivered(delivery.id)
    waiting = await store.create(new(), 0, 0)
    assert await store.purge(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.get(ended.id) is None
    assert await store.deliveries_for(ended.id) == []
    assert await store.get(waiting.id) is not None


async def test_purge_keeps_a_prediction_until_its_webhooks_are_sent_or_abandoned(store: SqlStore) -> None:
    sent = await make_running(store, webhook="https://hook.example/x")
    await store.finish(sent.id, "w1", "succeeded", None, "", "", {})
    given_up = await make_running(store, webhook="https://hook.example/x")
    await store.finish(given_up.id, "w1", "failed", None, "boom", "", {})
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert await store.purge(later) == 0
    assert len(await store.deliveries_for(sent.id)) == 2
    for delivery in await store.due_deliveries("s1", 10, 30):
        if delivery.prediction_id == sent.id:
            await store.delivered(delivery.id)
        elif delivery.event == "completed":
            await store.abandon_delivery(delivery.id, "gave up")
    # given_up's `start` is still pending: it stays; sent's are all delivered.
    assert await store.purge(later) == 1
    assert await store.get(sent.id) is None and await store.get(given_up.id) is not None
    [start] = [d for d in await store.deliveries_for(given_up.id) if d["event"] == "start"]
    await store.delivered(start["id"])
    assert await store.purge(later) == 1
    assert await store.deliveries_for(given_up.id) == []


async def test_purge_deletes_in_batches_of_one_transaction_each(store: SqlStore) -> None:
    for _ in range(5):
        running = await make_running(store)
        await store.finish(running.id, "w1", "succeeded", None, "", "", {})
    commits: list[int] = []
    sa.event.listen(store.engine.sync_engine, "commit", lambda _conn: commits.append(1))
    assert await store.purge(datetime.now(UTC) + timedelta(seconds=1), batch_size=2) == 5
    assert len(commits) == 3
    assert await store.purge(datetime.now(UTC) + timedelta(seconds=1), batch_size=2) == 0


async def test_the_pool_holds_the_size_asked_for(store_url: str) -> None:
    store = await open_store(store_url, render, pool_size=7)
    try:
        assert store.engine.pool.size() == 7  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_listeners_hear_of_each_commit_that_queued_events(store: SqlStore) -> None:
    heard: list[int] = []
    store.on_events(lambda: heard.append(1))
    quiet = await make_running(store)
    assert await store.progress(quiet.id, "w1", {"text": "x"}, "", ["output"])
    await store.finish(quiet.id, "w1", "succeeded", None, "", "", {})
    assert heard == []
    hooked = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    assert heard == []
    await store.claim("w1", 30, 1, 3)
    assert heard == [1]
    assert await store.progress(hooked.id, "w1", {"text": "x"}, "", ["output"])
    await store.finish(hooked.id, "w1", "succeeded", None, "", "", {})
    assert len(heard) == 3
    waiting = await store.create(new(webhook="https://hook.example/x"), 0, 0)
    await store.cancel(waiting.id, None)
    assert len(heard) == 4


async def test_setting_is_made_once_by_whoever_asks_first(open_at: OpenStore) -> None:
    stores = [await open_at(), await open_at()]
    values = await asyncio.gather(
        *(stores[i % 2].setting("webhook_secret", lambda i=i: f"secret-{i}") for i in range(10))  # type: ignore[misc]
    )
    assert len(set(values)) == 1 and values[0].startswith("secret-")
    assert await stores[0].setting("webhook_secret", lambda: "other") == values[0]
    assert await stores[0].setting("another", lambda: "x") == "x"


async def test_deployments_crud(store: SqlStore) -> None:
    schema = {"type": "object", "required": ["prompt"]}
    made = await store.create_deployment(
        Deployment(
            name="poet", model="tiny-gpt2", task="generate", defaults={"max_tokens": 8}, input_schema=schema
        )
    )
    assert made.created_at is not None and made.created_at == made.updated_at
    with pytest.raises(DeploymentExists):
        await store.create_deployment(Deployment(name="poet", model="other", task="chat"))
    assert await store.get_deployment("poet") == made
    assert await store.get_deployment("absent") is None
    await store.create_deployment(Deployment(name="chatty", model="tiny-gpt2", task="chat"))
    assert [d.name for d in await store.list_deployments()] == ["chatty", "poet"]

    changed = await store.update_deployment("poet", {"defaults": {"max_tokens": 16}, "version": "2"})
    assert changed is not None and changed.defaults == {"max_tokens": 16} and changed.version == "2"
    assert changed.input_schema == schema and changed.created_at == made.created_at
    assert (
        changed.updated_at is not None
        and made.updated_at is not None
        and changed.updated_at > made.updated_at
    )
    cleared = await store.update_deployment("poet", {"input_schema": None})
    assert cleared is not None and cleared.input_schema is None
    assert await store.update_deployment("absent", {"version": "3"}) is None
    with pytest.raises(ValueError, match="name"):
        await store.update_deployment("poet", {"name": "x"})
    assert await store.delete_deployment("poet") is True
    assert await store.delete_deployment("poet") is False
    assert await store.get_deployment("poet") is None


async def test_migrations_build_the_schema_the_store_queries(store: SqlStore) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return list(compare_metadata(context, metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_replicas_opening_a_new_database_together_migrate_it_once(open_at: OpenStore) -> None:
    stores = await asyncio.gather(*(open_at() for _ in range(3)))
    created = await stores[0].create(new(), 0, 0)
    assert await stores[2].get(created.id) == created


async def test_migrations_go_down_to_nothing_and_up_again(store: SqlStore, store_url: str) -> None:
    def down_and_up(connection: Connection) -> tuple[set[str], set[str]]:
        config = alembic_config(store_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
        empty = set(sa.inspect(connection).get_table_names()) - {"alembic_version"}
        command.upgrade(config, "head")
        return empty, set(sa.inspect(connection).get_table_names())

    async with store.engine.begin() as conn:
        empty, tables = await conn.run_sync(down_and_up)
    assert empty == set()
    assert tables == {"alembic_version", "predictions", "webhook_deliveries", "deployments", "settings"}
    assert await store.setting("after", lambda: "ok") == "ok"


async def test_an_in_memory_database_works_for_one_process() -> None:
    store = await open_store("sqlite+aiosqlite://", render)
    try:
        made = await asyncio.gather(*(store.create(new(), 0, 0) for _ in range(5)))
        claimed = await asyncio.gather(*(store.claim(f"w{i}", 30, 1, 3) for i in range(5)))
        assert sorted(p.id for got in claimed for p in got) == sorted(p.id for p in made)
    finally:
        await store.close()
