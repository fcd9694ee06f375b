"""The forwarded JWT claims and the bearer-JWT rule at their edges: claims nested deeper than
the JSON parser recurses are refused as unusable (UNAUTHENTICATED), and the bearer scheme is
matched in any case, so `bearer <jwt>` is verified at the edge, not passed on as an API key."""

from __future__ import annotations

import base64
import re

import pytest

from services.common.auth import decode_claims
from tools.envoy_config import render_module


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
