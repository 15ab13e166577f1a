#!/usr/bin/env bash
# Sets everything up on a fresh machine, then checks lint, format and types, and runs the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh --tests
./scripts/setup_feast_env.sh
echo "ruff check, ruff format --check, mypy..."
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@" tests
