#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the whole path on the bundled real scans
# (preprocess, pretrain VolTA-3D, classification / probes / segmentation against scratch baselines,
# the HTML report). Re-running skips finished stages. Extra arguments go to `volta3d demo`
# (e.g. --quick for a ~2-minute smoke run, --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/volta3d demo --output "${OUT:-runs/demo}" --shared-data "${SHARED_DATA:-../shared/data}" "$@"
