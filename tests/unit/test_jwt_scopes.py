"""JWT identities without a process: claim values -> our scopes through the configured map, the
forwarded payload decoded, and `Authentication` choosing the JWT identity or the API key path."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, cast

import grpc
import pytest

from services.common.auth import (
    JwtSettings,
    KeyStore,
    current_claims,
    current_key,
    decode_claims,
    digest,
    jwt_identity,
    jwt_scopes,
    jwt_settings,
    looks_like_jwt,
    parse_scope_map,
)
from services.common.errors import RpcFailure
from services.gateway.auth import Authentication

SETTINGS = JwtSettings(
    scope_map=parse_scope_map("inference:generate=generate,inference:embed=embed,inference:admin=admin")
)
GENERATE = "/inference.v1.GenerationService/Generate"
EMBED = "/inference.v1.EmbeddingService/Embed"


def encoded(claims: dict[str, Any], pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
    return text if pad else text.rstrip("=")


def test_a_space_separated_scope_claim_maps_through_the_map() -> None:
    claims = {"sub": "alice", "scope": "openid inference:generate profile inference:embed"}
    assert jwt_scopes(claims, SETTINGS) == {"generate", "embed"}


def test_a_list_claim_and_our_own_names_map_as_they_are() -> None:
    settings = JwtSettings(scope_claim="roles", scope_map={})
    assert jwt_scopes({"roles": ["admin", "embed", 7, "viewer"]}, settings) == {"admin", "embed"}


def test_a_dotted_scope_claim_reaches_into_nested_claims() -> None:
    settings = JwtSettings(scope_claim="realm_access.roles", scope_map={"llm-user": "generate"})
    assert jwt_scopes({"realm_access": {"roles": ["llm-user", "x"]}}, settings) == {"generate"}
    # A claim whose own name has the dot wins over the nested path.
    assert jwt_scopes({"realm_access.roles": "embed"}, settings) == {"embed"}


def test_a_missing_or_odd_claim_gives_no_scopes() -> None:
    assert jwt_scopes({"sub": "a"}, SETTINGS) == frozenset()
    assert jwt_scopes({"scope": {"generate": True}}, SETTINGS) == frozenset()
    assert jwt_scopes({"scope": "inference:unknown"}, SETTINGS) == frozenset()


def test_the_identity_is_named_after_the_subject_with_default_limits() -> None:
    identity = jwt_identity({"sub": "alice", "scope": "inference:embed"}, SETTINGS)
    assert identity.name == "jwt:alice" and identity.scopes == {"embed"}
    assert identity.requests_per_minute is None and identity.tokens_per_minute is None
    with pytest.raises(ValueError, match="'sub'"):
        jwt_identity({"scope": "embed"}, SETTINGS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inference:generate", "expected 'claim-value=scope'"),
        ("=generate", "expected 'claim-value=scope'"),
        ("x=superuser", "maps to 'superuser'"),
    ],
)
def test_a_bad_scope_map_names_the_setting_and_the_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_scope_map(text, "--jwt-scope-map")
    assert "--jwt-scope-map" in str(caught.value)


def test_a_scope_map_value_may_contain_equals_and_colons() -> None:
    assert parse_scope_map(" a=b=generate , api://x/.default=embed,") == {
        "a=b": "generate",
        "api://x/.default": "embed",
    }


def test_settings_are_off_without_a_header_and_checked_with_one() -> None:
    assert jwt_settings("", "scope", "") is None
    assert jwt_settings("x-jwt-payload", "scope", "a=embed") == JwtSettings(
        "x-jwt-payload", "scope", {"a": "embed"}
    )
    with pytest.raises(ValueError, match="--jwt-claims-header"):
        jwt_settings("X JWT", "scope", "")
    with pytest.raises(ValueError, match="--jwt-scope-claim"):
        jwt_settings("x-jwt-payload", " ", "")


def test_the_forwarded_payload_decodes_padded_or_not() -> None:
    claims = {"sub": "bob", "n": "é" * 5}
    assert decode_claims(encoded(claims)) == claims
    assert decode_claims(encoded(claims, pad=True)) == claims
    for bad in ("%%%", base64.urlsafe_b64encode(b"[1]").decode(), "bm90IGpzb24"):
        with pytest.raises(ValueError):
            decode_claims(bad)


def test_only_three_base64url_parts_look_like_a_jwt() -> None:
    assert looks_like_jwt("eyJh.eyJz.c2ln")
    assert not looks_like_jwt("eyJh.eyJz.")
    assert not looks_like_jwt("sk-test-user-0123")
    assert not looks_like_jwt("a.b.c.d")


class _Metadata:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def authenticate(
    store: KeyStore, jwt: JwtSettings | None, method: str, *metadata: tuple[str, str]
) -> tuple[str, tuple[str, str] | None]:
    """The identity's name and the claims the call carries on, as the method's behaviour sees them."""

    async def behavior(request: object, context: object) -> tuple[str, tuple[str, str] | None]:
        return current_key.get().name, current_claims.get()

    wrapped = Authentication(store, jwt).unary(method, behavior)
    result: tuple[str, tuple[str, str] | None] = await asyncio.wait_for(
        wrapped(None, cast(Any, _Metadata(*metadata))), 5
    )
    return result


def keys(tmp_path: Any) -> KeyStore:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "emb", "sha256": digest("e"), "scopes": ["embed"]}]}))
    return KeyStore(str(path))


async def test_verified_claims_give_the_jwt_identity_and_are_carried_on(tmp_path: Any) -> None:
    payload = encoded({"sub": "alice", "scope": "inference:generate"})
    name, claims = await authenticate(keys(tmp_path), SETTINGS, GENERATE, ("x-jwt-payload", payload))
    assert name == "jwt:alice" and claims == ("x-jwt-payload", payload)


async def test_a_jwt_without_the_scope_is_permission_denied_naming_it(tmp_path: Any) -> None:
    payload = encoded({"sub": "alice", "scope": "inference:generate"})
    with pytest.raises(RpcFailure) as caught:
        await authenticate(keys(tmp_path), SETTINGS, EMBED, ("x-jwt-payload", payload))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'embed' scope" in caught.value.message and "jwt:alice" in caught.value.message


async def test_unusable_claims_are_unauthenticated(tmp_path: Any) -> None:
    with pytest.raises(RpcFailure) as caught:
        await authenticate(keys(tmp_path), SETTINGS, EMBED, ("x-jwt-payload", encoded({"scope": "embed"})))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "'sub'" in caught.value.message


async def test_api_keys_keep_working_beside_jwts(tmp_path: Any) -> None:
    name, claims = await authenticate(keys(tmp_path), SETTINGS, EMBED, ("x-api-key", "e"))
    assert name == "emb" and claims is None


async def test_the_claims_header_is_ignored_when_jwts_are_off(tmp_path: Any) -> None:
    forged = ("x-jwt-payload", encoded({"sub": "mallory", "scope": "admin generate embed"}))
    with pytest.raises(RpcFailure) as caught:
        await authenticate(keys(tmp_path), None, GENERATE, forged, ("x-api-key", "e"))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "'emb'" in caught.value.message
    # An open tier stays open, as before.
    assert await authenticate(KeyStore(), None, GENERATE, forged) == ("anonymous", None)


async def test_with_jwts_on_and_no_keys_a_call_without_credentials_is_refused() -> None:
    with pytest.raises(RpcFailure) as caught:
        await authenticate(KeyStore(), SETTINGS, GENERATE)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing credentials" in caught.value.message


async def test_a_jwt_that_skipped_envoy_is_refused_saying_so(tmp_path: Any) -> None:
    with pytest.raises(RpcFailure) as caught:
        await authenticate(keys(tmp_path), SETTINGS, GENERATE, ("authorization", "Bearer eyJh.eyJz.c2ln"))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "only through Envoy" in caught.value.message
