#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh --tests
exec .venv/bin/python -m pytest -q "$@" tests
