"""Checks of the cached volumes a run is about to read, each a one-line error naming the file.

A scan listed twice is seen twice per epoch (and, under two subject ids, on both sides of a fold); a
volume that is not what ``volta3d preprocess`` writes (another shape than the rest of its folder, an
integer, complex or 3D array, a mask off the image's grid) would train silently on the wrong thing.
The header checks read only the ``.npy`` header, once per file version.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from volta3d import layout
from volta3d.errors import InputError

REPRODUCE = "re-run volta3d preprocess"


def refuse_repeated_rows(table: pd.DataFrame, source: str | Path) -> None:
    """Each scan (image, and mask when there is one) once per manifest: a repeat is named with its lines."""
    key = table["path"].astype(str)
    if "label_path" in table.columns:
        key = key + "\n" + table["label_path"].astype(str)
    repeated = key[key.duplicated(keep=False)]
    if len(repeated):
        lines = [i + 2 for i in repeated.index if key[i] == repeated.iloc[0]][:2]  # + header, 1-based
        raise InputError(
            f"manifest {source} lists {table['path'][lines[0] - 2]} twice (lines {lines[0]} and {lines[1]}); "
            "each scan must appear once: remove the repeat (in the input, then re-run volta3d preprocess)"
        )


def refuse_repeated_volumes(manifest: pd.DataFrame, folders: Sequence[str | Path]) -> None:
    """The volumes of several ``--data`` folders together: the same folder (or manifest) twice, or two
    manifests listing one volume, would weight it twice."""
    seen: dict[Path, str] = {}
    for folder in folders:
        p = Path(folder).resolve()
        manifest_csv = p / layout.MANIFEST if p.is_dir() else p
        if manifest_csv in seen:
            also = "" if seen[manifest_csv] == str(folder) else f" (also as {seen[manifest_csv]})"
            raise InputError(f"--data {folder} is given twice{also}; give each folder once")
        seen[manifest_csv] = str(folder)
    paths = manifest["path"].astype(str)
    repeated = paths[paths.duplicated()]
    if len(repeated):
        raise InputError(
            f"volume {repeated.iloc[0]} is listed by two --data manifests; each volume must appear once"
        )


@functools.cache
def _header(path: str, size: int, mtime_ns: int) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` from a ``.npy`` header; None when it does not parse (the loader then names
    the file when it reads it). ``size`` and ``mtime_ns`` key the cache."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            read = readers.get(np.lib.format.read_magic(f))
            if read is None:  # format 3.0 (text field names): not what preprocessing writes
                return None
            shape, _, dtype = read(f)
    except Exception:  # noqa: BLE001 - any unparsable header: the loader's own message names the file
        return None
    return tuple(shape), dtype


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of a cached ``.npy``, or None when absent or unparsable."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _header(str(path), st.st_size, st.st_mtime_ns)


def _image_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if dtype.kind != "f":
        return f"has dtype {dtype} (volta3d preprocess writes float16 / float32 in [0, 1])"
    if len(shape) != 4:
        return f"has shape {shape}, not (channels, D, H, W)"
    return None


def check_volume_headers(table: pd.DataFrame, with_mask: bool = False) -> None:
    """Every image a real float (C, D, H, W) array with the shape of most volumes of its folder (one
    preprocessing run writes one cube), every mask an integer array on its image's grid."""
    headers = {str(p): read_header(p) for p in table["path"]}
    folders: dict[str, Counter[tuple[int, ...]]] = {}
    for path, header in headers.items():
        if header is not None:
            problem = _image_problem(*header)
            if problem:
                raise InputError(f"cached volume {path} {problem}; {REPRODUCE}")
            folders.setdefault(str(Path(path).parent), Counter())[header[0]] += 1
    usual_shape = {folder: shapes.most_common(1)[0][0] for folder, shapes in folders.items()}
    for path, header in headers.items():
        usual = usual_shape.get(str(Path(path).parent))
        if header is not None and header[0] != usual:
            raise InputError(f"cached volume {path} has shape {header[0]}, the other volumes of its folder "
                             f"{usual}: a volume from another preprocessing run? {REPRODUCE}")  # fmt: skip
    if with_mask:
        for image, mask in zip(table["path"], table["label_path"], strict=True):
            _check_mask_header(str(mask), headers[str(image)])


def _check_mask_header(mask: str, image: tuple[tuple[int, ...], np.dtype] | None) -> None:
    header = read_header(mask)
    if header is None or image is None:
        return
    shape, dtype = header
    if dtype.kind not in "uib":
        raise InputError(f"cached mask {mask} has dtype {dtype}, not integer labels; {REPRODUCE}")
    if shape[-3:] != image[0][-3:] or len(shape) not in (3, 4):
        raise InputError(f"cached mask {mask} has shape {shape}, its image {image[0]}; {REPRODUCE}")


__all__ = ["check_volume_headers", "read_header", "refuse_repeated_rows", "refuse_repeated_volumes"]
