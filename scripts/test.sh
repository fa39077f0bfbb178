#!/usr/bin/env bash
# The test suite: lint, format check (ruff format), type check, then pytest on 2 workers (tiny models, tiny volumes; real-data
# tests read a few scans from ../shared/data and skip when it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -q -n 2 "$@"
