#!/usr/bin/env bash
# Debian packages the tests need (owned by the bring-up work); none yet.
set -euo pipefail
