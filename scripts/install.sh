#!/usr/bin/env bash
# Installs llama-orchestrator into ./.venv with its test tools, and the real llama-server (built from source
# once per machine, then taken from ~/.cache/llama-orchestrator). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python scripts/ensure_llama_server.py
