#!/usr/bin/env bash
# An external-test run on the bundled scans (after `bash scripts/demo.sh`): IXI subjects with an id below
# IXI300 fine-tune, the others are the external test set; ViT from the demo's VolTA-3D encoder vs from
# scratch, paired by `volta3d compare`. Then `volta3d predict` with the demo's models on raw bundled NIfTI
# files (masks in each scan's own grid, Dice against the manual labels where there are some).
# The demo's pretraining saw every IXI scan (labels unused): the test set is external to fine-tuning only.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/volta3d
DEMO=${DEMO:-runs/demo}
OUT=${OUT:-runs/external}
SHARED=${SHARED_DATA:-../shared/data}
.venv/bin/python - "$DEMO/prep/ixi" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path

from volta3d.data.dataset import read_manifest

src, out = Path(sys.argv[1]), Path(sys.argv[2])
table = read_manifest(src)  # paths made absolute
number = table["subject_id"].str.extract(r"IXI(\d+)")[0].astype(int)
for name, part in (("ixi-below300", table[number < 300]), ("ixi-from300", table[number >= 300])):
    (out / name).mkdir(parents=True, exist_ok=True)
    part.to_csv(out / name / "manifest.csv", index=False)
    shutil.copy(src / "config.yaml", out / name / "config.yaml")  # the preprocessing settings travel along
    print(f"{name}: {len(part)} scans, sex {part['sex'].value_counts().to_dict()}")
PY
C=(--config tiny-cpu --config demo --no-progress --data "$OUT/ixi-below300" --test-data "$OUT/ixi-from300" --label sex --model vit)
$V finetune classify "${C[@]}" --output "$OUT/sex-vit-scratch"
$V finetune classify "${C[@]}" --encoder "$DEMO/pretrain" --output "$OUT/sex-volta3d"
$V compare "$OUT/sex-volta3d" "$OUT/sex-vit-scratch"

MSD=$SHARED/msd_task04_hippocampus
$V predict "$DEMO/segment/unetr-volta3d" "$MSD/imagesTr/hippocampus_001.nii.gz" "$MSD/imagesTr/hippocampus_003.nii.gz" \
  --output "$OUT/predict-msd" --no-progress
$V predict "$DEMO/segment/unetr-volta3d" "$SHARED/ixi_t1_2mm/t1/IXI012-HH-1211_T1.nii.gz" --output "$OUT/predict-ixi-seg" --no-progress
$V predict "$DEMO/classify-sex/volta3d" "$SHARED/ixi_t1_2mm/t1/IXI012-HH-1211_T1.nii.gz" \
  "$SHARED/ixi_t1_2mm/t1/IXI013-HH-1212_T1.nii.gz" --output "$OUT/predict-ixi-sex" --no-progress
cat "$OUT/predict-msd/volumes.csv" "$OUT/predict-ixi-sex/predictions.csv"
.venv/bin/python - "$OUT" "$MSD" "$SHARED" <<'PY'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

out, msd, shared = (Path(a) for a in sys.argv[1:])
pairs = [(out / "predict-msd" / f"hippocampus_{c}_seg.nii.gz", msd / "imagesTr" / f"hippocampus_{c}.nii.gz",
          msd / "labelsTr" / f"hippocampus_{c}.nii.gz") for c in ("001", "003")]
pairs.append((out / "predict-ixi-seg" / "IXI012-HH-1211_T1_seg.nii.gz", shared / "ixi_t1_2mm/t1/IXI012-HH-1211_T1.nii.gz", None))
for mask_file, scan_file, label_file in pairs:
    mask, scan = nib.load(mask_file), nib.load(scan_file)
    line = (f"{mask_file.name}: grid {mask.shape} vs scan {scan.shape}, same affine {np.allclose(mask.affine, scan.affine)}, "
            f"axes {''.join(nib.aff2axcodes(mask.affine))}")
    if label_file is not None:
        p, t = np.asarray(mask.dataobj), np.asarray(nib.load(label_file).dataobj)
        dice = [2 * ((p == k) & (t == k)).sum() / max(1, (p == k).sum() + (t == k).sum()) for k in (1, 2)]
        line += f", Dice vs manual labels {dice[0]:.3f} / {dice[1]:.3f}"
    print(line)
PY
