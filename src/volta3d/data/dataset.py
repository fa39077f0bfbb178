"""A torch Dataset over the ``manifest.csv`` that ``volta3d preprocess`` writes.

Volumes are already preprocessed (RAS, 1 mm, fixed cube, [0, 1]) and cached as ``.npy``, so
``__getitem__`` is one ``np.load`` plus a dtype cast: cheap enough to run every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import Dataset

from volta3d import layout
from volta3d.data.cache import NPY_READ_ERRORS
from volta3d.data.integrity import check_volume_headers, refuse_repeated_rows
from volta3d.errors import InputError, InputFileNotFound, MissingInputError
from volta3d.runtime import check_csv_rows

REQUIRED_COLUMNS = ("subject_id", "path")
PATH_COLUMNS = ("path", "label_path")


def manifest_file(path: str | Path) -> Path:
    """The manifest a ``--data`` argument names: ``manifest.csv`` in a preprocessed folder, or the CSV itself
    (e.g. ``selection.csv`` / ``evaluation.csv`` of ``volta3d select``)."""
    p = Path(path)
    return p / layout.MANIFEST if p.is_dir() else p


def read_preprocessing(data_dir: str | Path) -> dict[str, Any] | None:
    """The ``preprocess:`` section of ``config.yaml`` that ``volta3d preprocess`` wrote into the data
    folder (beside a manifest CSV given as ``--data``: ``volta3d select`` copies it there), or None when
    the folder was made some other way (predict then refuses raw scans)."""
    path = manifest_file(data_dir).parent / layout.CONFIG
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get("preprocess")
    return dict(section) if isinstance(section, dict) else None


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` (or the folder holding it); relative paths become absolute.

    Raises FileNotFoundError / ValueError naming the file or the missing column.
    """
    csv = manifest_file(path)
    if not csv.is_file():
        raise InputFileNotFound(f"manifest not found: {csv}")
    check_csv_rows(csv)
    try:
        table = pd.read_csv(csv, dtype={"subject_id": str, "path": str, "label_path": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot parse manifest {csv}: {' '.join(str(err).split())}") from None
    for col in REQUIRED_COLUMNS:
        if col not in table.columns:
            raise InputError(
                f"manifest {csv} has no '{col}' column (columns: {', '.join(map(str, table.columns))})"
            )
    if table.empty:
        raise InputError(f"manifest {csv} has no rows (every scan was rejected? see rejected.csv)")
    refuse_repeated_rows(table, csv)
    base = csv.resolve().parent
    for col in PATH_COLUMNS:
        if col in table.columns:
            table[col] = [str(base / v) if isinstance(v, str) and v else None for v in table[col]]
    for col in table.columns:  # missing text labels -> "" so a batch of strings collates
        if col not in PATH_COLUMNS and not pd.api.types.is_numeric_dtype(table[col]):
            table[col] = table[col].fillna("")
    return table


def load_volume(path: str, subject_id: object = None) -> np.ndarray:
    """``np.load`` of a cached volume; a missing, truncated or foreign file is a one-line error naming
    it (and the subject), not a bare numpy traceback from inside a DataLoader worker."""
    try:
        return np.load(path, allow_pickle=False)
    except NPY_READ_ERRORS as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (SyntaxError, TokenError)):  # header bytes overwritten: numpy's message is noise
            reason = f"its .npy header does not parse ({type(err).__name__})"
        whose = f" (subject {subject_id})" if subject_id is not None else ""
        raise InputError(
            f"cannot read cached volume {path}{whose}: {reason}; re-run volta3d preprocess"
        ) from None


class VolumeDataset(Dataset):
    """Items ``{"image": (1, D, H, W) float32, "subject_id", "index", <label columns>[, "mask": (1, D, H, W) int64]}``.

    ``transform`` (e.g. MONAI dictionary transforms or the multi-crop view builder) is applied to
    the item dict last.
    """

    def __init__(
        self,
        manifest: str | Path | pd.DataFrame,
        columns: Sequence[str] = (),
        with_mask: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        table = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
        for col in (*REQUIRED_COLUMNS, *columns):
            if col not in table.columns:
                raise MissingInputError(
                    f"manifest has no column '{col}' (columns: {', '.join(map(str, table.columns))})"
                )
        if with_mask:
            if "label_path" not in table.columns:
                raise MissingInputError("with_mask=True but the manifest has no 'label_path' column")
            missing = int(table["label_path"].isna().sum())
            if missing:
                raise InputError(f"with_mask=True but {missing} manifest rows have no 'label_path'")
        self.table = table.reset_index(drop=True)
        check_volume_headers(self.table, with_mask)  # a foreign cube, dtype or rank: refused before training
        self.columns = list(columns)
        self.with_mask = with_mask
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Any:
        row = self.table.iloc[i]
        image = load_volume(row["path"], row["subject_id"]).astype(np.float32, copy=False)  # (1, D, H, W)
        if not np.isfinite(image).all():  # else training fails later, on a NaN loss that names no volume
            raise InputError(
                f"cached volume {row['path']} (subject {row['subject_id']}) holds NaN or Inf voxels, which "
                "volta3d preprocess never writes: delete it and re-run volta3d preprocess"
            )
        item: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "subject_id": str(row["subject_id"]),
            "index": int(i),
        }
        for col in self.columns:
            value = row[col]
            item[col] = value.item() if isinstance(value, np.generic) else value
        if self.with_mask:
            item["mask"] = torch.from_numpy(
                load_volume(row["label_path"], row["subject_id"]).astype(np.int64)
            )
        return self.transform(item) if self.transform is not None else item
