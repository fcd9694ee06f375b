"""Is a tier ready? grpc.health.v1 for the services, GET /healthz for Envoy (GET /_stcore/health
for the playground, Streamlit's own).

`make run` polls with it, and the container images use it as their health check
(`python -m tools.healthcheck --port 50052`), so both agree on what "ready" means: the service
reports SERVING only once its model is loaded and warmed up. A tier on mutual TLS is checked with
`--tls-env GENERATOR` (its own GENERATOR_TLS_* files) or `--tls-ca/--tls-cert/--tls-key`.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls

# A failed check's status: nothing answered on the port (yet).
UNREACHABLE = "UNREACHABLE"


def grpc_status(
    address: str, service: str = "", timeout: float = 1.0, tls_files: tls.TlsFiles = tls.PLAINTEXT
) -> str:
    """SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN from grpc.health.v1; UNREACHABLE else.
    With a CA in `tls_files` the check speaks TLS (presenting its certificate, where set); with a
    certificate but no CA (a TLS server's own files) it speaks TLS verified against that certificate."""
    with tls.channel(address, tls.self_check_files(tls_files)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return UNREACHABLE
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def http_status(url: str, timeout: float = 1.0) -> str:
    """SERVING when `url` answers 200, NOT_SERVING on another status, UNREACHABLE else."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except (urllib.error.URLError, OSError):
        return UNREACHABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when the tier on this port is SERVING, else 1.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", action="store_true", help="GET --path (Envoy) instead of gRPC health")
    parser.add_argument(
        "--path", default="/healthz", help="with --http: the path that answers 200 when ready"
    )
    parser.add_argument("--service", default="", help="the grpc.health.v1 service name ('' is the server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls-env",
        default="",
        metavar="PREFIX",
        help="take --tls-ca, --tls-cert and --tls-key from PREFIX_TLS_CA, _CERT and _KEY "
        "(e.g. GENERATOR: the service's own files, as in its container)",
    )
    parser.add_argument("--tls-ca", default="", help="CA file: check over TLS, verifying the server")
    parser.add_argument("--tls-cert", default="", help="client certificate for mutual TLS")
    parser.add_argument("--tls-key", default="", help="client key for mutual TLS")
    args = parser.parse_args(argv)
    from_env = tls.env_files(os.environ, args.tls_env) if args.tls_env else tls.PLAINTEXT
    files = tls.TlsFiles(
        args.tls_ca or from_env.ca, args.tls_cert or from_env.cert, args.tls_key or from_env.key
    )
    if args.http:
        status = http_status(f"http://{args.host}:{args.port}{args.path}", args.timeout)
    else:
        status = grpc_status(f"{args.host}:{args.port}", args.service, args.timeout, files)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
