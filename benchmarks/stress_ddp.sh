#!/usr/bin/env bash
# The 2-rank torchrun test under load, N times in a row (default 20): the other pytest worker runs the
# trainer and online-probe tests beside it. Prints "ddp stress: P passed, F failed".
exec bash "$(dirname "$0")/stress.sh" ddp "${1:-20}" 0 -n 2 tests/engine/test_distributed.py \
  tests/engine/test_trainer.py tests/engine/test_online_eval.py
