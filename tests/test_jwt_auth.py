"""JWTs at the edge on a real stack: Envoy's jwt_authn filter verifies tokens this test signs
(RS256, a key pair and a JWKS file it makes), the gateway and the predictions service map the
forwarded claims to scopes, and API keys keep working beside them. Each refusal is its own
401/403 with a JSON reason; a client cannot forge the claims header."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from inference.v1 import embedding_pb2, embedding_pb2_grpc
from jwt.algorithms import RSAAlgorithm

from tests.fixtures_gateway import (
    GatewayService,
    descriptor_for_envoy,
    run_envoy,
    start_gateway,
    write_key_file,
)
from tests.fixtures_predictions import FAST_FLAGS, sqlite_url, start_predictions
from tests.stack import ServiceProcess, free_port
from tools.envoy_config import JwtEdge, render_config

ISSUER = "https://login.test/realms/inference"
AUDIENCE = "inference-api"
KID = "test-key-1"
SCOPE_MAP = "inference:generate=generate,inference:embed=embed,inference:admin=admin"
JWT_FLAGS = ("--jwt-claims-header", "x-jwt-payload", "--jwt-scope-map", SCOPE_MAP)


@dataclass
class JwtStack:
    url: str
    gateway: GatewayService
    signing_key: rsa.RSAPrivateKey
    other_key: rsa.RSAPrivateKey
    embedding_model: str
    jwks: Path

    def token(self, key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        """An RS256 token, valid for a minute, for our issuer and audience unless `claims` say else."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 60,
            "scope": "openid inference:generate inference:embed",
        }
        body.update(claims)
        return jwt.encode(body, key or self.signing_key, algorithm="RS256", headers={"kid": KID})

    def bearer(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


def _start_envoy(workdir: Path, gateway: str, predictions: str, edge: JwtEdge) -> tuple[ServiceProcess, str]:
    listen, admin = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(
        render_config(
            listen, admin, gateway, descriptor_for_envoy(), predictions_address=predictions, jwt=edge
        )
    )
    process, url = run_envoy(config, "envoy-jwt", listen)
    return process, url


@pytest.fixture(scope="module")
def stack(
    generator_address: str, embedder_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JwtStack]:
    """Envoy (JWTs from a JWKS file), a gateway with an API key file and JWTs on, and a
    predictions service, all of this module's own."""
    workdir = tmp_path_factory.mktemp("jwt")
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(signing_key.public_key()))
    jwk.update(kid=KID, alg="RS256", use="sig")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    keys_file = workdir / "keys.json"
    keys = write_key_file(keys_file)
    process, address, metrics_port = start_gateway(
        generator_address,
        embedder_address,
        ("--api-keys-file", str(keys_file), *JWT_FLAGS),
        name="gateway-jwt",
    )
    gateway = GatewayService(address, metrics_port, process, keys, keys_file)
    started: list[ServiceProcess] = [process]
    try:
        predictions = start_predictions(
            gateway, sqlite_url(workdir), name="predictions-jwt", args=(*FAST_FLAGS, *JWT_FLAGS)
        )
        started.append(predictions.process)
        edge = JwtEdge(ISSUER, f"{AUDIENCE},another-api", str(jwks))
        envoy, url = _start_envoy(workdir, address, predictions.address, edge)
        started.append(envoy)
        served = httpx2.get(f"{url}/models", headers=gateway.headers(), timeout=30).json()["models"]
        model = str(next(m["id"] for m in served if m["task"] == "embedding"))
        yield JwtStack(url, gateway, signing_key, other_key, model, jwks)
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def rest(stack: JwtStack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=stack.url, timeout=60) as client:
        yield client


def embed(rest: httpx2.Client, stack: JwtStack, headers: dict[str, str]) -> httpx2.Response:
    return rest.post("/embeddings", json={"model": stack.embedding_model, "input": ["hi"]}, headers=headers)


def test_a_valid_token_with_the_scope_is_served(rest: httpx2.Client, stack: JwtStack) -> None:
    reply = embed(rest, stack, stack.bearer(stack.token()))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"]) == 1
    # The second configured audience is accepted too, and a token within the clock skew.
    late = stack.token(aud="another-api", exp=int(time.time()) - 30)
    assert embed(rest, stack, stack.bearer(late)).status_code == 200


@pytest.mark.parametrize(
    ("claims", "other_key", "reason"),
    [
        ({"exp": 1_700_000_000}, False, "Jwt is expired"),
        ({"nbf": 4_000_000_000}, False, "Jwt not yet valid"),
        ({"iss": "https://evil.test"}, False, "Jwt issuer is not configured"),
        ({"aud": "someone-else"}, False, "Audiences in Jwt are not allowed"),
        ({}, True, "Jwt verification fails"),
    ],
    ids=["expired", "not-yet-valid", "wrong-issuer", "wrong-audience", "bad-signature"],
)
def test_a_bad_token_is_a_401_with_its_reason(
    rest: httpx2.Client, stack: JwtStack, claims: dict[str, Any], other_key: bool, reason: str
) -> None:
    token = stack.token(stack.other_key if other_key else None, **claims)
    native = embed(rest, stack, stack.bearer(token))
    assert native.status_code == 401, native.text
    assert native.json() == {"code": 16, "message": reason}
    assert 'error="invalid_token"' in native.headers["www-authenticate"]
    openai = rest.post(
        "/v1/embeddings", json={"model": stack.embedding_model, "input": "hi"}, headers=stack.bearer(token)
    )
    assert openai.status_code == 401, openai.text
    assert openai.json() == {
        "error": {"message": reason, "type": "authentication_error", "param": None, "code": "invalid_token"}
    }


def test_a_token_without_the_scope_is_a_403_naming_it(rest: httpx2.Client, stack: JwtStack) -> None:
    token = stack.token(scope="inference:embed")
    reply = rest.post("/generate", json={"prompt": "hi"}, headers=stack.bearer(token))
    assert reply.status_code == 403, reply.text
    message = reply.json()["message"]
    assert "'generate' scope" in message and "jwt:alice" in message
    openai = rest.post("/v1/completions", json={"model": "x", "prompt": "hi"}, headers=stack.bearer(token))
    assert openai.status_code == 403
    assert openai.json()["error"]["code"] == "missing_scope"


def test_a_forged_claims_header_is_stripped_at_the_edge(rest: httpx2.Client, stack: JwtStack) -> None:
    forged_claims = {"sub": "mallory", "scope": "inference:admin inference:generate inference:embed"}
    forged = {"x-jwt-payload": jwt.utils.base64url_encode(json.dumps(forged_claims).encode()).decode()}
    alone = embed(rest, stack, forged)
    assert alone.status_code == 401, alone.text
    assert "missing credentials" in alone.json()["message"]
    # Beside an API key, the key's own scopes decide.
    with_key = rest.post(
        "/generate", json={"prompt": "hi"}, headers={**forged, **stack.gateway.headers("embed-only")}
    )
    assert with_key.status_code == 403, with_key.text
    assert "'embed-only'" in with_key.json()["message"]
    # Beside a valid token, the verified claims replace it.
    token = stack.token(scope="inference:embed")
    replaced = rest.post("/generate", json={"prompt": "hi"}, headers={**forged, **stack.bearer(token)})
    assert replaced.status_code == 403 and "jwt:alice" in replaced.json()["message"]


def test_api_keys_still_work(rest: httpx2.Client, stack: JwtStack) -> None:
    assert embed(rest, stack, stack.gateway.headers("user")).status_code == 200
    assert embed(rest, stack, {"x-api-key": stack.gateway.keys["embed-only"]}).status_code == 200
    unknown = embed(rest, stack, {"authorization": "Bearer sk-not-a-key"})
    assert unknown.status_code == 401 and unknown.json()["message"] == "invalid API key"


def test_envoys_own_pages_stay_open_to_a_bad_token(rest: httpx2.Client, stack: JwtStack) -> None:
    expired = stack.bearer(stack.token(exp=1_700_000_000))
    assert rest.get("/healthz", headers=expired).status_code == 200
    assert rest.get("/openapi.json", headers=expired).status_code == 200


def test_grpc_clients_send_the_token_as_metadata(stack: JwtStack) -> None:
    request = embedding_pb2.EmbedRequest(model=stack.embedding_model)
    request.input.string_value = "hi"
    with grpc.insecure_channel(stack.url.removeprefix("http://")) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        reply = stub.Embed(request, metadata=(("authorization", f"Bearer {stack.token()}"),), timeout=30)
        assert len(reply.data) == 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(request, metadata=(("authorization", f"Bearer {stack.token(iss='x')}"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "issuer" in (caught.value.details() or "")


def test_a_token_that_skips_envoy_is_refused_by_the_gateway(stack: JwtStack) -> None:
    request = embedding_pb2.EmbedRequest(model=stack.embedding_model)
    request.input.string_value = "hi"
    with grpc.insecure_channel(stack.gateway.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(request, metadata=(("authorization", f"Bearer {stack.token()}"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "only through Envoy" in (caught.value.details() or "")


def test_a_jwt_callers_prediction_runs_as_that_caller(rest: httpx2.Client, stack: JwtStack) -> None:
    headers = {**stack.bearer(stack.token()), "prefer": "wait=30"}
    body = {"model": stack.embedding_model, "input": {"input": ["a cat"]}}
    created = rest.post("/v1/predictions", json=body, headers=headers)
    assert created.status_code == 201, created.text
    prediction = created.json()
    assert prediction["status"] == "succeeded", prediction
    assert len(prediction["output"]["data"]) == 1
    # Its owner is the token's subject: another subject does not see it, an API key neither.
    path = f"/v1/predictions/{prediction['id']}"
    assert rest.get(path, headers=stack.bearer(stack.token())).status_code == 200
    assert rest.get(path, headers=stack.bearer(stack.token(sub="bob"))).status_code == 404
    assert rest.get(path, headers=stack.gateway.headers("user")).status_code == 404
    # Without the embed scope the prediction is refused before it is stored.
    refused = rest.post(
        "/v1/predictions", json=body, headers=stack.bearer(stack.token(scope="inference:generate"))
    )
    assert refused.status_code == 403 and "'embed' scope" in refused.json()["error"]["message"]


def test_keys_from_a_jwks_url_verify_tokens(stack: JwtStack, tmp_path: Path) -> None:
    """A second Envoy fetches the same keys over HTTP from a JWKS server in this process."""
    body = stack.jwks.read_bytes()
    fetched: list[str] = []

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    edge = JwtEdge(ISSUER, AUDIENCE, jwks_url=f"http://127.0.0.1:{server.server_address[1]}/certs")
    envoy, url = _start_envoy(tmp_path, stack.gateway.address, "127.0.0.1:1", edge)
    try:
        body_json = {"model": stack.embedding_model, "input": ["hi"]}
        good = httpx2.post(
            f"{url}/embeddings", json=body_json, headers=stack.bearer(stack.token()), timeout=60
        )
        assert good.status_code == 200, good.text
        forged = stack.bearer(stack.token(stack.other_key))
        bad = httpx2.post(f"{url}/embeddings", json=body_json, headers=forged, timeout=60)
        assert bad.status_code == 401 and bad.json()["message"] == "Jwt verification fails"
        assert fetched and fetched[0] == "/certs"
    finally:
        envoy.stop()
        server.shutdown()
        server.server_close()


def test_the_bearer_scheme_is_matched_in_any_case(rest: httpx2.Client, stack: JwtStack) -> None:
    """`bearer <jwt>` is a JWT for the edge to verify, not an API key passed on to the gateway."""
    expired = embed(rest, stack, {"authorization": f"bearer {stack.token(exp=1_700_000_000)}"})
    assert expired.status_code == 401, expired.text
    assert "only through Envoy" not in expired.json()["message"]
    assert expired.json()["message"] == "Jwt is expired"
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]
    for scheme in ("bearer", "BEARER"):
        live = embed(rest, stack, {"authorization": f"{scheme} {stack.token()}"})
        assert live.status_code == 200, live.text
    # Another spelling is still refused at the edge (Envoy finds no token after it).
    odd = embed(rest, stack, {"authorization": f"beaRer {stack.token()}"})
    assert odd.status_code == 401 and odd.json()["message"] == "Jwt is missing", odd.text
