"""API keys from a JSON file (reloaded when it changes) or the environment, stored as SHA-256 hashes, each
with scopes and its own rate limits; one interceptor authenticates every call. The key file format is in
docs/architecture.md."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.v1 import generation_pb2

from services.common.interceptors import BehaviorWrapper, Context, StreamBehavior, UnaryBehavior
from services.gateway.errors import permission_denied, unauthenticated

log = logging.getLogger(__name__)

SCOPES = ("generate", "embed", "admin")
ANONYMOUS = "anonymous"

# The scope each method needs; "" means any valid key; absent means no key at all.
_GEN = "/inference.v1.GenerationService/"
_EMB = "/inference.v1.EmbeddingService/"
_OAI = "/inference.v1.OpenAIService/"
_INFO = "/inference.v1.InfoService/"
METHOD_SCOPES: dict[str, str] = {
    # Every generation RPC generates: a method added to the service needs the scope by itself.
    **{
        _GEN + m.name: "generate"
        for m in generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods
    },
    **{
        _OAI + m: "generate"
        for m in (
            "CreateChatCompletion",
            "StreamChatCompletion",
            "StreamChatCompletionEvents",
            "CreateCompletion",
            "StreamCompletion",
            "StreamCompletionEvents",
        )
    },
    _OAI + "CreateEmbedding": "embed",
    _OAI + "ListModels": "",
    _OAI + "RetrieveModel": "",
    _EMB + "Embed": "embed",
    _EMB + "GetCacheStatus": "embed",
    _EMB + "GetModelCounter": "embed",
    _EMB + "PreloadModels": "admin",
    _EMB + "ClearCache": "admin",
    _INFO + "GetStats": "",
    _INFO + "ListServedModels": "",
    # GetHealth stays open so that probes need no key.
}


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
    """The configured keys; empty means the gateway is open."""

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


class Authentication(BehaviorWrapper):
    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def _authenticate(self, method: str, context: Context) -> ApiKey:
        scope = METHOD_SCOPES.get(method)
        if self._store.open or scope is None:
            return ANONYMOUS_KEY
        key = presented_key(tuple(context.invocation_metadata() or ()))
        if key is None:
            raise unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'", "API_KEY_MISSING"
            )
        entry = self._store.lookup(key)
        if entry is None:
            raise unauthenticated("invalid API key", "API_KEY_INVALID")
        if entry.revoked:
            raise unauthenticated(f"API key {entry.name!r} has been revoked", "API_KEY_REVOKED")
        if scope and scope not in entry.scopes:
            raise permission_denied(
                f"API key {entry.name!r} lacks the {scope!r} scope needed by {method}", scope
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


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.gateway.auth KEY  (prints the sha256 to put in the key file)")
        return 2
    print(digest(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
