"""Abusive clients at the edge: 100 slowloris connections (half trickle headers, half send a
partial request line and fall silent) are all closed by Envoy's timeouts, and 20 requests with
10 MB bodies are refused with 413 while Envoy's and the gateway's memory stays flat; a normal
request is served meanwhile. Envoy runs with short timeouts rendered for this module."""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.fixtures_gateway import EnvoyService, GatewayService, descriptor_for_envoy, start_envoy
from tests.reliability.figures import report
from tests.test_envoy_edge_limits import (
    HEADERS_TIMEOUT,
    MARGIN,
    REQUEST_TIMEOUT,
    gateway_calls,
    port_of,
    post_body,
    short_timeouts,
)

SLOW_CLIENTS = 100
BODIES = 20
BODY_BYTES = 10_000_000
# Memory that may come and go (allocator caches, a few buffered MiB) without being a leak.
ENVOY_RSS_SLACK_MIB = 48.0
GATEWAY_RSS_SLACK_MIB = 16.0


@pytest.fixture(scope="module")
def abused_edge(
    gateway_service: GatewayService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyService]:
    service = start_envoy(
        gateway_service.address,
        tmp_path_factory.mktemp("abused-envoy"),
        name="abused-envoy",
        descriptor=descriptor_for_envoy(),
        limits=short_timeouts(),
    )
    yield service
    service.process.stop()


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def in_background(work: Callable[[], int]) -> tuple[threading.Thread, list[int | BaseException]]:
    """`work` on a thread; its result (or exception) lands in the list."""
    outcome: list[int | BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # reported by the test, not lost on the thread
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def normal_chat(url: str, gateway: GatewayService, model: str) -> Callable[[], int]:
    def call() -> int:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers=gateway.headers(),
            timeout=120,
        )
        assert reply.json()["choices"], reply.text
        return reply.status_code

    return call


def test_slowloris_connections_are_closed_by_the_timeouts(
    abused_edge: EnvoyService, gateway_service: GatewayService, generation_model: str
) -> None:
    port = port_of(abused_edge.url)
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}
    closed: dict[str, list[float]] = {"trickle": [], "partial_line": []}
    for index in range(SLOW_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        kind = "trickle" if index % 2 == 0 else "partial_line"
        opening = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        sock.sendall(opening if kind == "trickle" else b"POST /v1/ch")
        sock.setblocking(False)
        opened[sock] = (kind, time.monotonic())
        selector.register(sock, selectors.EVENT_READ)
    thread, outcome = in_background(normal_chat(abused_edge.url, gateway_service, generation_model))
    bound = max(HEADERS_TIMEOUT, REQUEST_TIMEOUT) + MARGIN
    deadline = time.monotonic() + bound + 5
    next_trickle = time.monotonic()

    def close(sock: socket.socket) -> None:
        kind, started = opened.pop(sock)
        closed[kind].append(time.monotonic() - started)
        selector.unregister(sock)
        sock.close()

    try:
        while opened and time.monotonic() < deadline:
            if time.monotonic() >= next_trickle:
                # One more header line every half second: never the blank line that ends them.
                for sock, (kind, _) in list(opened.items()):
                    if kind == "trickle":
                        try:
                            sock.send(f"X-Slow-{int(time.monotonic() * 10)}: 1\r\n".encode())
                        except OSError:
                            close(sock)
                next_trickle = time.monotonic() + 0.5
            for key, _ in selector.select(timeout=0.1):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(ready)
    finally:
        for sock in list(opened):
            sock.close()
        selector.close()
    thread.join(timeout=120)
    every = closed["trickle"] + closed["partial_line"]
    report(
        "slowloris",
        connections=SLOW_CLIENTS,
        closed=len(every),
        still_open=len(opened),
        headers_timeout_s=HEADERS_TIMEOUT,
        request_timeout_s=REQUEST_TIMEOUT,
        trickle_closed_max_s=max(closed["trickle"], default=float("nan")),
        partial_line_closed_max_s=max(closed["partial_line"], default=float("nan")),
        closed_median_s=statistics.median(every) if every else float("nan"),
        normal_request=outcome[0] if outcome else "no answer",
    )
    assert not opened, f"{len(opened)} slow connections still open after {bound + 5:.0f} s"
    assert max(every) <= bound, f"a slow connection was closed only after {max(every):.1f} s"
    assert min(every) >= HEADERS_TIMEOUT - 0.5, "a slow connection was closed before its timeout"
    assert outcome == [200], f"a normal request during the abuse failed: {outcome}"


def test_oversized_bodies_are_refused_and_memory_stays_flat(
    abused_edge: EnvoyService, gateway_service: GatewayService, generation_model: str
) -> None:
    port = port_of(abused_edge.url)
    envoy_pid, gateway_pid = abused_edge.process.pid, gateway_service.process.pid
    # One refused body first, so that buffers and connections that are allocated once are counted
    # in the baseline, not as growth.
    assert post_body(port, "/v1/chat/completions", BODY_BYTES, gateway_service.headers()).status == 413
    envoy_before, gateway_before = rss_mib(envoy_pid), rss_mib(gateway_pid)
    calls_before = gateway_calls(gateway_service)
    thread, outcome = in_background(normal_chat(abused_edge.url, gateway_service, generation_model))
    paths = ["/v1/chat/completions", "/v1/completions", "/generate", "/chat"]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(
            pool.map(
                lambda i: post_body(port, paths[i % len(paths)], BODY_BYTES, gateway_service.headers()),
                range(BODIES),
            )
        )
    elapsed = time.monotonic() - started
    thread.join(timeout=120)
    time.sleep(1.0)
    envoy_after, gateway_after = rss_mib(envoy_pid), rss_mib(gateway_pid)
    calls_after = gateway_calls(gateway_service)
    statuses = [reply.status for reply in replies]
    report(
        "oversized_bodies",
        requests=BODIES,
        body_mb=BODY_BYTES / 1e6,
        refused_413=statuses.count(413),
        sent_mib_median=statistics.median(reply.sent for reply in replies) / (1 << 20),
        seconds=elapsed,
        envoy_rss_before_mib=envoy_before,
        envoy_rss_after_mib=envoy_after,
        gateway_rss_before_mib=gateway_before,
        gateway_rss_after_mib=gateway_after,
        gateway_calls_during=calls_after - calls_before,
        normal_request=outcome[0] if outcome else "no answer",
    )
    assert statuses == [413] * BODIES
    assert all(json.loads(reply.body)["error"]["code"] == "request_too_large" for reply in replies[::4])
    # The normal chat is the gateway's only call meanwhile: no oversized body reached it.
    assert outcome == [200], f"a normal request during the abuse failed: {outcome}"
    assert calls_after - calls_before == 1
    assert envoy_after - envoy_before < ENVOY_RSS_SLACK_MIB, (envoy_before, envoy_after)
    assert gateway_after - gateway_before < GATEWAY_RSS_SLACK_MIB, (gateway_before, gateway_after)
