"""The gateway's configuration (flags and GATEWAY_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from services.common import tls
from services.common.auth import JWT_SCOPE_CLAIM_HELP, JWT_SCOPE_MAP_HELP, jwt_settings
from services.common.config import LogLevel
from services.common.sampling import DEFAULT_LIMITS

RoutingPolicyName = Literal["round_robin", "least_loaded", "prefix_affinity"]
ROUTING_POLICIES: tuple[str, ...] = get_args(RoutingPolicyName)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=50051, metadata={"help": "gRPC port."})
    metrics_port: int = field(default=9101, metadata={"help": "Prometheus metrics port (0 disables)."})
    log_level: LogLevel = field(default="info", metadata={"help": "Logging level."})
    generator_addresses: str = field(
        default="127.0.0.1:50052",
        metadata={"help": "Generator replicas: host:port[,host:port...] or a dns:///name:port target."},
    )
    embedder_addresses: str = field(
        default="127.0.0.1:50053",
        metadata={"help": "Embedder replicas: host:port[,host:port...] or a dns:///name:port target."},
    )
    api_keys_file: str = field(
        default="",
        metadata={
            "help": "JSON file of API keys (sha256 hashes, scopes, limits); reloaded when it changes. "
            "With neither this nor --api-keys the gateway is open."
        },
    )
    api_keys: str = field(default="", metadata={"help": "The same JSON as --api-keys-file, inline."})
    default_requests_per_minute: float = field(
        default=0.0, metadata={"help": "Request rate per key when the key sets none (0: unlimited)."}
    )
    default_tokens_per_minute: float = field(
        default=0.0, metadata={"help": "Token rate per key when the key sets none (0: unlimited)."}
    )
    default_burst: int = field(
        default=0, metadata={"help": "Requests a key may send at once (0: one minute's worth)."}
    )
    cache_size: int = field(
        default=1024, metadata={"help": "Entries of the response cache for deterministic requests (0: off)."}
    )
    retry_attempts: int = field(
        default=3, metadata={"help": "Attempts of a unary backend call that fails with UNAVAILABLE."}
    )
    max_prompt_chars: int = field(default=100_000, metadata={"help": "Longest prompt or message text."})
    max_messages: int = field(default=256, metadata={"help": "Most chat messages in one request."})
    max_new_tokens: int = field(
        default=DEFAULT_LIMITS.max_new_tokens, metadata={"help": "Largest max_new_tokens / max_tokens."}
    )
    max_sequences: int = field(
        default=DEFAULT_LIMITS.max_num_return_sequences,
        metadata={"help": "Largest num_return_sequences, n and num_beams."},
    )
    max_stop_sequences: int = field(
        default=DEFAULT_LIMITS.max_stop_sequences, metadata={"help": "Most stop sequences."}
    )
    max_embedding_inputs: int = field(
        default=2048, metadata={"help": "Most inputs in one embedding request."}
    )
    otlp_endpoint: str = field(
        default="",
        metadata={
            "help": "OTLP/gRPC collector (host:port or URL) for traces; empty: "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else not exported."
        },
    )
    tracing: bool = field(
        default=True, metadata={"help": "Create spans and pass W3C trace context on to the backends."}
    )
    shutdown_grace_s: float = field(
        default=25.0,
        metadata={
            "help": "On SIGTERM, how long calls in flight may take to finish (new calls meanwhile "
            "get UNAVAILABLE with a retry delay); below Kubernetes' 30 s kill."
        },
    )
    redis_url: str = field(
        default="",
        metadata={
            "help": "Redis that holds the rate limits, shared by every gateway (redis://host:port/db, "
            "rediss:// for TLS, unix:///path); empty: each gateway limits on its own."
        },
    )
    redis_key_prefix: str = field(
        default="inference:ratelimit:",
        metadata={"help": "Prefix of the gateway's keys in Redis (one per API key name and limit)."},
    )
    redis_timeout: float = field(
        default=1.0,
        metadata={
            "help": "Seconds one rate-limit check may take in all (waiting for a connection, "
            "connecting, the script) before the gateway decides it on its own buckets."
        },
    )
    redis_max_connections: int = field(
        default=64,
        metadata={
            "help": "Most connections a gateway opens to Redis; further checks queue for one "
            "(within --redis-timeout)."
        },
    )
    redis_retry_seconds: float = field(
        default=1.0,
        metadata={
            "help": "After a Redis failure, seconds on the gateway's own buckets before Redis is tried again."
        },
    )

    tls_ca: str = field(default="", metadata={"help": tls.CA_HELP})
    tls_cert: str = field(default="", metadata={"help": tls.CERT_HELP})
    tls_key: str = field(default="", metadata={"help": tls.KEY_HELP})
    jwt_claims_header: str = field(
        default="",
        metadata={
            "help": "The header in which Envoy forwards the verified claims of a JWT (x-jwt-payload); "
            "empty: JWTs off. Trusted as it comes: set it only when the gateway is reachable "
            "through Envoy alone."
        },
    )
    jwt_scope_claim: str = field(default="scope", metadata={"help": JWT_SCOPE_CLAIM_HELP})
    jwt_scope_map: str = field(default="", metadata={"help": JWT_SCOPE_MAP_HELP})
    model_refresh_seconds: float = field(
        default=10.0,
        metadata={
            "help": "How often the gateway asks every replica what models it serves (also asked when "
            "a replica starts serving); one pool per served model."
        },
    )
    routing_policy: RoutingPolicyName = field(
        default="prefix_affinity",
        metadata={
            "help": "How a replica of a model's pool is picked: round_robin (in turn), least_loaded "
            "(fewest calls in flight, weighed with each replica's load report) or prefix_affinity "
            "(the replica that served the prompt's longest prefix, so its prefix cache hits, "
            "within --routing-load-bound of the least loaded)."
        },
    )
    routing_load_bound: float = field(
        default=1.25,
        metadata={
            "help": "prefix_affinity keeps a request on the replica with its prefix while that "
            "replica's load is at most this times the least loaded replica's (plus "
            "--routing-load-slack); 1..100."
        },
    )
    routing_load_slack: float = field(
        default=2.0,
        metadata={
            "help": "Requests added to the bound of --routing-load-bound, so that a nearly idle pool stays "
            "with the prefix; 0..1000."
        },
    )
    routing_affinity_entries: int = field(
        default=65536,
        metadata={
            "help": "Prefix keys prefix_affinity remembers per pool (one per 64 characters of a prompt "
            "and per chat message, least recently used out first); 1..10000000."
        },
    )

    def validate(self) -> None:
        tls.check_files("GATEWAY", self.tls_ca, self.tls_cert, self.tls_key)
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be 1..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        if not self.generator_addresses.strip() or not self.embedder_addresses.strip():
            raise ValueError("--generator-addresses and --embedder-addresses must not be empty")
        if self.retry_attempts < 1:
            raise ValueError("--retry-attempts must be at least 1")
        if self.cache_size < 0:
            raise ValueError("--cache-size must not be negative")
        jwt_settings(self.jwt_claims_header, self.jwt_scope_claim, self.jwt_scope_map)
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-grace-s must not be negative, got {self.shutdown_grace_s}")
        self.validate_redis()
        if not 0 < self.model_refresh_seconds <= 3600:
            raise ValueError(
                "--model-refresh-seconds must be more than 0 and at most 3600, "
                f"got {self.model_refresh_seconds:g}"
            )
        self.validate_routing()

    def validate_routing(self) -> None:
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(
                f"--routing-policy must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing_policy!r}"
            )
        if not 1.0 <= self.routing_load_bound <= 100.0:
            raise ValueError(f"--routing-load-bound must be 1..100, got {self.routing_load_bound:g}")
        if not 0.0 <= self.routing_load_slack <= 1000.0:
            raise ValueError(f"--routing-load-slack must be 0..1000, got {self.routing_load_slack:g}")
        if not 1 <= self.routing_affinity_entries <= 10_000_000:
            raise ValueError(
                f"--routing-affinity-entries must be 1..10000000, got {self.routing_affinity_entries}"
            )

    def validate_redis(self) -> None:
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = self.redis_url.split("://", 1)[0] if "://" in self.redis_url else ""
            # Only the scheme is shown: the URL may carry a password.
            raise ValueError(
                f"--redis-url must start with redis://, rediss:// or unix:// (got scheme {scheme!r})"
            )
        if not 0 < self.redis_timeout <= 10:
            raise ValueError(
                f"--redis-timeout must be more than 0 and at most 10 seconds, got {self.redis_timeout:g}"
            )
        if not 1 <= self.redis_max_connections <= 10000:
            raise ValueError(f"--redis-max-connections must be 1..10000, got {self.redis_max_connections}")
        if not 0 < self.redis_retry_seconds <= 300:
            raise ValueError(
                f"--redis-retry-seconds must be more than 0 and at most 300, got {self.redis_retry_seconds:g}"
            )
