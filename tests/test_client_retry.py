"""Unary calls are retried on UNAVAILABLE by the channel's service config, streams are not.

The server is the real embedder; in front of it sits a loopback TCP relay that drops the first
connection (as a server that is restarting would), so the first attempt fails with UNAVAILABLE
and only a retry can succeed."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from inference_client import NO_RETRY, InferenceClient, RetryPolicy, UnavailableError

TIMEOUT = 20.0


class DroppingRelay:
    """Listens on a free loopback port; resets the first `drop` connections, relays the rest to
    `target` byte for byte."""

    def __init__(self, target: str, drop: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.drop = drop
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(conn)
            self.connections += 1
            if self.connections <= self.drop:
                # SO_LINGER 0: close with a reset, as a port with nothing behind it would.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            self._sockets.append(upstream)
            for source, sink in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def relay(embedder_address: str) -> Iterator[DroppingRelay]:
    relay = DroppingRelay(embedder_address, drop=1)
    yield relay
    relay.close()


def test_unary_call_is_retried_after_unavailable(relay: DroppingRelay) -> None:
    with InferenceClient(relay.address, timeout=TIMEOUT) as client:
        result = client.embed("retried", encoding_format="base64")

    assert len(result.vectors[0]) == result.dimensions > 0
    assert relay.connections == 2


def test_several_failed_attempts_are_retried(embedder_address: str) -> None:
    relay = DroppingRelay(embedder_address, drop=3)
    try:
        with InferenceClient(relay.address, timeout=TIMEOUT, retry=RetryPolicy(max_attempts=5)) as client:
            health = client.health()
    finally:
        relay.close()

    assert health.serving
    assert relay.connections == 4


def test_without_retries_the_same_call_fails_with_unavailable(relay: DroppingRelay) -> None:
    with (
        InferenceClient(relay.address, timeout=TIMEOUT, retry=NO_RETRY) as client,
        pytest.raises(UnavailableError),
    ):
        client.embed("not retried")

    assert relay.connections == 1


def test_streams_are_not_replayed(relay: DroppingRelay) -> None:
    with InferenceClient(relay.address, timeout=TIMEOUT) as client:
        stream = client.stream("never sent", max_new_tokens=2)
        with pytest.raises(UnavailableError):
            list(stream)

    assert relay.connections == 1


def test_closed_port_fails_with_unavailable_after_the_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with InferenceClient(closed, timeout=TIMEOUT) as client, pytest.raises(UnavailableError) as caught:
        client.health()

    assert caught.value.code.name == "UNAVAILABLE"
    assert "connect" in caught.value.message.lower()
