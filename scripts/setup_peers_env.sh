#!/usr/bin/env bash
# Creates .peers-env, the folder that Daft and Ray Data install into for `python -m benchmarks.peers`:
# a `pip install --target` folder put on PYTHONPATH above the job's .venv, so that the peers run on
# the job's interpreter, torch and model packages while the job's requirements never name them.
# A second run skips it while this script is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || { echo "run scripts/setup_env.sh first: the peers run on the job's .venv" >&2; exit 1; }
target=.peers-env
stamp=$target/.mmfeatures-installed
wanted=$(sha256sum scripts/setup_peers_env.sh | cut -d' ' -f1)
[ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && exit 0

echo "installing Daft and Ray into $target (a minute or two the first time)..."
partial=$target.partial
rm -rf "$partial"
mkdir "$partial"
# Nothing in it is the checkout's: keep it out of git and of ruff, as Python 3.13's venv does itself.
echo "*" > "$partial/.gitignore"
# This machine's pip config names local wheel folders; its notes about absent ones are noise, and so
# are the resolver's about the venv's packages (the folder's copies of those are removed below).
.venv/bin/python -m pip --disable-pip-version-check -q install --target "$partial" \
  "daft==0.7.26" "ray==2.60.0" pandas 2>&1 |
  { grep -v -E "^WARNING: Location|^ERROR: pip.s dependency resolver|which is (incompatible|not installed)\.$" || true; }
# Whatever the venv already holds, the venv's copy must win: a second pyarrow or protobuf (Ray pulls
# protobuf 7, Beam's venv holds 6) on PYTHONPATH would shadow the job's and break it in the same
# process. So every distribution the venv has is removed from the folder, files and metadata.
.venv/bin/python - "$partial" <<'EOF'
import importlib.metadata
import sys
from pathlib import Path

folder = Path(sys.argv[1]).resolve()
in_venv = {dist.metadata["Name"].lower().replace("_", "-") for dist in importlib.metadata.distributions()}
for dist in importlib.metadata.distributions(path=[str(folder)]):
    if dist.metadata["Name"].lower().replace("_", "-") in in_venv:
        for file in dist.files or []:  # its RECORD: the package's files and its .dist-info's
            # Scripts are recorded as ../../bin/NAME; pip --target puts them in the folder's bin/.
            path = folder / "bin" / file.name if file.parts[0] == ".." else (folder / file).resolve()
            if path.is_relative_to(folder):  # never a file outside the folder
                path.unlink(missing_ok=True)
for path in sorted(folder.rglob("*"), reverse=True):  # the folders that the removals emptied
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
EOF
PYTHONPATH="$partial" .venv/bin/python -c "
import daft, ray.data, pyarrow, google.protobuf
assert '$partial' not in pyarrow.__file__ + google.protobuf.__file__, 'the venv\'s pyarrow and protobuf must win'"
echo "$wanted" > "$partial/.mmfeatures-installed"
rm -rf "$target"
mv "$partial" "$target"
