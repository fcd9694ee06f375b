"""Webhook URL checks, signing, and the sender's delivery, retry and abandon rules, against a real
HTTP receiver on 127.0.0.1 and an in-memory outbox (the SQL store has its own test below)."""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from services.predictions.records import Delivery, Event, NewPrediction, Prediction, Store
from services.predictions.store import open_store
from services.predictions.webhooks import (
    MAX_URL_LENGTH,
    USER_AGENT,
    WebhookSender,
    WebhookSettings,
    backoff_seconds,
    new_secret,
    pinned,
    retry_after_seconds,
    webhook_url_problem,
)
from tests.unit.fakes import eventually, within

SECRET = new_secret()
FAST = WebhookSettings(
    retry_seconds=30.0,
    max_backoff_seconds=0.05,
    timeout_seconds=2.0,
    poll_seconds=0.02,
    concurrency=4,
    allow_private=True,
)


# ---------------------------------------------------------------- a real receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    # What Webhook(SECRET).verify returned, or the error it raised.
    verified: Any


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST, verifies its signature, and answers
    each path from a script: a list of (status, headers, delay) used in turn, then 200."""

    url: str
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str], float]]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    concurrent: int = 0
    most_concurrent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verified: Any = Webhook(SECRET).verify(body, headers)
            except Exception as exc:
                verified = exc
            with state.lock:
                state.requests.append(Received(self.path, headers, body, time.monotonic(), verified))
                state.concurrent += 1
                state.most_concurrent = max(state.most_concurrent, state.concurrent)
                script = state.scripts.get(self.path)
                status, extra, delay = (
                    script.pop(0) if script else (state.always.get(self.path, 200), {}, 0.0)
                )
            try:
                time.sleep(delay)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up on a slow answer
            finally:
                with state.lock:
                    state.concurrent -= 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


# ---------------------------------------------------------------- an in-memory outbox


@dataclass
class Row:
    delivery: Delivery
    state: str = "pending"
    errors: list[str] = field(default_factory=list)
    locked_until: float = 0.0


class FakeOutbox:
    """The four outbox methods of records.Store, in memory, with the SQL store's locking and
    attempt-counting rules."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.fail_polls = 0
        self.limits: list[int] = []

    def add(
        self, url: str, event: Event = "completed", created_at: datetime | None = None, body: str = ""
    ) -> str:
        delivery_id = f"msg_{len(self.rows) + 1}"
        now = datetime.now(UTC)
        self.rows[delivery_id] = Row(
            Delivery(
                id=delivery_id,
                prediction_id="p1",
                event=event,
                url=url,
                body=body or json.dumps({"id": "p1", "status": "succeeded", "output": "héllo"}),
                attempts=0,
                created_at=created_at or now,
                next_attempt_at=now,
            )
        )
        return delivery_id

    async def due_deliveries(self, worker: str, limit: int, lock_seconds: float) -> list[Delivery]:
        self.limits.append(limit)
        if self.fail_polls:
            self.fail_polls -= 1
            raise RuntimeError("database is down")
        now, clock = datetime.now(UTC), time.monotonic()
        due = [
            row
            for row in self.rows.values()
            if row.state == "pending" and row.delivery.next_attempt_at <= now and row.locked_until <= clock
        ][:limit]
        for row in due:
            # Counted on hand-out, as the SQL store does, so a crash mid-send still counts.
            row.delivery = replace(row.delivery, attempts=row.delivery.attempts + 1)
            row.locked_until = clock + lock_seconds
        return [row.delivery for row in due]

    def _attempted(self, delivery_id: str, state: str, error: str = "") -> Row:
        row = self.rows[delivery_id]
        row.state, row.locked_until = state, 0.0
        if error:
            row.errors.append(error)
        return row

    async def delivered(self, delivery_id: str) -> None:
        self._attempted(delivery_id, "delivered")

    async def retry_delivery(self, delivery_id: str, next_attempt_at: datetime, error: str) -> None:
        row = self._attempted(delivery_id, "pending", error)
        row.delivery = replace(row.delivery, next_attempt_at=next_attempt_at)

    async def abandon_delivery(self, delivery_id: str, error: str) -> None:
        self._attempted(delivery_id, "abandoned", error)

    async def settled(self, delivery_id: str) -> Row:
        """The row once delivered or abandoned."""
        await eventually(lambda: self.rows[delivery_id].state != "pending")
        return self.rows[delivery_id]

    async def attempted(self, delivery_id: str, times: int) -> Row:
        """The row once attempted at least `times` times."""
        await eventually(lambda: self.rows[delivery_id].delivery.attempts >= times)
        return self.rows[delivery_id]


@pytest.fixture
def outbox() -> FakeOutbox:
    return FakeOutbox()


@pytest.fixture
async def sender(outbox: FakeOutbox) -> AsyncIterator[WebhookSender]:
    running = WebhookSender(cast(Store, outbox), SECRET, "worker-a", FAST)
    await running.start()
    yield running
    await within(running.stop(grace=1.0))


async def with_sender(outbox: FakeOutbox | Store, settings: WebhookSettings) -> WebhookSender:
    running = WebhookSender(cast(Store, outbox), SECRET, "worker-a", settings)
    await running.start()
    return running


def counted(event: str, outcome: str) -> float:
    labels = {"event": event, "outcome": outcome}
    return REGISTRY.get_sample_value("predictions_webhook_deliveries_total", labels) or 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- URL checks


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.com/hook", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("example.com/hook", "http or https"),
        ("http:///hook", "no host"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://example.com:99999/hook", "not valid"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, f"limit is {MAX_URL_LENGTH}"),
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[fc00::1]/hook", "private"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://[ff02::1]/hook", "multicast"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://100.64.0.1/hook", "non-public"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[64:ff9b::a00:1]/hook", "private"),
        ("http://[2002:7f00:1::]/hook", "loopback"),
        ("http://localhost:8000/hook", "loopback"),
        ("http://nonexistent.invalid/hook", "does not resolve"),
    ],
)
async def test_refused_urls_name_the_reason(url: str, expected: str) -> None:
    problem = await webhook_url_problem(url, allow_private=False)
    assert problem is not None and expected in problem, problem


@pytest.mark.parametrize(
    "url",
    [
        "https://8.8.8.8/hook",
        "http://[2001:4860:4860::8888]:8443/hook?x=1",
        "https://[::ffff:8.8.8.8]/hook",
        "http://1.1.1.1",
    ],
)
async def test_public_addresses_are_accepted(url: str) -> None:
    assert await webhook_url_problem(url, allow_private=False) is None


async def test_allow_private_skips_only_the_address_check() -> None:
    assert await webhook_url_problem("http://localhost:8000/hook", allow_private=True) is None
    assert await webhook_url_problem("http://127.0.0.1/hook", allow_private=True) is None
    assert await webhook_url_problem("http://[::1]:9/hook", allow_private=True) is None
    assert "http or https" in (await webhook_url_problem("file:///etc/passwd", allow_private=True) or "")
    assert "credentials" in (await webhook_url_problem("http://a:b@localhost/", allow_private=True) or "")


def test_pinned_targets_the_address_but_keeps_host_and_server_name() -> None:
    target, host, extensions = pinned(httpx.URL("https://Hooks.Example.com:8443/in?x=1"), "93.184.216.34")
    assert str(target) == "https://93.184.216.34:8443/in?x=1"
    assert host == {"host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    target, host, extensions = pinned(httpx.URL("http://bücher.example/in"), "2001:db8::1")
    assert str(target) == "http://[2001:db8::1]/in"
    assert host == {"host": "xn--bcher-kva.example"}
    assert extensions == {}


# ---------------------------------------------------------------- secret and retry arithmetic


def test_new_secret_is_a_standard_webhooks_key() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 24
    moment = datetime.now(UTC)
    signature = Webhook(first).sign("msg_1", moment, b"{}")
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
    }
    assert Webhook(first).verify(b"{}", headers) == {}
    with pytest.raises(Exception, match="signature"):
        Webhook(second).verify(b"{}", headers)


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (12, 300.0), (10_000, 300.0)):
        samples = [backoff_seconds(attempt, 300.0) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not around the ceiling.
        assert min(samples) < ceiling * 0.2 and max(samples) > ceiling * 0.8


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 2.5 ", now) == 2.5
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(bad, now) is None


# ---------------------------------------------------------------- delivery


async def test_a_delivery_is_signed_and_recorded(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    before = counted("completed", "delivered")
    delivery_id = outbox.add(receiver.url + "/hook")
    sender.wake()
    row = await outbox.settled(delivery_id)
    assert row.state == "delivered" and row.delivery.attempts == 1
    [request] = receiver.at("/hook")
    assert request.verified == json.loads(row.delivery.body), request.verified
    assert request.body == row.delivery.body.encode()
    assert request.headers["webhook-id"] == delivery_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == USER_AGENT
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert counted("completed", "delivered") == before + 1


async def test_a_named_host_is_sent_to_its_checked_address(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    url = receiver.url.replace("127.0.0.1", "localhost") + "/named"
    row = await outbox.settled(outbox.add(url))
    assert row.state == "delivered"
    [request] = receiver.at("/named")
    assert request.headers["host"] == httpx.URL(url).netloc.decode()
    assert isinstance(request.verified, dict)


async def test_the_next_address_is_tried_when_one_refuses(receiver: Receiver, sender: WebhookSender) -> None:
    # 127.0.0.2 is loopback too, but nothing listens there on the receiver's port.
    url = httpx.URL(receiver.url + "/fallback")
    status, _ = await within(sender._post(url, ["127.0.0.2", "127.0.0.1"], b"{}", {}))
    assert status == 200 and len(receiver.at("/fallback")) == 1
    with pytest.raises(httpx.ConnectError):
        await within(sender._post(url, ["127.0.0.2"], b"{}", {}))


async def test_three_failures_then_success_keep_the_webhook_id(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.scripts["/flaky"] = [(500, {}, 0.0)] * 3
    before = counted("completed", "retried")
    delivery_id = outbox.add(receiver.url + "/flaky")
    row = await outbox.settled(delivery_id)
    assert row.state == "delivered" and row.delivery.attempts == 4
    assert row.errors == ["HTTP 500"] * 3
    requests = receiver.at("/flaky")
    assert len(requests) == 4
    assert {r.headers["webhook-id"] for r in requests} == {delivery_id}
    assert all(isinstance(r.verified, dict) for r in requests), [r.verified for r in requests]
    assert counted("completed", "retried") == before + 3


async def test_a_client_error_is_abandoned_after_one_attempt(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.always["/gone"] = 410
    before = counted("completed", "abandoned")
    delivery_id = outbox.add(receiver.url + "/gone")
    row = await outbox.settled(delivery_id)
    assert row.state == "abandoned" and row.errors == ["HTTP 410"]
    await asyncio.sleep(0.1)
    assert len(receiver.at("/gone")) == 1
    assert counted("completed", "abandoned") == before + 1


async def test_redirects_are_not_followed(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.scripts["/moved"] = [(307, {"location": "/elsewhere"}, 0.0)]
    row = await outbox.settled(outbox.add(receiver.url + "/moved"))
    assert row.state == "abandoned" and row.errors == ["HTTP 307"]
    assert receiver.at("/elsewhere") == []


async def test_429_waits_for_its_retry_after(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.scripts["/busy"] = [(429, {"retry-after": "1"}, 0.0)]
    row = await outbox.settled(outbox.add(receiver.url + "/busy"))
    assert row.state == "delivered" and row.errors == ["HTTP 429"]
    first, second = receiver.at("/busy")
    # The backoff alone (capped at 0.05 s here) would have retried at once.
    assert second.at - first.at >= 0.9


async def test_a_retry_after_past_the_window_abandons(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, replace(FAST, retry_seconds=5.0))
    try:
        receiver.scripts["/later"] = [(503, {"retry-after": "3600"}, 0.0)]
        row = await outbox.settled(outbox.add(receiver.url + "/later"))
        assert row.state == "abandoned" and "HTTP 503" in row.errors[0] and "gave up" in row.errors[0]
        assert len(receiver.at("/later")) == 1
    finally:
        await running.stop()


async def test_the_retry_window_ends_in_abandon(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, replace(FAST, retry_seconds=0.4))
    try:
        receiver.always["/down"] = 500
        started = time.monotonic()
        row = await outbox.settled(outbox.add(receiver.url + "/down"))
        assert row.state == "abandoned"
        assert "HTTP 500" in row.errors[-1] and "gave up after 0.4 s" in row.errors[-1]
        assert row.delivery.attempts >= 3 and len(receiver.at("/down")) == row.delivery.attempts
        assert 0.35 <= time.monotonic() - started < 3.0
    finally:
        await running.stop()


async def test_an_old_delivery_gets_one_attempt_then_is_abandoned(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.always["/down"] = 502
    delivery_id = outbox.add(receiver.url + "/down", created_at=datetime.now(UTC) - timedelta(hours=2))
    row = await outbox.settled(delivery_id)
    assert row.state == "abandoned" and row.delivery.attempts == 1


async def test_connection_refused_is_retried(outbox: FakeOutbox, sender: WebhookSender) -> None:
    delivery_id = outbox.add(f"http://127.0.0.1:{free_port()}/hook")
    row = await outbox.attempted(delivery_id, 3)
    assert row.state == "pending"
    assert all("ConnectError" in error for error in row.errors), row.errors


async def test_a_host_that_stops_resolving_is_retried(outbox: FakeOutbox, sender: WebhookSender) -> None:
    row = await outbox.attempted(outbox.add("http://nonexistent.invalid/hook"), 2)
    assert row.state == "pending" and "does not resolve" in row.errors[0]


async def test_a_slow_receiver_times_out_and_is_retried(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, replace(FAST, timeout_seconds=0.2))
    try:
        receiver.scripts["/slow"] = [(200, {}, 1.0)]
        row = await outbox.settled(outbox.add(receiver.url + "/slow"))
        assert row.state == "delivered" and row.delivery.attempts == 2
        assert row.errors == ["timed out after 0.2 s"]
    finally:
        await running.stop()


async def test_completed_is_not_held_back_by_a_retrying_event(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    receiver.always["/output-fails"] = 500
    output_id = outbox.add(receiver.url + "/output-fails", event="output")
    completed_id = outbox.add(receiver.url + "/fine", event="completed")
    row = await outbox.settled(completed_id)
    assert row.state == "delivered"
    assert outbox.rows[output_id].state == "pending" and outbox.rows[output_id].delivery.attempts >= 1


async def test_a_private_address_is_refused_again_at_delivery(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, replace(FAST, allow_private=False))
    try:
        row = await outbox.settled(outbox.add(receiver.url + "/hook"))
        assert row.state == "abandoned" and "loopback" in row.errors[0]
        assert receiver.requests == []
    finally:
        await running.stop()


async def test_sends_at_most_concurrency_at_once(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, replace(FAST, concurrency=2))
    try:
        receiver.scripts["/slow"] = [(200, {}, 0.3)] * 6
        ids = [outbox.add(receiver.url + "/slow") for _ in range(6)]
        for delivery_id in ids:
            assert (await outbox.settled(delivery_id)).state == "delivered"
        assert receiver.most_concurrent == 2
        assert max(outbox.limits) <= 2
    finally:
        await running.stop()


async def test_stop_lets_an_in_flight_send_finish(receiver: Receiver, outbox: FakeOutbox) -> None:
    running = await with_sender(outbox, FAST)
    receiver.scripts["/slow"] = [(200, {}, 0.4)]
    delivery_id = outbox.add(receiver.url + "/slow")

    await eventually(lambda: bool(receiver.at("/slow")))
    await within(running.stop(grace=3.0))
    assert outbox.rows[delivery_id].state == "delivered"


async def test_the_loop_survives_a_failing_store(
    receiver: Receiver, outbox: FakeOutbox, sender: WebhookSender
) -> None:
    outbox.fail_polls = 3
    row = await outbox.settled(outbox.add(receiver.url + "/hook"))
    assert row.state == "delivered" and outbox.fail_polls == 0


# ---------------------------------------------------------------- with the real SQL store


def render(prediction: Prediction) -> str:
    return json.dumps({"id": prediction.id, "status": prediction.status, "error": prediction.error})


async def test_the_sql_store_outbox_is_delivered_once_after_a_retry(
    receiver: Receiver, tmp_path: pathlib.Path
) -> None:
    store = await within(open_store(f"sqlite+aiosqlite:///{tmp_path}/predictions.db", render))
    running: WebhookSender | None = None
    try:
        new = NewPrediction(
            id="p_sql",
            owner="anonymous",
            model="tiny",
            version="1",
            task="generate",
            served_model="tiny",
            input={"prompt": "hi"},
            effective_input={"prompt": "hi"},
            webhook=receiver.url + "/sql",
            webhook_events_filter=("completed",),
            credentials={},
            created_at=datetime.now(UTC),
        )
        await store.create(new, 0, 0)
        # A starting prediction is canceled at once, with its `completed` event in the outbox.
        await store.cancel("p_sql", None)
        receiver.scripts["/sql"] = [(503, {}, 0.0)]
        running = await with_sender(store, FAST)
        await eventually(lambda: len(receiver.at("/sql")) >= 2)

        async def delivered() -> list[dict[str, Any]]:
            while True:
                rows = await store.deliveries_for("p_sql")
                if rows and rows[0]["delivered_at"] is not None:
                    return rows
                await asyncio.sleep(0.02)

        [row] = await within(delivered())
        assert row["attempts"] == 2 and row["abandoned_at"] is None
        requests = receiver.at("/sql")
        assert len(requests) == 2
        assert {r.headers["webhook-id"] for r in requests} == {row["id"]}
        assert all(r.verified == {"id": "p_sql", "status": "canceled", "error": ""} for r in requests)
        # Nothing is left to send: another replica finds no due delivery.
        assert await store.due_deliveries("worker-b", 10, 5.0) == []
    finally:
        if running is not None:
            await within(running.stop())
        await store.close()
