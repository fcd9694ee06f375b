"""The gateway's method -> scope table over the shared API keys and JWT identities
(services/common/auth.py): the key file format is in docs/architecture.md, JWTs in
docs/using-the-api.md."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from inference.v1 import generation_pb2

from services.common import auth as common_auth
from services.common.auth import ANONYMOUS as ANONYMOUS
from services.common.auth import ANONYMOUS_KEY as ANONYMOUS_KEY
from services.common.auth import SCOPES as SCOPES
from services.common.auth import ApiKey as ApiKey
from services.common.auth import JwtSettings as JwtSettings
from services.common.auth import KeyStore as KeyStore
from services.common.auth import current_key as current_key
from services.common.auth import digest as digest
from services.common.auth import jwt_settings as jwt_settings
from services.common.auth import parse_keys as parse_keys
from services.common.auth import presented_key as presented_key
from services.gateway.errors import ERROR_DOMAIN

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
    _INFO + "WatchLoad": "admin",
    # GetHealth stays open so that probes need no key.
}


class Authentication(common_auth.Authentication):
    """The gateway's authentication: METHOD_SCOPES, failures in the gateway's error domain."""

    def __init__(self, store: KeyStore, jwt: JwtSettings | None = None) -> None:
        super().__init__(store, METHOD_SCOPES, ERROR_DOMAIN, jwt)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.gateway.auth KEY  (prints the sha256 to put in the key file)")
        return 2
    print(digest(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
