#!/usr/bin/env bash
# Build the single tabagent-server binary with PyInstaller (packaging/tabagent-server.spec).
#
#   packaging/build.sh                # onedir build: dist/tabagent-server/tabagent-server
#   packaging/build.sh --onefile      # also the onefile binary: dist/tabagent-server-onefile
#   packaging/build.sh --no-models    # without the embedded default models (pull them instead)
#   packaging/build.sh --if-changed   # skip when dist/ was built from these sources already
#
# Sets up the dev environment first (PyInstaller is a dev dependency). PyInstaller's analysis
# cache lives in build/ and makes a rebuild after a small change take a fraction of the first.
set -euo pipefail
cd "$(dirname "$0")/.."
export TABAGENT_BUILD_MODELS=1 TABAGENT_BUILD_ONEFILE=0
if_changed=0
for arg in "$@"; do
  case "$arg" in
    --onefile) TABAGENT_BUILD_ONEFILE=1 ;;
    --no-models) TABAGENT_BUILD_MODELS=0 ;;
    --if-changed) if_changed=1 ;;
    *) echo "usage: packaging/build.sh [--onefile] [--no-models] [--if-changed]" >&2; exit 2 ;;
  esac
done
scripts/setup.sh --dev

# What the binary is made of: our sources (whether or not git is there), the installed
# packages, and the switches. Equal to the stamp of the last build: nothing to do.
stamp=dist/tabagent-server/.source-hash
source_hash=$(
  {
    find tabagent ml_service packaging extension requirements pyproject.toml -type f \
      -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
    .venv/bin/python -m pip freeze --all
    echo "models=$TABAGENT_BUILD_MODELS onefile=$TABAGENT_BUILD_ONEFILE"
  } | sha256sum | cut -d' ' -f1
)
if [[ $if_changed == 1 && -f $stamp && "$(cat "$stamp")" == "$source_hash" ]]; then
  echo "dist/tabagent-server is up to date"
  exit 0
fi
started=$SECONDS
.venv/bin/pyinstaller --noconfirm --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/tabagent-server.spec
echo "$source_hash" > "$stamp"
echo "built dist/tabagent-server in $((SECONDS - started)) s ($(du -sh dist/tabagent-server | cut -f1))"
