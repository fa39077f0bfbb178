"""Offline, cached, parallel preprocessing of a whole dataset -> ``manifest.csv`` + ``rejected.csv``.

Each scan is independent: it is read, checked, run through the pipeline (``pipeline.py``) and saved
with its JSON record (``cache.py``) inside a worker, so one bad or crashing scan never stops the batch
and finished scans survive an interrupted run. The manifests are assembled at the end from the
records. ``shard=(i, n)`` processes only the scans whose source path hashes to ``i`` (stable across
machines that see the same paths) and writes ``manifest.shard-i-of-n.csv``; ``merge_shards`` or a
final run without ``shard`` (which finds every scan cached) builds ``manifest.csv``.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from volta3d import layout
from volta3d.data import cache
from volta3d.data.io import ScanError, ScanTooLarge, read_volume
from volta3d.data.pipeline import PreprocessedScan, PreprocessSettings, preprocess_scan
from volta3d.data.sources import ScanRecord, find_scans
from volta3d.errors import InputError, InputFileNotFound
from volta3d.runtime import file_sha256, get_logger

BASE_COLUMNS = ("subject_id", "path", "source", "label_path")
REJECTED_COLUMNS = ("subject_id", "source", "label_source", "reason")


@dataclass
class PreprocessSummary:
    """What one ``volta3d preprocess`` run did (counts, time, the manifest and rejected.csv it wrote),
    returned to the command for its final log line and to tests."""

    found: int  # scans in the input (all shards)
    selected: int  # scans in this shard (= found without sharding)
    processed: int  # computed in this run
    skipped: int  # already cached with the same source and settings
    accepted: int
    rejected: int  # bad data plus errors
    seconds: float
    manifest: Path
    rejected_csv: Path
    errors: int = 0  # scans that failed for a reason other than their data (a bug, a dead worker)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n -> (i, n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard i/n needs 0 <= i < n, got '{text}'")
    return i, n


def one_line(text: str) -> str:
    """A reason for rejected.csv on one line: some libraries' messages hold newlines."""
    return " ".join(text.split())


def shard_of(source: str, n: int) -> int:
    """Stable shard of a scan: a hash of its source path (Python's hash() is salted per process)."""
    return int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) % n


def _part_names(shard: tuple[int, int] | None) -> tuple[str, str]:
    if shard is None:
        return layout.MANIFEST, layout.REJECTED
    tag = f"shard-{shard[0]}-of-{shard[1]}"
    return f"manifest.{tag}.csv", f"rejected.{tag}.csv"


def _save_volumes(
    out_dir: Path, out: PreprocessedScan, settings: PreprocessSettings, image_rel: str, mask_rel: str
) -> dict[str, int]:
    """Write the cube (and mask); return each file's size, which a re-run checks before trusting it."""
    cache.save_array(out_dir / image_rel, out.image.astype(settings.dtype))
    written = [image_rel]
    if out.mask is not None:
        cache.save_array(out_dir / mask_rel, out.mask.astype(cache.mask_dtype(int(out.mask.max()))))
        written.append(mask_rel)
    return {rel: (out_dir / rel).stat().st_size for rel in written}


def process_one(
    scan: ScanRecord, out_dir: Path, settings: PreprocessSettings, settings_hash: str
) -> dict[str, Any]:
    """Read, check, preprocess and cache one scan; return its record (status ok / rejected / error).

    Rejections (bad data) are cached so a re-run does not retry an unchanged bad file; unexpected
    errors are not, so a re-run tries again.
    """
    key = cache.scan_key(scan.source, scan.label_path)
    image_rel, mask_rel = cache.volume_paths(key)
    record: dict[str, Any] = {
        "source": scan.source,
        "label_source": scan.label_path,
        "source_fingerprint": cache.source_fingerprint(scan.source),
        "label_fingerprint": cache.source_fingerprint(scan.label_path),
        "settings_hash": settings_hash,
        "subject_id": scan.subject_id,
        "labels": scan.labels,
    }
    start = time.perf_counter()
    name = Path(scan.source).name
    cacheable = True
    try:
        image, meta = read_volume(scan.source, settings.max_voxels)
        mask = mask_meta = None
        if scan.label_path is not None:
            try:
                mask, mask_meta = read_volume(scan.label_path, settings.max_voxels)
            except ScanError as err:
                raise type(err)(f"label file unusable: {err}") from None
        mask_name = Path(scan.label_path).name if scan.label_path is not None else "mask"
        out = preprocess_scan(image, meta, settings, mask, mask_meta, name=name, mask_name=mask_name)
        record |= {
            "status": "ok",
            "path": image_rel,
            "label_path": mask_rel if out.mask is not None else None,
            "sizes": _save_volumes(out_dir, out, settings, image_rel, mask_rel),
            "shape": list(out.image.shape),
            "affine": out.affine.tolist(),
            "input_orientation": meta["orientation"],
            "input_spacing": list(meta["spacing"]),
        }
        # the files' content hashes: resumes and leakage checks compare them without reading the volumes
        record["sha256"] = {rel: file_sha256(out_dir / rel) for rel in record["sizes"]}
    except ScanError as err:
        record |= {"status": "rejected", "reason": one_line(str(err))}
        cacheable = not isinstance(err, ScanTooLarge)  # a raised limit must retry it
    except Exception as err:  # a bug or resource problem must not stop the batch either
        record |= {
            "status": "error",
            "reason": one_line(f"unexpected error: {type(err).__name__}: {err or 'no message'}"),
            "traceback": traceback.format_exc(),  # logged to preprocess.log: a bug keeps its traceback
        }
    record["seconds"] = round(time.perf_counter() - start, 4)
    if record["status"] != "error" and cacheable:
        cache.save_record(cache.record_path(out_dir, key), record)
    return record


def _init_worker() -> None:
    torch.set_num_threads(1)  # one scan per process; threads would oversubscribe the cores


Note = Callable[[dict[str, Any]], None]


def _error_record(scan: ScanRecord, reason: str) -> dict[str, Any]:
    return {"source": scan.source, "label_source": scan.label_path, "status": "error", "reason": reason}


def _run_pool(
    scans: list[ScanRecord], workers: int, note: Note, args: tuple[Any, ...]
) -> tuple[list[ScanRecord], list[ScanRecord]]:
    """Run ``scans`` in a fresh pool, at most ``workers`` in flight, so that when a worker dies (as the
    out-of-memory killer does) only the scans then in flight are suspects. Returns ``(suspects,
    not started)``, both empty when the pool never broke."""
    pending = list(scans)
    in_flight: dict[Future, ScanRecord] = {}
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                scan = pending.pop(0)
                in_flight[pool.submit(process_one, scan, *args)] = scan
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = []
            for fut in done:
                scan = in_flight.pop(fut)
                err = fut.exception()
                if isinstance(err, BrokenProcessPool):
                    broken.append(scan)
                elif err is not None:  # e.g. a result that cannot be sent back: this scan's fault
                    note(_error_record(scan, f"worker failed: {type(err).__name__}: {err}"))
                else:
                    note(fut.result())
            if broken:
                return broken + list(in_flight.values()), pending
    return [], []


def _run_parallel(todo: list[ScanRecord], workers: int, note: Note, args: tuple[Any, ...]) -> None:
    """A dead worker breaks the whole pool: rebuild it for the scans not started, and run each scan
    that was in flight alone, blaming it only when it kills a worker by itself."""
    queue = list(todo)
    while queue:
        suspects, queue = _run_pool(queue, workers, note, args)
        for scan in suspects:
            if _run_pool([scan], 1, note, args)[0]:
                note(
                    _error_record(
                        scan,
                        "worker process died while preprocessing this scan alone "
                        "(killed, e.g. by the out-of-memory killer)",
                    )
                )


def _run_all(
    todo: list[ScanRecord],
    out_dir: Path,
    settings: PreprocessSettings,
    settings_hash: str,
    workers: int,
    progress: bool,
) -> dict[tuple[str, str | None], dict[str, Any]]:
    results: dict[tuple[str, str | None], dict[str, Any]] = {}
    bar = tqdm(total=len(todo), desc="preprocess", unit="scan", disable=not progress or not todo)
    log = get_logger()

    def note(rec: dict[str, Any]) -> None:
        results[(rec["source"], rec.get("label_source"))] = rec
        if rec["status"] != "ok":
            log.warning(
                "%s %s: %s",
                "rejected" if rec["status"] == "rejected" else "error on",
                rec["source"],
                rec["reason"],
            )
        if rec.get("traceback"):
            log.error("traceback for %s:\n%s", rec["source"], rec.pop("traceback").rstrip())
        bar.update(1)

    if workers <= 1:
        for scan in todo:
            note(process_one(scan, out_dir, settings, settings_hash))
    else:
        _run_parallel(todo, workers, note, (out_dir, settings, settings_hash))
    bar.close()
    return results


def preprocess_dataset(
    records_or_input: str | Path | Sequence[ScanRecord],
    out_dir: str | Path,
    settings: dict[str, Any] | PreprocessSettings,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    kind: str = "auto",
    progress: bool = True,
) -> PreprocessSummary:
    """Preprocess every scan of an input (folder / CSV path, or a list of ScanRecord) into ``out_dir``.

    Writes ``volumes/*.npy``, ``records/*.json``, ``manifest.csv`` and ``rejected.csv`` (per-shard
    names with ``shard``) and appends to ``preprocess.log``. Scans already cached from the same files
    with the same output settings are not recomputed. ``settings``: the ``preprocess:`` config section.
    """
    settings = settings if isinstance(settings, PreprocessSettings) else PreprocessSettings(**settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = get_logger()
    handler = logging.FileHandler(out_dir / layout.PREPROCESS_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        return _preprocess(records_or_input, out_dir, settings, workers, shard, kind, progress)
    finally:
        log.removeHandler(handler)
        handler.close()


def _preprocess(
    records_or_input: str | Path | Sequence[ScanRecord],
    out_dir: Path,
    settings: PreprocessSettings,
    workers: int,
    shard: tuple[int, int] | None,
    kind: str,
    progress: bool,
) -> PreprocessSummary:
    start = time.perf_counter()
    log = get_logger()
    if isinstance(records_or_input, (str, Path)):
        scans = find_scans(
            records_or_input, kind, image_column=settings.image_column,
            label_path_column=settings.label_path_column, subject_column=settings.subject_column,
        )  # fmt: skip
    else:
        scans = list(records_or_input)
        if not scans:
            raise InputError("no scans to preprocess (empty list)")
    clash = sorted({k for s in scans for k in s.labels} & set(BASE_COLUMNS))
    if clash:
        raise InputError(f"label column '{clash[0]}' clashes with a manifest column; rename it in the input")
    selected = [s for s in scans if shard is None or shard_of(s.source, shard[1]) == shard[0]]
    settings_hash = settings.output_hash()
    log.info(
        "preprocess: %d scans found, %d in %s; settings %s -> %s",
        len(scans), len(selected), f"shard {shard[0]}/{shard[1]}" if shard else "this run", settings_hash, out_dir,
    )  # fmt: skip

    records: dict[tuple[str, str | None], dict[str, Any]] = {}
    todo = []
    for scan in selected:
        rec = cache.load_record(cache.record_path(out_dir, cache.scan_key(scan.source, scan.label_path)))
        if cache.is_current(rec, out_dir, scan.source, scan.label_path, settings_hash):
            records[(scan.source, scan.label_path)] = rec  # type: ignore[assignment]
        else:
            todo.append(scan)
    log.info("preprocess: %d cached, %d to compute with %d worker(s)", len(records), len(todo), workers)
    records |= _run_all(todo, out_dir, settings, settings_hash, workers, progress)

    manifest_name, rejected_name = _part_names(shard)
    manifest, rejected = _tables(selected, records)
    manifest.to_csv(out_dir / manifest_name, index=False)
    rejected.to_csv(out_dir / rejected_name, index=False)
    summary = PreprocessSummary(
        found=len(scans),
        selected=len(selected),
        processed=len(todo),
        skipped=len(selected) - len(todo),
        accepted=len(manifest),
        rejected=len(rejected),
        seconds=round(time.perf_counter() - start, 3),
        manifest=out_dir / manifest_name,
        rejected_csv=out_dir / rejected_name,
        errors=sum(1 for s in selected if records[(s.source, s.label_path)]["status"] == "error"),
    )
    log.info("preprocess: %s", {k: str(v) for k, v in asdict(summary).items()})
    return summary


def _tables(
    scans: list[ScanRecord], records: dict[tuple[str, str | None], dict[str, Any]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest rows take ids and labels from the current input (they may have been edited since)."""
    label_names = list(dict.fromkeys(k for s in scans for k in s.labels))
    with_masks = any(s.label_path for s in scans)
    rows, rejected = [], []
    for scan in scans:
        rec = records[(scan.source, scan.label_path)]
        if rec["status"] != "ok":
            rejected.append(
                {
                    "subject_id": scan.subject_id,
                    "source": scan.source,
                    "label_source": scan.label_path or "",
                    "reason": rec["reason"],
                }
            )
            continue
        row = {"subject_id": scan.subject_id, "path": rec["path"], "source": scan.source}
        if with_masks:
            row["label_path"] = rec.get("label_path") or ""
        rows.append(row | {k: scan.labels.get(k) for k in label_names})
    columns = ["subject_id", "path", "source"] + (["label_path"] if with_masks else []) + label_names
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(rejected, columns=list(REJECTED_COLUMNS))


def merge_shards(out_dir: str | Path) -> tuple[Path, Path]:
    """Concatenate ``manifest.shard-i-of-n.csv`` parts into ``manifest.csv`` (and rejected.csv alike).

    All n parts of one split must be present; nothing is recomputed.
    """
    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob("manifest.shard-*-of-*.csv"))
    if not parts:
        raise InputFileNotFound(f"no manifest.shard-*-of-*.csv parts in {out_dir}")
    counts = {int(p.stem.rsplit("-of-", 1)[1]) for p in parts}
    if len(counts) > 1:
        raise InputError(
            f"{out_dir} holds shard parts of different splits (n = {sorted(counts)}); remove the stale ones"
        )
    n = counts.pop()
    manifests, rejected = [], []
    for i in range(n):
        m_name, r_name = _part_names((i, n))
        if not (out_dir / m_name).exists() or not (out_dir / r_name).exists():
            raise InputFileNotFound(f"shard {i}/{n} has not finished: {out_dir / m_name} missing")
        manifests.append(pd.read_csv(out_dir / m_name, dtype={"subject_id": str}, keep_default_na=False))
        rejected.append(pd.read_csv(out_dir / r_name, keep_default_na=False))
    manifest = pd.concat(manifests, ignore_index=True).sort_values("source", kind="stable")
    rej = pd.concat(rejected, ignore_index=True).sort_values("source", kind="stable")
    manifest.to_csv(out_dir / layout.MANIFEST, index=False)
    rej.to_csv(out_dir / layout.REJECTED, index=False)
    return out_dir / layout.MANIFEST, out_dir / layout.REJECTED
