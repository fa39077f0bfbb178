"""What an encoder was pretrained on, and how a downstream dataset relates to it.

Self-supervised pretraining uses no labels, so pretraining on the very scans a downstream test
later scores is legitimate (transductive) but must be said: the encoder has seen those volumes.
``pretrain`` records in ``encoder.json`` the subject ids, a content hash of every volume and the
preprocessing settings of each data folder; downstream commands count how many of their test
subjects (by id) and test volumes (by content) the encoder saw, and warn in one line when their
data was preprocessed differently from every pretraining folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d.data.content import volume_sha256
from volta3d.data.dataset import read_preprocessing

# settings that change what a network sees; column names and limits do not
COMPARED_SETTINGS = ("size", "spacing", "orientation", "crop", "resize", "intensity", "lower_percentile",
                     "upper_percentile")  # fmt: skip


def pretraining_provenance(folders: Sequence[str | Path], manifest: pd.DataFrame) -> dict[str, Any]:
    """The record ``encoder.json`` keeps: subject ids, volume hashes, each folder's preprocessing."""
    return {
        "subject_ids": sorted(set(manifest["subject_id"].astype(str))),
        "volume_sha256": sorted({volume_sha256(p) for p in manifest["path"]}),
        "preprocessing": [read_preprocessing(f) for f in folders],
    }


def _settings_differ(data_dir: str | Path, pretraining: Sequence[dict[str, Any] | None]) -> str | None:
    """A one-line warning when ``data_dir``'s preprocessing matches none of the pretraining folders'."""
    mine = read_preprocessing(data_dir)
    known = [p for p in pretraining if p]
    if mine is None or not known:
        return None  # nothing to compare on one side

    def n_differing(p: dict[str, Any]) -> int:
        return sum(mine.get(k) != p.get(k) for k in COMPARED_SETTINGS if k in p)

    closest = min(known, key=n_differing)
    # an imported encoder declares only the settings its authors state (volta3d import-encoder --preprocessing)
    diffs = [k for k in COMPARED_SETTINGS if k in closest and mine.get(k) != closest.get(k)]
    if not diffs:
        return None
    k = diffs[0]
    return (f"{data_dir} was preprocessed with preprocess.{k}={mine.get(k)!r}, the encoder's closest pretraining "
            f"folder with {closest.get(k)!r} ({len(diffs)} setting(s) differ)")  # fmt: skip


def relate_to_pretraining(
    encoder_meta: dict[str, Any], data_dir: str | Path, test: pd.DataFrame
) -> tuple[dict[str, Any], str | None]:
    """``({"n_test", "test_subjects_in_pretraining", "test_volumes_in_pretraining", "transductive"}, warning)``
    for the test rows (``subject_id``, ``path``) of a downstream run on ``data_dir``."""
    record = encoder_meta.get("provenance")
    if not record:
        return {
            "known": False
        }, "the encoder export records no pretraining data: transductive or not is unknown"
    # imported (volta3d import-encoder): only the preprocessing it expects is known
    if "subject_ids" not in record:
        differs = _settings_differ(data_dir, record.get("preprocessing", []))
        unknown = "the encoder was imported: its pretraining data is unknown to volta3d, so transductive or not is unknown"
        return {"known": False, "external": True}, "; ".join(w for w in (unknown, differs) if w)
    ids, hashes = set(record["subject_ids"]), set(record["volume_sha256"])
    subjects = test["subject_id"].astype(str).unique()
    n_volumes = sum(volume_sha256(p) in hashes for p in test["path"])
    summary = {"known": True, "n_test": int(len(subjects)),
               "test_subjects_in_pretraining": int(sum(s in ids for s in subjects)),
               "test_volumes_in_pretraining": int(n_volumes)}  # fmt: skip
    summary["transductive"] = bool(summary["test_subjects_in_pretraining"] or n_volumes)
    if record.get("external"):  # pretraining continued from an imported encoder: its own data is unknown
        summary["external"] = True
    return summary, _settings_differ(data_dir, record.get("preprocessing", []))
