#!/usr/bin/env bash
# Lint and type check: what CI runs before the tests (`make lint`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
"$BIN/ruff" check src tests benchmarks
"$BIN/ruff" format --check src tests benchmarks
"$BIN/mypy" src
