#!/usr/bin/env bash
# Set up (first time only) and start the TabAgent server. Extra arguments go to tabagent-server,
# e.g. scripts/run.sh --mode web --port 3000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/tabagent-server "$@"
