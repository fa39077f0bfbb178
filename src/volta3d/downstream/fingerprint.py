"""What produced a fine-tuning run's folds, so a rerun into the same folder resumes only the same run.

A finished fold is skipped on a rerun. Without a check, a rerun with another ``--encoder``, model,
label, data or settings would skip every fold and write a results.json that names the new run over
the old one's metrics. The fingerprint (the task's config sections less the keys that cannot change
a result, the command's choices, and content hashes of the encoder weights, the manifests and a
given splits file) is written as ``fingerprint.json`` and compared, key by key, on every rerun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from volta3d.config import to_kwargs
from volta3d.data.dataset import manifest_file
from volta3d.errors import InputError
from volta3d.runtime import atomic_write, file_sha256, flatten_dict

FINGERPRINT_NAME = "fingerprint.json"
FREE_KEYS = ("num_workers",)  # change speed, not results


def _sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def run_fingerprint(args: Any, cfg: Any) -> dict[str, Any]:
    """The flat record of everything that decides a fine-tuning run's fold results (``args``: the
    command's inputs, e.g. ``FinetuneInputs``)."""
    section = {k: v for k, v in to_kwargs(cfg[args.task]).items() if k not in FREE_KEYS}
    encoder = Path(args.encoder) / "encoder.safetensors" if args.encoder else None
    record = {
        args.task: section, "model": to_kwargs(cfg.model), "seed": cfg.seed,
        "run": {"task": args.task, "model": args.model, "label": getattr(args, "label", None),
                "fractions": getattr(args, "fractions", None), "like": getattr(args, "like", None),
                "encoder_sha256": _sha256(encoder) if encoder else None,
                "data_manifest_sha256": _sha256(manifest_file(args.data)),
                "test_manifest_sha256": _sha256(manifest_file(args.test_data)) if args.test_data else None,
                "splits_sha256": _sha256(Path(args.splits)) if args.splits else None},
    }  # fmt: skip
    return flatten_dict(record)


def check_fingerprint(out: Path, now: dict[str, Any]) -> None:
    """Refuse, naming the first difference, to resume folds that another run produced; record a new run's.

    Runs made before fingerprints existed (folds but no fingerprint.json) are refused too: nothing
    says what produced their folds.
    """
    path = out / FINGERPRINT_NAME
    folds = out / "folds"
    if path.is_file():
        then = json.loads(path.read_text())
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed and folds.is_dir() and any(folds.glob("*.json")):
            k = changed[0]
            raise InputError(f"{out} holds folds made with {k}={then.get(k)!r}, but this run has {now.get(k)!r}; "
                             "use a new --output folder (or delete its folds/ to redo them)")  # fmt: skip
    elif folds.is_dir() and any(folds.glob("*.json")):
        raise InputError(f"{out} holds folds from a run that recorded no {FINGERPRINT_NAME}: nothing says what "
                         "produced them; use a new --output folder")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path, lambda f: f.write((json.dumps(now, indent=1, sort_keys=True, default=str) + "\n").encode())
    )
