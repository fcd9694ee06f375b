"""`python -m services.gateway`: the public gRPC gateway in front of the generator and embedder."""

from __future__ import annotations

import asyncio
import logging

from services.common.config import load_config
from services.gateway.config import GatewayConfig
from services.gateway.server import serve


def main() -> None:
    config = load_config(
        GatewayConfig,
        "GATEWAY",
        "The inference gateway: auth, rate limits, validation, caching, OpenAI compatibility and routing "
        "in front of the generator and embedder backends.",
    )
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
