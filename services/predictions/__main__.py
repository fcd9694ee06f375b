"""`python -m services.predictions`: asynchronous predictions with signed webhooks, run through the
gateway and kept in SQL."""

from __future__ import annotations

import asyncio
import logging

from services.common.config import load_config
from services.predictions.config import PredictionsConfig
from services.predictions.server import serve


def main() -> None:
    config = load_config(
        PredictionsConfig,
        "PREDICTIONS",
        "The predictions service: durable asynchronous jobs (as Replicate serves them) run through the "
        "gateway with each caller's credentials, with signed webhooks, kept in SQLite or PostgreSQL.",
    )
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
