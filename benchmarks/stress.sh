#!/usr/bin/env bash
# A test that starts processes or threads, N times in a row under load: "A test that fails one run in N
# is a failing test". Optional CPU hogs (`yes`) keep both cores busy beside it.
#
#   bash benchmarks/stress.sh NAME N HOGS PYTEST-ARGS...    e.g. locks 20 2 tests/test_hostile_runs.py -k busy
#
# Prints "NAME stress: P passed, F failed" and fails when any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1; n=$2; hogs=$3; shift 3
pids=()
for _ in $(seq 1 "$hogs"); do yes > /dev/null & pids+=($!); done
trap '[ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null' EXIT
pass=0; fail=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider "$@" > /dev/null 2>&1; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "run $i failed"; fi
done
echo "$name stress: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
