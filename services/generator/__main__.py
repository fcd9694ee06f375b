"""`python -m services.generator`: serve one causal language model over gRPC."""

from __future__ import annotations

import sys

from services.common.config import load_config
from services.generator.config import DESCRIPTION, PREFIX, GeneratorConfig
from services.generator.server import run


def main() -> int:
    return run(load_config(GeneratorConfig, PREFIX, DESCRIPTION))


if __name__ == "__main__":
    sys.exit(main())
