"""HTTP/2 keepalive that the stack's clients and servers agree on: a server accepts pings as often
as the clients send them, so an idle health watch never ends in GOAWAY too_many_pings."""

from __future__ import annotations

CLIENT_PING_INTERVAL_MS = 30_000
PING_TIMEOUT_MS = 10_000


def client_options(interval_ms: int = CLIENT_PING_INTERVAL_MS) -> list[tuple[str, int]]:
    """Channel options: ping every `interval_ms` while a call is open, drop the link unanswered."""
    return [("grpc.keepalive_time_ms", interval_ms), ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS)]


def server_options(client_interval_ms: int = CLIENT_PING_INTERVAL_MS) -> list[tuple[str, int]]:
    """Server options that accept the clients' pings, with or without calls and data."""
    # gRPC's default minimum is 5 minutes: pings every 30 s on an idle stream (the channel's health
    # watch) counted as strikes and the server closed the link after the third. Half the
    # interval leaves room for the client's timer jitter.
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", client_interval_ms // 2),
    ]
