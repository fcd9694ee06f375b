"""No back doors under `make run`: the generator, embedder, gateway and predictions service (gRPC
and metrics) listen on loopback only, so from another machine only Envoy (and the playground)
answer. Checked on the session's shared `make run` (tests/fixtures_make_run.py): every listening
socket of those processes is on loopback, and a connection to this machine's own non-loopback
address on their ports is refused."""

from __future__ import annotations

import ipaddress
import socket

import psutil
import pytest

from tests.fixtures_make_run import RunningStack

BEHIND_ENVOY = ("generator", "embedder", "gateway", "predictions")


def tier_processes(stack: RunningStack) -> dict[str, psutil.Process]:
    """The process of each tier behind Envoy (`python -m services.<tier>`)."""
    found: dict[str, psutil.Process] = {}
    for process in stack.descendants:
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        for name in BEHIND_ENVOY:
            if f"services.{name}" in command:
                found[name] = process
    return found


def listening(process: psutil.Process) -> list[tuple[str, int]]:
    return [
        (conn.laddr.ip, conn.laddr.port)
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]


def loopback(ip: str) -> bool:
    """127.0.0.1, or the same as IPv6 sees it (a dual-stack socket bound to ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback and ip != "::"


def outside_address() -> str:
    """An IPv4 address of this machine that is not loopback: where another host would connect."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return str(address.address)
    pytest.skip("this machine has no non-loopback IPv4 address to connect from")


def connect_refused(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(3)
        return sock.connect_ex((host, port)) != 0


def test_the_tiers_behind_envoy_listen_on_loopback_only(make_run: RunningStack) -> None:
    processes = tier_processes(make_run)
    assert set(processes) == set(BEHIND_ENVOY), f"found {sorted(processes)}"
    outside = outside_address()
    for name, process in processes.items():
        sockets = listening(process)
        ports = {port for _, port in sockets}
        expected = {make_run.ports[f"{name.upper()}_PORT"], make_run.ports[f"{name.upper()}_METRICS_PORT"]}
        # The check sees the sockets at all: gRPC and metrics, each on its port.
        assert expected <= ports, f"{name} listens on {sockets}, expected {expected}"
        assert all(loopback(ip) for ip, _ in sockets), f"{name} listens on {sockets}"
        for port in sorted(ports):
            assert connect_refused(outside, port), f"{name} answers on {outside}:{port}"
    # The one public door does answer there: the check can tell the difference.
    assert not connect_refused(outside, make_run.ports["ENVOY_PORT"])
