#!/usr/bin/env bash
# The 2-rank torchrun test under load, N times in a row (default 20): the other pytest worker runs the
# trainer and online-probe tests beside it. Prints "ddp stress: P passed, F failed".
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}; pass=0; fail=0
for i in $(seq 1 "$n"); do
  if .venv/bin/python -m pytest -q -n 2 -p no:cacheprovider tests/engine/test_distributed.py tests/engine/test_trainer.py \
      tests/engine/test_online_eval.py > /dev/null 2>&1; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "run $i failed"; fi
done
echo "ddp stress: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
