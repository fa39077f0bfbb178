"""CSV manifests for the real scans bundled in ``shared/data`` (read in place, never copied).

``ixi.csv``: IXI whole-head T1 (2 mm, stored P-S-R) with age and sex; the 4 subjects without
them keep empty cells. ``msd_hippocampus.csv``: MSD Task04 hippocampus crops (1 mm RAS) with their
manual label maps (0 background, 1 anterior, 2 posterior hippocampus).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from volta3d.errors import InputFileNotFound

BUNDLED = {"ixi": "ixi.csv", "msd": "msd_hippocampus.csv"}
IXI_DIR = "ixi_t1_2mm"
MSD_DIR = "msd_task04_hippocampus"


def default_shared_data() -> Path:
    """``../shared/data`` relative to the working directory (the repository root in this project)."""
    return Path.cwd() / ".." / "shared" / "data"


def write_bundled_manifests(shared_data: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``ixi.csv`` and ``msd_hippocampus.csv`` (absolute paths) into ``out_dir``; return them by key."""
    shared_data = Path(shared_data).resolve()
    sources = {"ixi": shared_data / IXI_DIR / "participants.csv", "msd": shared_data / MSD_DIR / "cases.csv"}
    for path in sources.values():
        if not path.is_file():
            raise InputFileNotFound(f"bundled data not found: {path} (pass --shared-data DIR)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ixi = pd.read_csv(sources["ixi"], dtype={"subject_id": str, "sex": str})
    ixi_root = sources["ixi"].parent
    ixi_manifest = pd.DataFrame(
        {
            "path": [str(ixi_root / p) for p in ixi["t1"]],
            "subject_id": ixi["subject_id"],
            "age": ixi["age"],
            "sex": ixi["sex"],
        }
    )
    msd = pd.read_csv(sources["msd"], dtype=str)
    msd_root = sources["msd"].parent
    msd_manifest = pd.DataFrame(
        {
            "path": [str(msd_root / p) for p in msd["image"]],
            "label_path": [str(msd_root / p) for p in msd["label"]],
            "subject_id": msd["case_id"],
        }
    )
    written = {}
    for key, table in (("ixi", ixi_manifest), ("msd", msd_manifest)):
        written[key] = out_dir / BUNDLED[key]
        table.to_csv(written[key], index=False)
    return written
