"""What produced a fine-tuning run's folds, so a rerun into the same folder resumes only the same run.

A finished fold is skipped on a rerun. Without a check, a rerun with another ``--encoder``, model,
label, data or settings would skip every fold and write a results.json that names the new run over
the old one's metrics. The fingerprint (the task's config sections less the keys that cannot change
a result, the command's choices, and content hashes of the encoder weights, the manifests, every
volume and mask they list (``volta3d.data.content``: a folder preprocessed again in place changes
them, not its manifest) and a given splits file) is written as ``fingerprint.json`` and compared,
key by key, on every rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from volta3d import layout
from volta3d.config import to_kwargs
from volta3d.data.content import content_hashes, describe_change
from volta3d.data.dataset import PATH_COLUMNS, manifest_file, read_manifest
from volta3d.errors import InputError
from volta3d.models.export import export_paths
from volta3d.runtime import atomic_write, file_sha256, flatten_dict

FREE_KEYS = ("num_workers",)  # change speed, not results
VOLUMES = "volumes"


def _sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def run_fingerprint(args: Any, cfg: Any) -> dict[str, Any]:
    """The flat record of everything that decides a fine-tuning run's fold results (``args``: the
    command's inputs, e.g. ``FinetuneInputs``)."""
    name = getattr(args, "section", args.task)  # the config section the task reads
    section = {k: v for k, v in to_kwargs(cfg[name]).items() if k not in FREE_KEYS}
    weights, meta = export_paths(args.encoder) if args.encoder else (None, None)  # a folder or a file
    record = {
        name: section, "model": to_kwargs(cfg.model), "seed": cfg.seed,
        "run": {"task": args.task, "model": args.model, "label": getattr(args, "label", None),
                "fractions": getattr(args, "fractions", None), "like": getattr(args, "like", None),
                "encoder_sha256": _sha256(weights) if weights else None,
                "encoder_meta_sha256": _sha256(meta) if meta else None,
                "data_manifest_sha256": _sha256(manifest_file(args.data)),
                "test_manifest_sha256": _sha256(manifest_file(args.test_data)) if args.test_data else None,
                "splits_sha256": _sha256(Path(args.splits)) if args.splits else None},
        VOLUMES: {**_volumes("--data", args.data), **_volumes("--test-data", args.test_data)},
    }  # fmt: skip
    return flatten_dict(record)


def _volumes(flag: str, data: str | None) -> dict[str, str]:
    """``{"<flag> <path relative to the manifest>": content hash}`` of every volume and mask listed
    (nothing when the manifest is missing: the command names it next)."""
    csv = manifest_file(data) if data else None
    if csv is None or not csv.is_file():
        return {}
    table = read_manifest(csv)
    paths = [v for col in PATH_COLUMNS if col in table.columns for v in table[col]]
    base = csv.resolve().parent
    return {f"{flag} {os.path.relpath(p, base)}": h for p, h in content_hashes(paths).items()}


def _differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys that differ, volumes last (a changed setting says more); a fingerprint written before
    volumes were hashed is compared without them."""
    keys = set(now) | set(then)
    if not any(k.startswith(f"{VOLUMES}.") for k in then):
        keys = {k for k in keys if not k.startswith(f"{VOLUMES}.")}
    changed = (k for k in keys if now.get(k) != then.get(k))
    return sorted(changed, key=lambda k: (k.startswith(f"{VOLUMES}."), k))


def _volume_change(then: dict[str, Any], now: dict[str, Any]) -> str | None:
    n = len(VOLUMES) + 1
    return describe_change({k[n:]: v for k, v in then.items() if k.startswith(f"{VOLUMES}.")},
                           {k[n:]: v for k, v in now.items() if k.startswith(f"{VOLUMES}.")})  # fmt: skip


def check_fingerprint(out: Path, now: dict[str, Any]) -> None:
    """Refuse, naming the first difference, to resume folds that another run produced; record a new run's.

    Runs made before fingerprints existed (folds but no fingerprint.json) are refused too: nothing
    says what produced their folds.
    """
    path = out / layout.FINGERPRINT
    folds = out / layout.FOLDS
    if path.is_file():
        then = json.loads(path.read_text())
        changed = _differences(then, now)
        if changed and folds.is_dir() and any(folds.glob("*.json")):
            k = changed[0]
            if k.startswith(f"{VOLUMES}."):
                raise InputError(f"{out} holds folds made on other data: {_volume_change(then, now)} since "
                                 "(preprocessed again in place?); use a new --output folder (or delete its "
                                 "folds/ to redo them)")  # fmt: skip
            raise InputError(f"{out} holds folds made with {k}={then.get(k)!r}, but this run has {now.get(k)!r}; "
                             "use a new --output folder (or delete its folds/ to redo them)")  # fmt: skip
    elif folds.is_dir() and any(folds.glob("*.json")):
        raise InputError(f"{out} holds folds from a run that recorded no {layout.FINGERPRINT}: nothing says what "
                         "produced them; use a new --output folder")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path, lambda f: f.write((json.dumps(now, indent=1, sort_keys=True, default=str) + "\n").encode())
    )
