"""A real HTTP webhook receiver for the predictions tests: a threaded server on 127.0.0.1 that
records every request, verifies its Standard Webhooks signature with the `standardwebhooks`
package, and can answer the first N attempts of each webhook-id with a 500."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class Received:
    """One request as it arrived, and what the receiver made of it."""

    webhook_id: str
    headers: dict[str, str]
    body: bytes
    # The HTTP status the receiver answered with.
    answered: int
    # None when the signature verified; otherwise why not (or "no secret" when none was set).
    problem: str | None
    at: float

    @property
    def prediction(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def event(self) -> str:
        """The event this body stands for: completed (a terminal status), output (output
        present), else start. Only exact when the prediction's filter leaves out "logs"."""
        prediction = self.prediction
        if prediction.get("status") in TERMINAL:
            return "completed"
        if prediction.get("output") is not None:
            return "output"
        return "start"


class WebhookReceiver:
    """Records POSTs to any path. `fail_first` attempts per webhook-id are answered 500 (before
    verification, as a crashing endpoint would); the rest 200 when the signature verifies with
    `secret`, else 401."""

    def __init__(self, secret: str | None = None, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._received: list[Received] = []
        self._attempts: dict[str, int] = defaultdict(int)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                status = receiver._judge(headers, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _judge(self, headers: dict[str, str], body: bytes) -> int:
        webhook_id = headers.get("webhook-id", "")
        problem = self.verify(headers, body)
        with self._lock:
            self._attempts[webhook_id] += 1
            failing = self._attempts[webhook_id] <= self.fail_first
            status = 500 if failing else 200 if problem is None else 401
            self._received.append(Received(webhook_id, headers, body, status, problem, time.monotonic()))
            self._changed.notify_all()
        return status

    def verify(self, headers: dict[str, str], body: bytes) -> str | None:
        """None when `body` and `headers` carry a valid signature under the current secret."""
        if self.secret is None:
            return "no secret"
        try:
            Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError as error:
            return str(error) or type(error).__name__
        return None

    @property
    def received(self) -> list[Received]:
        """Every request so far, failed attempts included, in arrival order."""
        with self._lock:
            return list(self._received)

    def accepted(self, prediction_id: str | None = None) -> list[Received]:
        """The requests answered 200 (for one prediction when given)."""
        return [
            item
            for item in self.received
            if item.answered == 200 and (prediction_id is None or item.prediction["id"] == prediction_id)
        ]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        """Waits until `predicate(received)` holds; returns what was received either way."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._received)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            return list(self._received)


@contextmanager
def webhook_receiver(secret: str | None = None, fail_first: int = 0) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret, fail_first).start()
    try:
        yield receiver
    finally:
        receiver.stop()
