#!/usr/bin/env bash
# Set up (idempotent), then build the built-in Kimi-K2-shaped model (seeded), convert it to NVFP4
# with the built-in calibration text, verify it, and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/nvfp4-jax example "${1:-kimi-k2-tiny}" "${@:2}"
