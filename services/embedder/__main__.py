"""`python -m services.embedder`: run the embedder with flags and EMBEDDER_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.embedder.config import load
from services.embedder.server import serve


def main() -> int:
    config = load()
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
