"""The forwarded JWT claims and the bearer-JWT rule at their edges: claims nested deeper than
the JSON parser recurses are refused as unusable (UNAUTHENTICATED), the bearer scheme is
matched in any case, so `bearer <jwt>` is verified at the edge, not passed on as an API key, and
a prediction whose caller's token expired before it ran fails with a clear error."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time

import pytest

from services.common.auth import claims_expired_at, decode_claims
from tests.unit.fakes import eventually

# The runner's fakes: a gateway over loopback and an in-memory store (fixtures used by name).
from tests.unit.test_predictions_runner import (  # noqa: F401
    FakeGateway,
    FakeStore,
    RunnerFactory,
    gateway,
    gateway_server,
    make_runner,
)
from tools.envoy_config import render_module

HEADER = "x-jwt-payload"


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_deeply_nested_claims_are_refused_with_a_reason_not_a_crash() -> None:
    nested = encode(b'{"sub": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_claims(nested)
    # Nesting within reason still decodes.
    assert decode_claims(encode(b'{"sub": "a", "r": [[["x"]]]}'))["r"] == [[["x"]]]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "beaRer"])
def test_the_bearer_jwt_rule_matches_the_scheme_in_any_case(scheme: str) -> None:
    regex = render_module().JWT_BEARER_REGEX
    assert regex.startswith("(?i)")  # RE2 (Envoy's safe_regex) and Python read it alike
    assert re.search(regex, f"{scheme} eyJh.eyJz.c2ln")
    assert not re.search(regex, f"{scheme} sk-test-user-0123")
    assert not re.search(regex, f"{scheme} a.b.c.d")


def claims(**values: object) -> str:
    return encode(json.dumps({"sub": "alice", **values}).encode())


def test_an_expired_token_is_told_from_a_live_one() -> None:
    now = time.time()
    assert claims_expired_at(claims(exp=now - 5), now) == pytest.approx(now - 5)
    assert claims_expired_at(claims(exp=now + 60), now) is None
    assert claims_expired_at(claims(), now) is None
    assert claims_expired_at(claims(exp="soon"), now) is None
    assert claims_expired_at("%%%", now) is None


async def test_a_prediction_whose_token_expired_before_it_ran_fails_clearly(
    gateway: FakeGateway,  # noqa: F811 (the imported fixture)
    make_runner: RunnerFactory,  # noqa: F811
) -> None:
    store = FakeStore()
    expired = store.add("generate", {"prompt": "hi"})
    live = store.add("generate", {"prompt": "hi"})
    for prediction_id, exp in ((expired, time.time() - 30), (live, time.time() + 600)):
        row = store.rows[prediction_id]
        store.rows[prediction_id] = dataclasses.replace(
            row, credentials={HEADER: claims(exp=exp, scope="inference:generate")}
        )
    await make_runner(store, jwt_claims_header=HEADER)
    await eventually(lambda: store.ended(expired) and store.ended(live))
    row = store.rows[expired]
    assert row.status == "failed"
    assert row.error.startswith("UNAUTHENTICATED: the token this prediction was created with expired at")
    assert store.rows[live].status == "succeeded", store.rows[live].error
    # Only the live one reached the gateway.
    assert len(gateway.requests) == 1
