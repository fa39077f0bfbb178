#!/usr/bin/env bash
# The output-folder lock tests with real processes (two concurrent pretrain runs, a killed run's resume,
# nested claims, preprocess shards), N times in a row (default 20) beside two CPU hogs.
# Prints "locks stress: P passed, F failed".
exec bash "$(dirname "$0")/stress.sh" locks "${1:-20}" 2 tests/test_hostile_runs.py \
  -k "busy_folder or killed_run or nest or shards"
