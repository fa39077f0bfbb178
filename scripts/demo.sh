#!/usr/bin/env bash
# The main job on a fresh machine: install, preprocess the bundled real scans, pretrain VolTA-3D
# (tiny CPU configuration). Re-running skips cached scans and resumes the pretraining run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED="${SHARED_DATA:-../shared/data}"
OUT="${OUT:-runs/demo}"
.venv/bin/volta3d preprocess --bundled ixi --shared-data "$SHARED" --output "$OUT/prep/ixi" --workers 2 \
  preprocess.size=[64,64,64] preprocess.crop=foreground preprocess.resize=true
.venv/bin/volta3d pretrain --config tiny-cpu --data "$OUT/prep/ixi" --output "$OUT/pretrain" "$@"
