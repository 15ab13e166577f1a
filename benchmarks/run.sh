#!/usr/bin/env bash
# The throughput benchmark from a fresh clone: sets up .venv like ./run_tests.sh (skipped when done),
# then runs `python -m benchmarks.throughput` with any arguments given (e.g. --quick; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.throughput "$@"
