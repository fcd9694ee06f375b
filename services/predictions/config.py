"""The predictions service's configuration (flags and PREDICTIONS_* environment variables)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from services.common import tls
from services.common.auth import JWT_SCOPE_CLAIM_HELP, JWT_SCOPE_MAP_HELP, jwt_settings
from services.common.config import LogLevel


@dataclass(frozen=True)
class PredictionsConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=50054, metadata={"help": "gRPC port."})
    metrics_port: int = field(default=9104, metadata={"help": "Prometheus metrics port (0 disables)."})
    log_level: LogLevel = field(default="info", metadata={"help": "Logging level."})
    database_url: str = field(
        default="sqlite+aiosqlite:///.run/predictions.db",
        metadata={
            "help": "SQLAlchemy URL of the database: SQLite for one replica, "
            "postgresql+psycopg://user@host:port/db for several."
        },
    )
    database_pool_size: int = field(
        default=0,
        metadata={
            "help": "Pooled database connections; 0: derived, concurrency + concurrency/2 (webhook "
            "sends) + 4 (API calls, purge)."
        },
    )
    gateway_address: str = field(
        default="127.0.0.1:50051",
        metadata={"help": "The gateway (host:port) that runs predictions with each caller's credentials."},
    )
    public_url: str = field(
        default="http://localhost:8080",
        metadata={
            "help": "The base URL clients reach the API at (in urls.get/cancel/stream and page links)."
        },
    )
    api_keys_file: str = field(
        default="",
        metadata={
            "help": "The gateway's JSON file of API keys (reloaded when it changes). "
            "With neither this nor --api-keys the service is open."
        },
    )
    api_keys: str = field(default="", metadata={"help": "The same JSON as --api-keys-file, inline."})
    allow_private_webhooks: bool = field(
        default=False, metadata={"help": "Accept webhook URLs on loopback and private addresses."}
    )
    webhook_secret: str = field(
        default="",
        metadata={
            "help": "The Standard Webhooks signing secret (whsec_...); empty: one generated once and "
            "kept in the database, shared by every replica."
        },
    )
    max_waiting_per_key: int = field(
        default=100, metadata={"help": "Predictions one API key may have waiting to start (0: no bound)."}
    )
    max_waiting_total: int = field(
        default=1000, metadata={"help": "Predictions waiting to start, all keys together (0: no bound)."}
    )
    max_input_bytes: int = field(
        default=1 << 20, metadata={"help": "Largest prediction input, as JSON bytes."}
    )
    max_output_bytes: int = field(
        default=4 << 20, metadata={"help": "Largest prediction output, as JSON bytes (larger fails)."}
    )
    max_wait_seconds: int = field(
        default=60, metadata={"help": "The longest hold of a create with `Prefer: wait=N`."}
    )
    retention_seconds: int = field(
        default=86400, metadata={"help": "How long an ended prediction is kept before it is purged."}
    )
    purge_seconds: float = field(
        default=60.0, metadata={"help": "Seconds between purges of old predictions."}
    )
    concurrency: int = field(default=16, metadata={"help": "Predictions one replica runs at once."})
    lease_seconds: float = field(
        default=15.0,
        metadata={"help": "A running prediction's lease; another replica takes it over when it expires."},
    )
    poll_seconds: float = field(
        default=0.5,
        metadata={"help": "Seconds between looks for work (and waits' re-reads) in the database."},
    )
    max_attempts: int = field(
        default=3, metadata={"help": "Runs of a prediction whose worker died before it fails."}
    )
    progress_seconds: float = field(
        default=0.5,
        metadata={
            "help": "The output/logs webhook throttle: at most one partial-output save (and so one "
            "output and one logs event) per prediction per this many seconds (0: every token)."
        },
    )
    predict_timeout_seconds: float = field(
        default=1800.0,
        metadata={"help": "The longest one run's gateway call may take; past it the prediction fails."},
    )
    webhook_retry_seconds: float = field(
        default=3600.0, metadata={"help": "How long a webhook delivery is retried before it is abandoned."}
    )
    webhook_max_backoff_seconds: float = field(
        default=300.0, metadata={"help": "The longest wait between two attempts of a webhook delivery."}
    )
    webhook_timeout_seconds: float = field(default=10.0, metadata={"help": "Timeout of one webhook request."})
    worker_id: str = field(
        default="", metadata={"help": "This replica's name in leases and logs; empty: hostname:pid."}
    )
    jwt_claims_header: str = field(
        default="",
        metadata={
            "help": "The header in which Envoy forwards the verified claims of a JWT (x-jwt-payload); "
            "empty: JWTs off. Trusted as it comes: set it only when the predictions service is reachable "
            "through Envoy alone."
        },
    )
    jwt_scope_claim: str = field(default="scope", metadata={"help": JWT_SCOPE_CLAIM_HELP})
    jwt_scope_map: str = field(default="", metadata={"help": JWT_SCOPE_MAP_HELP})

    tls_ca: str = field(default="", metadata={"help": tls.CA_HELP})
    tls_cert: str = field(default="", metadata={"help": tls.CERT_HELP})
    tls_key: str = field(default="", metadata={"help": tls.KEY_HELP})

    def validate(self) -> None:
        tls.check_files("PREDICTIONS", self.tls_ca, self.tls_cert, self.tls_key)
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be 1..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        if not self.database_url.strip():
            raise ValueError("--database-url must not be empty")
        if not self.gateway_address.strip():
            raise ValueError("--gateway-address must not be empty")
        if not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"--public-url must be an http(s) URL, got {self.public_url!r}")
        if self.webhook_secret and not self.webhook_secret.startswith("whsec_"):
            raise ValueError("--webhook-secret must start with 'whsec_'")
        for name in ("max_waiting_per_key", "max_waiting_total", "database_pool_size", "progress_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        for name in (
            "max_input_bytes",
            "max_output_bytes",
            "max_wait_seconds",
            "retention_seconds",
            "concurrency",
            "max_attempts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in (
            "purge_seconds",
            "lease_seconds",
            "poll_seconds",
            "webhook_retry_seconds",
            "webhook_max_backoff_seconds",
            "webhook_timeout_seconds",
            "predict_timeout_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        jwt_settings(self.jwt_claims_header, self.jwt_scope_claim, self.jwt_scope_map)

    @property
    def pool_size(self) -> int:
        """--database-pool-size, else enough for the runs, the webhook sends and the API at once."""
        return self.database_pool_size or self.concurrency + (self.concurrency + 1) // 2 + 4

    @property
    def worker(self) -> str:
        """This replica's worker name: --worker-id, else hostname:pid."""
        return self.worker_id or f"{socket.gethostname()}:{os.getpid()}"
