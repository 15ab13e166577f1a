#!/usr/bin/env bash
# Runs the feature job end to end on the bundled sample data set, on Beam's local runner.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
SAMPLE=${SAMPLE:-sample_data}
OUTPUT=${OUTPUT:-out/local}
[ -f "$SAMPLE/manifest.jsonl" ] || .venv/bin/mmfeatures sample --out "$SAMPLE" --n "${N:-60}"
exec .venv/bin/mmfeatures extract --input "$SAMPLE/manifest.jsonl" --output "$OUTPUT" "$@"
