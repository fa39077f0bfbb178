#!/usr/bin/env bash
# Representation quality against pretraining budget: the chosen recipe (tiny-cpu + demo) at 1x, 2x, 4x
# and 8x the demo's 8 epochs (688 steps on IXI + MSD), each judged by the recipe study's fixed probe on
# the selection subjects against the raw-volume floor, with the CPU seconds of its pretraining.
#
#   bash benchmarks/scaling.sh [SEEDS...]      (default: seed 0; after the study's prep and `volta3d select`)
#
# Each budget is a recipe-study run of the `chosen` arm into runs/scaling/x{1,2,4,8}; finished runs are
# read back, so the script resumes. The table of each budget is printed and kept as summary.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-0}")
for factor in 1 2 4 8; do
  echo "== ${factor}x the demo's budget ($((8 * factor)) epochs)"
  .venv/bin/python benchmarks/recipe_study.py --arms chosen --seeds "${seeds[@]}" --epochs $((8 * factor)) \
    --output "runs/scaling/x${factor}"
done
