"""API keys shared by every tier that authenticates callers (the gateway and the predictions
service): a JSON key file (reloaded when it changes) or inline JSON, stored as SHA-256 hashes, each
with a name, scopes and its own rate limits. `Authentication` checks each call against a table of
the scope every method needs. The key file format is in docs/architecture.md. With JWTs on, a call
carrying the claims Envoy verified is the identity `jwt:<sub>` with the scopes its claims map to
(docs/using-the-api.md)."""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
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
    ErrorInfo in `domain`. With `jwt`, verified claims win over a key, and the tier is not open."""

    def __init__(
        self,
        store: KeyStore,
        method_scopes: Mapping[str, str],
        domain: str,
        jwt: JwtSettings | None = None,
    ) -> None:
        self._store = store
        self._scopes = method_scopes
        self._domain = domain
        self._jwt = jwt

    def _authenticate(self, method: str, context: Context) -> ApiKey:
        scope = self._scopes.get(method)
        current_claims.set(None)
        if scope is None:
            return ANONYMOUS_KEY
        metadata = tuple(context.invocation_metadata() or ())
        if self._jwt is not None:
            claims = claims_header_value(metadata, self._jwt.claims_header)
            if claims is not None:
                return self._authenticate_jwt(method, scope, claims)
        elif self._store.open:
            return ANONYMOUS_KEY
        key = presented_key(metadata)
        if key is None:
            raise unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                if self._jwt is None
                else "missing credentials: send 'Authorization: Bearer <JWT or API key>' "
                "or 'x-api-key: <key>'",
                "API_KEY_MISSING",
                self._domain,
            )
        entry = self._store.lookup(key)
        if entry is None and self._jwt is not None and looks_like_jwt(key):
            raise unauthenticated(
                "a JWT is accepted only through Envoy, which verifies it", "JWT_UNVERIFIED", self._domain
            )
        if entry is None:
            raise unauthenticated("invalid API key", "API_KEY_INVALID", self._domain)
        if entry.revoked:
            raise unauthenticated(f"API key {entry.name!r} has been revoked", "API_KEY_REVOKED", self._domain)
        if scope and scope not in entry.scopes:
            raise permission_denied(
                f"API key {entry.name!r} lacks the {scope!r} scope needed by {method}", scope, self._domain
            )
        return entry

    def _authenticate_jwt(self, method: str, scope: str, claims: str) -> ApiKey:
        assert self._jwt is not None
        try:
            identity = jwt_identity(decode_claims(claims), self._jwt)
        except ValueError as error:
            raise unauthenticated(
                f"unusable token claims: {error}", "JWT_CLAIMS_INVALID", self._domain
            ) from None
        if scope and scope not in identity.scopes:
            raise permission_denied(
                f"token of {identity.name!r} lacks the {scope!r} scope needed by {method} "
                f"(its {self._jwt.scope_claim!r} claim maps to {sorted(identity.scopes) or 'no scopes'})",
                scope,
                self._domain,
            )
        current_claims.set((self._jwt.claims_header, claims))
        return identity

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


# JWTs: Envoy's jwt_authn filter verifies a bearer token (issuer, audience, signature, lifetime)
# and forwards its payload in a header it sets and strips from clients; the tier trusts that
# header only when configured, so it must then be reachable only through Envoy.

JWT_CLAIMS_HEADER = "x-jwt-payload"
JWT_PREFIX = "jwt:"
# The help of the jwt_scope_claim and jwt_scope_map settings, the same on every tier that has them.
JWT_SCOPE_CLAIM_HELP = (
    "The JWT claim holding the caller's scopes: a space-separated string or a list "
    "(a dotted path reaches into nested claims, e.g. realm_access.roles)."
)
JWT_SCOPE_MAP_HELP = (
    "Claim values to our scopes, value=scope[,...] (e.g. inference:generate=generate); "
    "generate, embed and admin always map to themselves, other values are ignored."
)
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")

# (header, value) of the verified claims of the call being served, None for an API key: the
# predictions tier stores them with a prediction so that its run has the caller's identity.
current_claims: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "current_claims", default=None
)


@dataclass(frozen=True)
class JwtSettings:
    """Where the verified claims arrive and how a claim's values map to our scopes."""

    claims_header: str = JWT_CLAIMS_HEADER
    scope_claim: str = "scope"
    # Claim value -> one of SCOPES; our own scope names always map to themselves.
    scope_map: Mapping[str, str] = field(default_factory=dict)


def parse_scope_map(text: str, setting: str = "jwt_scope_map") -> dict[str, str]:
    """`value=scope[,value=scope...]` -> mapping; raises ValueError naming `setting` and the entry."""
    mapping: dict[str, str] = {}
    for entry in (item.strip() for item in text.split(",")):
        if not entry:
            continue
        value, equals, scope = (part.strip() for part in entry.rpartition("="))
        if not equals or not value:
            raise ValueError(f"{setting}: expected 'claim-value=scope', got {entry!r}")
        if scope not in SCOPES:
            raise ValueError(f"{setting}: {entry!r} maps to {scope!r}; scopes are {', '.join(SCOPES)}")
        mapping[value] = scope
    return mapping


def jwt_settings(
    claims_header: str, scope_claim: str, scope_map: str, prefix: str = "--jwt-"
) -> JwtSettings | None:
    """The settings from a tier's configuration; None when `claims_header` is empty (JWTs off).
    Raises ValueError naming the flag that is wrong."""
    if not claims_header:
        return None
    if not _HEADER_NAME.fullmatch(claims_header):
        raise ValueError(
            f"{prefix}claims-header must be a lower-case header name (letters, digits, '-'), "
            f"got {claims_header!r}"
        )
    if not scope_claim.strip():
        raise ValueError(f"{prefix}scope-claim must not be empty when {prefix}claims-header is set")
    return JwtSettings(claims_header, scope_claim.strip(), parse_scope_map(scope_map, f"{prefix}scope-map"))


_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated base64url parts: the tokens envoy/render.py has Envoy verify."""
    return _JWT_SHAPE.fullmatch(token) is not None


def claims_header_value(metadata: Sequence[tuple[str, str | bytes]], header: str) -> str | None:
    for name, value in metadata:
        if name == header and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def decode_claims(value: str) -> dict[str, Any]:
    """The JSON object in a base64url header value (padded or not); ValueError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error) as error:
        raise ValueError(f"not base64url JSON ({error})") from None
    except RecursionError:
        # json recurses per nesting level: a deep enough value must be refused, not crash the call.
        raise ValueError("not base64url JSON (nested too deeply)") from None
    if not isinstance(claims, dict):
        raise ValueError("the payload is not a JSON object")
    return claims


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    # A dotted path reaches into nested claims (Keycloak's realm_access.roles) unless the claim
    # itself has the dotted name.
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def claim_values(claims: Mapping[str, Any], scope_claim: str) -> list[str]:
    """The claim's values: a space-separated string (OAuth's `scope`) or a list of strings."""
    value = _claim(claims, scope_claim)
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def jwt_scopes(claims: Mapping[str, Any], settings: JwtSettings) -> frozenset[str]:
    """Our scopes for these claims: each claim value through the map (our own names as they
    are); values that map to nothing are ignored."""
    found: set[str] = set()
    for value in claim_values(claims, settings.scope_claim):
        if value in settings.scope_map:
            found.add(settings.scope_map[value])
        elif value in SCOPES:
            found.add(value)
    return frozenset(found)


def jwt_identity(claims: Mapping[str, Any], settings: JwtSettings) -> ApiKey:
    """An ApiKey-like identity `jwt:<sub>` with the mapped scopes and the default rate limits."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise ValueError("the token has no 'sub' claim")
    return ApiKey(name=JWT_PREFIX + subject, digest="", scopes=jwt_scopes(claims, settings))


def claims_expired_at(value: str, now: float) -> float | None:
    """The `exp` of forwarded claims (a base64url header value) when it is at or before `now`;
    None when it is later, absent or the claims are unusable (whoever reads them refuses those)."""
    try:
        exp = decode_claims(value).get("exp")
    except ValueError:
        return None
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp <= now:
        return float(exp)
    return None
