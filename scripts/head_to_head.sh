#!/usr/bin/env bash
# Head-to-head of encoders on one labelled set, on the same folds, against the raw-pixel floor and a
# random-init / scratch model of the same architecture, in one report:
#   scripts/head_to_head.sh DATA LABEL OUT NAME=ENCODER [NAME=ENCODER ...] [-- volta3d arguments]
#   scripts/head_to_head.sh prep/ixi sex runs/h2h volta3d=runs/paper brainiac=enc/brainiac -- --config paper
# ENCODER: an export folder (a pretraining run, or `volta3d import-encoder`'s). Everything after `--` goes
# to every volta3d command (config files, key=value overrides). Fine-tuning pools the mean patch token for
# every model (an imported encoder brings no CLS-style summariser). The folds come from the first run and
# every other run is given them; the random-init probe and the scratch model take the first encoder's sizes.
# Re-running skips finished fine-tuning folds (volta3d's own resume) and redoes the cheap probes.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,9p' "$0"; exit 2; fi
DATA=$1 LABEL=$2 OUT=$3
shift 3
ENCODERS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ENCODERS+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the `--`
ARGS=("$@")
VOLTA3D=${VOLTA3D:-volta3d}
FIRST=${ENCODERS[0]#*=}
FT=(classify.pooling=mean)

# 1. the scratch baseline (first encoder's architecture, no weights) writes the folds every run reuses
"$VOLTA3D" finetune classify "${ARGS[@]}" --data "$DATA" --label "$LABEL" --like "$FIRST" \
    --output "$OUT/finetune-scratch" "${FT[@]}"
SPLITS=$OUT/finetune-scratch/splits.json

probe() {  # NAME, then `volta3d embed` arguments: embed once, probe on the shared folds
    local name=$1; shift
    mkdir -p "$OUT/embeddings"
    "$VOLTA3D" embed "${ARGS[@]}" "$@" --data "$DATA" --output "$OUT/embeddings/$name.npz" --no-progress
    "$VOLTA3D" probe "${ARGS[@]}" --embeddings "$OUT/embeddings/$name.npz" --data "$DATA" --label "$LABEL" \
        --splits "$SPLITS" --output "$OUT/probe-$name"
}

# 2. the floors: the raw volume and a random-init encoder
probe raw --raw-volume
probe random --encoder "$FIRST" --random-init

# 3. each encoder: frozen-feature probes and fine-tuning on the same folds
for pair in "${ENCODERS[@]}"; do
    name=${pair%%=*} encoder=${pair#*=}
    probe "$name" --encoder "$encoder"
    "$VOLTA3D" finetune classify "${ARGS[@]}" --data "$DATA" --label "$LABEL" --encoder "$encoder" \
        --splits "$SPLITS" --output "$OUT/finetune-$name" "${FT[@]}"
done

# 4. one report: every run against the others, paired over the same subjects
"$VOLTA3D" report "$OUT" --output "$OUT/report"
