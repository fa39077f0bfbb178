"""What a run really read: the content hash of every cached volume and mask it uses.

A resume compares these hashes with the ones its checkpoint (pretraining) or ``fingerprint.json``
(fine-tuning) recorded, so a folder preprocessed again in place, with other settings or from
changed scans, is refused with the changed volume named; the leakage checks group volumes by them.

Each hash is the SHA-256 of the ``.npy`` file's bytes. ``volta3d preprocess`` records it in the
scan's record (``records/<key>.json``, key ``sha256``) when it writes the file, so a check reads one
small JSON per volume instead of the volumes themselves; the record is trusted while the file still
has the size it recorded. A volume without such a record (a folder made by hand, a cache written
before hashes were recorded, a manifest pointing elsewhere) is read and hashed, once per process and
file version (path, size, modification time). Not covered: a volume rewritten by hand to the same
byte size while its record is left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path

from volta3d import layout
from volta3d.data.cache import load_record
from volta3d.errors import InputFileNotFound
from volta3d.runtime import file_sha256

MASK_SUFFIX = "_mask"


@functools.cache
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    """The file's hash; ``size`` and ``mtime_ns`` key the cache, so a rewritten file is read again."""
    return file_sha256(path)


def recorded_sha256(path: Path, size: int) -> str | None:
    """The hash preprocessing recorded for ``path`` (a volume or mask under ``volumes/``), or None."""
    if path.parent.name != layout.CACHE_VOLUMES:
        return None
    rel = f"{layout.CACHE_VOLUMES}/{path.name}"
    for key in dict.fromkeys((path.stem, path.stem.removesuffix(MASK_SUFFIX))):
        record = load_record(path.parent.parent / layout.RECORDS / f"{key}.json")
        hashes, sizes = (record or {}).get("sha256"), (record or {}).get("sizes")
        if isinstance(hashes, dict) and isinstance(sizes, dict) and sizes.get(rel) == size:
            digest = hashes.get(rel)
            if isinstance(digest, str):
                return digest
    return None


def volume_sha256(path: str | Path) -> str:
    """SHA-256 of a cached volume's bytes: from its preprocessing record, else read from the file."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputFileNotFound(f"cached volume not found: {p} (re-run volta3d preprocess)") from None
    return recorded_sha256(p, st.st_size) or _hashed(str(p), st.st_size, st.st_mtime_ns)


def content_hashes(paths: Iterable[object]) -> dict[str, str]:
    """``{path: sha256}`` for every path given (missing values, e.g. no mask, are skipped)."""
    return {str(p): volume_sha256(str(p)) for p in paths if isinstance(p, (str, Path)) and str(p)}


def describe_change(then: Mapping[str, str] | None, now: Mapping[str, str]) -> str | None:
    """What differs between two ``content_hashes`` records, in words naming one volume, or None when
    they agree (or when ``then`` is None: a record written before hashes were kept)."""
    if then is None or dict(then) == dict(now):
        return None
    changed = sorted(p for p in set(then) & set(now) if then[p] != now[p])
    added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
    n = len(changed) + len(added) + len(gone)
    first = (
        f"{changed[0]} changed (content hash)"
        if changed
        else f"{added[0]} was added"
        if added
        else f"{gone[0]} is gone"
    )
    return f"{first}{f' and {n - 1} more volume(s) differ' if n > 1 else ''}"


__all__ = ["content_hashes", "describe_change", "recorded_sha256", "volume_sha256"]
