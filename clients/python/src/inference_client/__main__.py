"""`python -m inference_client` is the `inference-client` command."""

import sys

from inference_client.cli import main

sys.exit(main())
