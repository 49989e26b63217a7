#!/usr/bin/env bash
# Set up (first time only), build the single binary (when its sources changed), and run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
packaging/build.sh --if-changed  # tests/test_binary.py smoke-tests dist/tabagent-server
exec .venv/bin/python -m pytest "$@"
