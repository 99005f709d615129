#!/usr/bin/env bash
# Lint, format and type checks, as CI runs them, with the versions pinned in the test extras (.venv from
# scripts/install.sh). Every check runs; the ones that failed are named at the end, and the exit status is 1 if any did.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=(src tests bench scripts)
failed=()

run() {
  local name=$1
  shift
  echo "--- $name: $*"
  if ! "$@"; then
    failed+=("$name")
  fi
}

run "ruff check" .venv/bin/ruff check "${PATHS[@]}"
run "ruff format" .venv/bin/ruff format --check "${PATHS[@]}"
run "mypy" .venv/bin/mypy  # what and how: [tool.mypy] in pyproject.toml

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  echo "(ruff check --fix and ruff format repair most lint and format findings)" >&2
  exit 1
fi
echo "all checks passed"
