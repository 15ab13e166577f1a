#!/usr/bin/env bash
# Creates .venv-feast, Feast's own environment for `mmfeatures feast` and its tests (Feast 0.67 pins
# pandas<3, the job needs pandas 3); a second run skips it while requirements-feast.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv-feast/bin/python ] || python3 -m venv .venv-feast
# Nothing in it is the checkout's: keep it out of git and of ruff, as Python 3.13's venv does itself.
[ -f .venv-feast/.gitignore ] || echo "*" > .venv-feast/.gitignore
stamp=.venv-feast/.mmfeatures-installed
wanted=$(cat requirements-feast.txt scripts/setup_feast_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing Feast into .venv-feast (a minute or two the first time)..."
  # This machine's pip config names local wheel folders; its notes about absent ones are noise.
  pip() { .venv-feast/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
  pip install -r requirements-feast.txt
  echo "$wanted" > "$stamp"
fi
