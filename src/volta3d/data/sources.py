"""Find the scans of a dataset: a NIfTI folder, DICOM series folders, a BIDS tree or a CSV manifest.

Every kind becomes the same list of :class:`ScanRecord` (source, subject id, optional mask, labels),
so the preprocessor never needs to know where a scan came from. Problems with single scans
(a missing file named in a CSV) are left for the preprocessor to reject; problems with the input as
a whole (missing folder, nothing found, no ``path`` column) raise at once.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d.data.io import NIFTI_SUFFIXES, is_dicom_file, is_nifti
from volta3d.errors import InputError, InputFileNotFound
from volta3d.runtime import check_csv_rows

KINDS = ("auto", "nifti", "dicom", "bids", "csv")
BIDS_T1 = re.compile(r"_T1w\.nii(\.gz)?$")


@dataclass(frozen=True)
class ScanRecord:
    """One scan to preprocess. ``source`` is a NIfTI file or a DICOM series folder."""

    source: str
    subject_id: str
    label_path: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)


def detect_kind(input_path: str | Path) -> str:
    """``csv`` for a .csv/.tsv file; for a folder: ``bids`` (sub-*/anat), ``nifti``, or ``dicom``."""
    p = Path(input_path)
    if not p.exists():
        raise InputFileNotFound(f"input not found: {p}")
    if p.is_file():
        if p.suffix.lower() in (".csv", ".tsv"):
            return "csv"
        raise InputError(f"input {p} is a file but not a .csv/.tsv manifest; give a folder or a manifest")
    if (
        (p / "dataset_description.json").exists()
        or any(p.glob("sub-*/anat"))
        or any(p.glob("sub-*/ses-*/anat"))
    ):
        return "bids"
    if any(is_nifti(f) for f in p.rglob("*")):
        return "nifti"
    if any(f.is_file() and is_dicom_file(f) for f in p.rglob("*")):
        return "dicom"
    raise InputError(f"no scans found in {p} (looked for .nii/.nii.gz files, DICOM series, BIDS sub-*/anat)")


def find_scans(
    input_path: str | Path,
    kind: str = "auto",
    *,
    image_column: str,
    label_path_column: str,
    subject_column: str,
) -> list[ScanRecord]:
    """List the scans of ``input_path`` (sorted, deterministic); a CSV manifest's columns are named by the
    ``preprocess:`` keys of the same names. Raises on an unusable input."""
    if kind not in KINDS:
        raise InputError(f"unknown input kind '{kind}' (choose from {', '.join(KINDS)})")
    p = Path(input_path)
    if not p.exists():
        raise InputFileNotFound(f"input not found: {p}")
    if kind == "auto":
        kind = detect_kind(p)
    if kind == "csv":
        scans = scans_from_csv(p, image_column, label_path_column, subject_column)
    elif not p.is_dir():
        raise InputError(f"input kind '{kind}' needs a folder, got the file {p}")
    elif kind == "nifti":
        scans = scans_from_nifti_folder(p)
    elif kind == "dicom":
        scans = scans_from_dicom_folder(p)
    else:
        scans = scans_from_bids(p)
    if not scans:
        raise InputError(f"no scans found in {p} (input kind '{kind}')")
    return scans


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES[::-1]:  # .nii.gz before .nii
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unique_ids(root: Path, items: list[Path], strip: Callable[[str], str]) -> list[str]:
    """File/folder names as subject ids; where two collide, the path relative to ``root`` instead."""
    short = [strip(p.name) for p in items]
    counts = Counter(short)
    return [
        s if counts[s] == 1 else strip(p.relative_to(root).as_posix()).replace("/", "_")
        for s, p in zip(short, items, strict=True)
    ]


def _absolute(path: Path) -> str:
    """The resolved path; a broken symlink (dangling or looping) keeps its own absolute path, so the
    preprocessor rejects it by name instead of it vanishing from both manifests."""
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):
        return str(path.absolute())


def scans_from_nifti_folder(root: Path) -> list[ScanRecord]:
    """NIfTI files (and symlinks to them, broken ones included), plus any DICOM series folders among
    them: a series in a NIfTI folder is preprocessed, not ignored."""
    files = sorted(f for f in root.rglob("*") if is_nifti(f) and (f.is_file() or f.is_symlink()))
    ids = _unique_ids(root, files, _strip_nifti)
    scans = [ScanRecord(_absolute(f), sid) for f, sid in zip(files, ids, strict=True)]
    folders = sorted(
        {f.parent for f in root.rglob("*") if f.is_file() and not is_nifti(f) and is_dicom_file(f)}
    )
    if folders:
        taken = set(ids)
        series_ids = [sid if sid not in taken else f"{sid}_dicom" for sid in _unique_ids(root, folders, str)]
        scans += [ScanRecord(str(d.resolve()), sid) for d, sid in zip(folders, series_ids, strict=True)]
    return scans


def scans_from_dicom_folder(root: Path) -> list[ScanRecord]:
    """Each folder that directly holds DICOM files is one series (validated when read)."""
    folders = sorted({f.parent for f in root.rglob("*") if f.is_file() and is_dicom_file(f)})
    ids = _unique_ids(root, folders, str)
    return [ScanRecord(str(d.resolve()), sid) for d, sid in zip(folders, ids, strict=True)]


def scans_from_bids(root: Path) -> list[ScanRecord]:
    """``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``; ``participants.tsv`` columns become labels."""
    participants: dict[str, dict[str, Any]] = {}
    tsv = root / "participants.tsv"
    if tsv.exists():
        table = read_table(tsv, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", "N/A", ""])
        if "participant_id" not in table.columns:
            raise InputError(f"{tsv} has no 'participant_id' column")
        table = table.astype(object).where(table.notna(), None)
        for row in table.to_dict("records"):
            pid = row.pop("participant_id")
            participants[pid] = {k: _number_or_text(v) for k, v in row.items()}
    label_names = sorted({k for labels in participants.values() for k in labels})
    files = sorted(
        f
        for pattern in ("sub-*/anat/*", "sub-*/ses-*/anat/*")
        for f in root.glob(pattern)
        if BIDS_T1.search(f.name)
    )
    scans = []
    for f in files:
        sub = f.relative_to(root).parts[0]
        ses = f.relative_to(root).parts[1] if f.relative_to(root).parts[1].startswith("ses-") else ""
        labels = {name: participants.get(sub, {}).get(name) for name in label_names}
        labels["session"] = ses
        scans.append(ScanRecord(str(f.resolve()), sub, None, labels))
    return scans


def _number_or_text(value: Any) -> Any:
    if value is None:
        return None
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV/TSV whose index is each row's line number in the file (blank lines counted, header = 1),
    so a message can send a person to the right line; a file pandas cannot parse is named."""
    check_csv_rows(path, kwargs.get("sep", ","))
    try:
        table = pd.read_csv(path, skip_blank_lines=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"cannot parse {path}: {' '.join(str(err).split())}") from None
    table.index = table.index + 2
    return table.dropna(how="all")


def scans_from_csv(
    path: Path, image_column: str, label_path_column: str, subject_column: str
) -> list[ScanRecord]:
    """Relative paths are relative to the manifest's folder; every other column is a label."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    table = read_table(path, sep=sep, dtype={subject_column: str})  # ids such as 001 stay text
    if image_column not in table.columns:
        raise InputError(
            f"manifest {path} has no '{image_column}' column (columns: {', '.join(map(str, table.columns))})"
        )
    base = path.resolve().parent
    label_cols = [c for c in table.columns if c not in (image_column, label_path_column, subject_column)]
    table = table.astype(object).where(table.notna(), None)
    scans = []
    for line, row in zip(table.index, table.to_dict("records"), strict=True):
        raw = row[image_column]
        source = (
            str(base / str(raw)) if raw is not None else f"{path.name}: line {line} (empty '{image_column}')"
        )
        label = row.get(label_path_column)
        subject = row.get(subject_column)
        if subject is None:
            subject = _strip_nifti(Path(str(raw)).name) if raw is not None else f"line{line}"
        scans.append(
            ScanRecord(
                source=source,
                subject_id=str(subject),
                label_path=str(base / str(label)) if label is not None else None,
                labels={c: row[c] for c in label_cols},
            )
        )
    return scans
