#!/usr/bin/env bash
# End-to-end seconds per step of the demo's pretraining command (both bundled folders, 2 DataLoader
# workers, the views built as the code under test builds them): the median of metrics.csv's
# seconds_per_step over steps 6..N, after `bash scripts/demo.sh` has preprocessed the scans.
#
#   bash benchmarks/end_to_end_pretrain.sh [STEPS] [SRC]
#
# STEPS (default 60) optimiser steps; SRC (default this checkout's src/) the package to time, e.g. the
# src/ of a checkout of an older commit, to compare before and after on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-60}
src=${2:-src}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PYTHONPATH="$src" .venv/bin/python -m volta3d.cli pretrain --config tiny-cpu --config demo \
  --data runs/demo/prep/ixi --data runs/demo/prep/msd --output "$out/run" --no-progress \
  train.num_workers=2 train.tensorboard=false "train.max_steps=$steps" > "$out/log" 2>&1 || { tail -20 "$out/log"; exit 1; }
.venv/bin/python - "$out/run/metrics.csv" <<'PY'
import statistics
import sys

import pandas as pd

seconds = pd.read_csv(sys.argv[1])["seconds_per_step"].iloc[5:]
print(f"{len(seconds) + 5} steps: median {statistics.median(seconds):.3f} s/step, mean {seconds.mean():.3f}")
PY
