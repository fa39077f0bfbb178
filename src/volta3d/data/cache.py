"""The preprocessed-scan cache: one ``.npy`` volume (+ ``_mask.npy``) and one JSON record per scan.

Why ``.npy``: a preprocessed volume is a small dense cube (96^3 float16 = 1.7 MB) read whole at
every epoch, so the format should cost nothing to decode. ``np.load`` of an uncompressed ``.npy``
is a header parse plus one contiguous read (or a memory map), about a millisecond, where
re-running the pipeline (decompress NIfTI, reorient, resample) costs about a second, and a
compressed NIfTI/HDF5 would spend most of the load in zlib. float16 halves disk and read time;
on [0, 1] intensities its rounding error is below 5e-4. Masks are stored as the smallest unsigned
integer type that holds their labels (uint8 for most). The affine of the output grid, the shape and
the labels live in the JSON record, which also decides whether a re-run can skip the scan:
same source (path, size, modification time, for the image and its mask) and same output settings
(hash). Records are per scan, so shards running on different machines never write the same file,
and a crash loses at most the scan in flight. Files are written to a temporary name and renamed,
and the record last, so a record never points at a half-written volume.
"""

from __future__ import annotations

import hashlib
import json
import re
import tokenize
from pathlib import Path
from typing import Any

import numpy as np

from volta3d import layout
from volta3d.runtime import atomic_write

# What np.load raises for a file that is not a whole .npy: short reads, and a header whose bytes were
# overwritten (numpy parses it as a Python literal: tokenize and syntax errors too).
NPY_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError)


def source_fingerprint(path: str | None) -> dict[str, int] | None:
    """Size and modification time of a file, or of every file in a DICOM series folder."""
    if path is None:
        return None
    p = Path(path)
    try:
        if p.is_file():
            st = p.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.is_dir():
            stats = [f.stat() for f in sorted(p.iterdir()) if f.is_file()]
            return {
                "files": len(stats),
                "size": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
            }
    except OSError as err:  # e.g. a path longer than the system allows: the reader rejects it by name
        return {"unreadable": err.errno or 0}
    return {"missing": 1}


def scan_key(source: str, label_source: str | None = None) -> str:
    """Readable, collision-free cache name: the source's name plus a hash of its full path (and of its
    mask's, since one image may be listed with different masks)."""
    name = re.sub(r"\.nii(\.gz)?$", "", Path(source).name, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "scan"
    identity = source if label_source is None else f"{source}\n{label_source}"
    return f"{name}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def record_path(out_dir: Path, key: str) -> Path:
    return out_dir / layout.RECORDS / f"{key}.json"


def volume_paths(key: str) -> tuple[str, str]:
    """Image and mask paths relative to the output folder (so the folder can be moved)."""
    return f"{layout.CACHE_VOLUMES}/{key}.npy", f"{layout.CACHE_VOLUMES}/{key}_mask.npy"


def save_array(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def save_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1, default=_plain).encode()))


def _plain(value: Any) -> Any:
    """NumPy scalars (labels read by pandas) -> Python numbers for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a cache record")


def load_record(path: Path) -> dict[str, Any] | None:
    """A record, or None when absent, unreadable or not a JSON object (then the scan is recomputed)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def volume_spacing(volume_path: str | Path) -> tuple[float, float, float] | None:
    """Voxel size (mm per axis) of a cached volume, from the output-grid affine its record holds
    (``records/<key>.json`` beside ``volumes/<key>.npy``); None when there is no such record."""
    path = Path(volume_path)
    record = load_record(path.parent.parent / layout.RECORDS / f"{path.stem}.json")
    if record is None or record.get("affine") is None:
        return None
    columns = np.linalg.norm(np.asarray(record["affine"], dtype=float)[:3, :3], axis=0)
    return tuple(float(c) for c in columns)  # type: ignore[return-value]


def mask_dtype(max_label: int) -> type[np.unsignedinteger]:
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16 if max_label <= 65535 else np.uint32


def is_current(
    record: dict[str, Any] | None,
    out_dir: Path,
    source: str,
    label_source: str | None,
    settings_hash: str,
) -> bool:
    """True when the cached result was made from these very files with these output settings."""
    if record is None:
        return False
    same = (
        record.get("source") == source
        and record.get("label_source") == label_source
        and record.get("settings_hash") == settings_hash
        and record.get("source_fingerprint") == source_fingerprint(source)
        and record.get("label_fingerprint") == source_fingerprint(label_source)
    )
    if not same:
        return False
    if record.get("status") == "ok":
        needed = [record.get("path")] + ([record["label_path"]] if record.get("label_path") else [])
        sizes = record.get("sizes")
        if not isinstance(sizes, dict):
            return False  # a record from before sizes were kept, or edited: recompute
        return all(volume_intact(out_dir, p, sizes.get(str(p))) for p in needed)
    return record.get("status") == "rejected"


def inside_volumes(out_dir: Path, rel: object) -> Path | None:
    """The cached file a record names, or None when the name leaves ``out_dir/volumes`` (a record
    must never make the manifest point at, or a re-run trust, a file elsewhere)."""
    if not isinstance(rel, str) or not rel.startswith(f"{layout.CACHE_VOLUMES}/") or Path(rel).is_absolute():
        return None
    root = (out_dir / layout.CACHE_VOLUMES).resolve()
    path = (out_dir / rel).resolve()
    return path if path.parent == root else None


def volume_intact(out_dir: Path, rel: object, size: object) -> bool:
    """A cached ``.npy`` counts only when it sits under the cache, has the size it was written with
    and its header parses: a truncated or overwritten file is recomputed, not trusted."""
    path = inside_volumes(out_dir, rel)
    if path is None or not path.is_file() or path.stat().st_size != size:
        return False
    try:
        np.load(path, mmap_mode="r")
    except NPY_READ_ERRORS:
        return False
    return True
