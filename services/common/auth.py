"""API keys shared by every tier that authenticates callers (the gateway and the predictions
service): a JSON key file (reloaded when it changes) or inline JSON, stored as SHA-256 hashes, each
with a name, scopes and its own rate limits. `Authentication` checks each call against a table of
the scope every method needs. The key file format is in docs/architecture.md."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import RpcFailure, error_info
from services.common.interceptors import BehaviorWrapper, Context, StreamBehavior, UnaryBehavior

log = logging.getLogger(__name__)

SCOPES = ("generate", "embed", "admin")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str
    scopes: frozenset[str]
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst: int | None = None
    revoked: bool = False


ANONYMOUS_KEY = ApiKey(ANONYMOUS, "", frozenset(SCOPES))

# The key of the call being served (ANONYMOUS_KEY when the tier is open or the method needs none).
current_key: contextvars.ContextVar[ApiKey] = contextvars.ContextVar("current_key", default=ANONYMOUS_KEY)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, origin: str) -> dict[str, ApiKey]:
    """Digest -> key; raises ValueError naming the entry that is wrong."""
    data = json.loads(text)
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{origin}: expected {{'keys': [...]}}")
    keys: dict[str, ApiKey] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{origin}: key #{number} is not an object")
        hashed = str(entry.get("sha256", "")).lower()
        if len(hashed) != 64:
            raise ValueError(f"{origin}: key #{number} needs 'sha256', the hex digest of the key")
        scopes = frozenset(entry.get("scopes", SCOPES[:2]))
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"{origin}: key #{number} has unknown scopes {sorted(unknown)}")
        keys[hashed] = ApiKey(
            name=str(entry.get("name", f"key{number}")),
            digest=hashed,
            scopes=scopes,
            requests_per_minute=_optional_float(entry.get("requests_per_minute")),
            tokens_per_minute=_optional_float(entry.get("tokens_per_minute")),
            burst=None if entry.get("burst") is None else int(entry["burst"]),
            revoked=bool(entry.get("revoked", False)),
        )
    return keys


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


class KeyStore:
    """The configured keys; empty means the tier is open."""

    def __init__(self, path: str = "", inline: str = "") -> None:
        self._path = Path(path) if path else None
        self._inline = parse_keys(inline, "--api-keys") if inline else {}
        self._from_file: dict[str, ApiKey] = {}
        self._mtime = 0.0
        self._checked = 0.0
        if self._path is not None:
            self._load_file()

    @property
    def open(self) -> bool:
        return self._path is None and not self._inline

    def _load_file(self) -> None:
        assert self._path is not None
        mtime = self._path.stat().st_mtime
        self._from_file = parse_keys(self._path.read_text(), str(self._path))
        self._mtime = mtime

    def _maybe_reload(self) -> None:
        # A revoked key stops working within a second, without a restart.
        now = time.monotonic()
        if self._path is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            if self._path.stat().st_mtime != self._mtime:
                self._load_file()
                log.info("reloaded %d API keys from %s", len(self._from_file), self._path)
        except (OSError, ValueError) as error:
            log.error("keeping the previous API keys: %s", error)

    def lookup(self, key: str) -> ApiKey | None:
        self._maybe_reload()
        hashed = digest(key)
        for table in (self._inline, self._from_file):
            for stored, entry in table.items():
                if hmac.compare_digest(stored, hashed):
                    return entry
        return None


def presented_key(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The key from `authorization: Bearer KEY` or `x-api-key: KEY`."""
    for name, value in metadata:
        if isinstance(value, bytes):
            continue
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and value.strip():
            return value.strip()
    return None


def unauthenticated(message: str, reason: str, domain: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message, (error_info(reason, domain),))


def permission_denied(message: str, scope: str, domain: str) -> RpcFailure:
    info = error_info("MISSING_SCOPE", domain, scope=scope)
    return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, message, (info,))


class Authentication(BehaviorWrapper):
    """Sets `current_key` for each call of a method in `method_scopes` ("" = any valid key; a
    method absent from it needs no key) or fails it UNAUTHENTICATED / PERMISSION_DENIED, with
    ErrorInfo in `domain`."""

    def __init__(self, store: KeyStore, method_scopes: Mapping[str, str], domain: str) -> None:
        self._store = store
        self._scopes = method_scopes
        self._domain = domain

    def _authenticate(self, method: str, context: Context) -> ApiKey:
        scope = self._scopes.get(method)
        if self._store.open or scope is None:
            return ANONYMOUS_KEY
        key = presented_key(tuple(context.invocation_metadata() or ()))
        if key is None:
            raise unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                "API_KEY_MISSING",
                self._domain,
            )
        entry = self._store.lookup(key)
        if entry is None:
            raise unauthenticated("invalid API key", "API_KEY_INVALID", self._domain)
        if entry.revoked:
            raise unauthenticated(f"API key {entry.name!r} has been revoked", "API_KEY_REVOKED", self._domain)
        if scope and scope not in entry.scopes:
            raise permission_denied(
                f"API key {entry.name!r} lacks the {scope!r} scope needed by {method}", scope, self._domain
            )
        return entry

    def unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def authenticated(request: Any, context: Context) -> Any:
            current_key.set(self._authenticate(method, context))
            return await behavior(request, context)

        return authenticated

    def stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def authenticated(request: Any, context: Context) -> AsyncIterator[Any]:
            current_key.set(self._authenticate(method, context))
            async for item in behavior(request, context):
                yield item

        return authenticated
