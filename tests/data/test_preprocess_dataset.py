"""preprocess_dataset: every input kind, bad inputs -> rejected.csv, cache skipping, sharding."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from volta3d.data.preprocess import merge_shards, parse_shard, preprocess_dataset
from volta3d.data.sources import detect_kind, find_scans

from ..config_kwargs import kwargs_for, section_kwargs
from .scan_factory import head_like, write_bids, write_dicom_series, write_nifti

SMALL = section_kwargs("preprocess", size=[16, 16, 16])


def _run(src, out, **kw):
    return preprocess_dataset(src, out, kw.pop("settings", SMALL), progress=False, **kw)


def test_nifti_folder_recursive(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", head_like(seed=1))
    write_nifti(tmp_path / "in/deeper/b.nii", head_like(seed=2))
    (tmp_path / "in/notes.txt").write_text("not a scan")
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary.found, summary.accepted, summary.rejected) == (2, 2, 0)
    manifest = pd.read_csv(tmp_path / "out/manifest.csv")
    assert list(manifest.columns) == ["subject_id", "path", "source"]
    assert sorted(manifest.subject_id) == ["a", "b"]
    image = np.load(tmp_path / "out" / manifest.path[0])
    assert image.shape == (1, 16, 16, 16) and image.dtype == np.float16
    assert (tmp_path / "out/preprocess.log").read_text().count("2 scans found") == 1


def test_dicom_folders(tmp_path):
    write_dicom_series(tmp_path / "in/patient1/t1", np.arange(5 * 6 * 7).reshape(5, 6, 7) * 2 + 1.0)
    write_dicom_series(tmp_path / "in/patient2/t1", np.arange(5 * 6 * 7).reshape(5, 6, 7) + 3.0)
    assert detect_kind(tmp_path / "in") == "dicom"
    _run(tmp_path / "in", tmp_path / "out")
    manifest = pd.read_csv(tmp_path / "out/manifest.csv")
    assert sorted(manifest.subject_id) == ["patient1_t1", "patient2_t1"]  # same folder name: relative path


def test_bids_with_participants(tmp_path):
    write_bids(tmp_path / "bids")
    assert detect_kind(tmp_path / "bids") == "bids"
    _run(tmp_path / "bids", tmp_path / "out")
    m = pd.read_csv(tmp_path / "out/manifest.csv", keep_default_na=False)
    assert list(m.columns) == ["subject_id", "path", "source", "age", "sex", "session"]
    assert list(m.subject_id) == ["sub-01", "sub-01", "sub-02"]  # sessions share the subject (grouped splits)
    assert list(m.session) == ["ses-1", "ses-2", ""]
    assert list(m.sex) == ["F", "F", "M"] and list(m.age) == ["30.5", "30.5", ""]


def test_csv_manifest_with_labels_and_mask(tmp_path):
    mask = np.zeros((20, 22, 18), np.float32)
    mask[8:12, 8:12, 8:12] = 1
    mask[5:7, 5:7, 5:7] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(tmp_path / "in/img1.nii.gz", head_like(seed=1), affine)
    write_nifti(tmp_path / "in/seg1.nii.gz", mask, affine)
    write_nifti(tmp_path / "in/img2.nii.gz", head_like(seed=2), affine)
    write_nifti(tmp_path / "in/seg2.nii.gz", mask, affine)
    pd.DataFrame(
        {"path": ["img1.nii.gz", "img2.nii.gz"], "label_path": ["seg1.nii.gz", "seg2.nii.gz"],
         "subject_id": ["s1", "s2"], "sex": ["F", "M"], "diagnosis": ["AD", "CN"]}
    ).to_csv(tmp_path / "in/list.csv", index=False)  # fmt: skip
    _run(tmp_path / "in/list.csv", tmp_path / "out", settings=section_kwargs("preprocess", size=[32, 32, 32]))
    m = pd.read_csv(tmp_path / "out/manifest.csv")
    assert list(m.columns) == ["subject_id", "path", "source", "label_path", "sex", "diagnosis"]
    assert list(m.diagnosis) == ["AD", "CN"]
    seg = np.load(tmp_path / "out" / m.label_path[0])
    assert seg.dtype == np.uint8 and seg.shape == (1, 32, 32, 32)
    assert set(np.unique(seg)) == {0, 1, 2}
    assert (seg == 1).sum() == pytest.approx(4**3 * 8, rel=0.15)  # 2 mm voxels -> 8 voxels at 1 mm


def _bad_inputs(root):
    """One CSV listing a good scan and one of each kind of bad input; returns (csv, {name: reason})."""
    d = root / "in"
    write_nifti(d / "good.nii.gz", head_like(seed=1))
    write_nifti(d / "singleton4d.nii.gz", head_like(seed=2)[..., None])
    raw = gzip.decompress(write_nifti(d / "trunc.nii.gz", head_like(seed=3)).read_bytes())
    (d / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    (d / "garbage.nii").write_bytes(b"not a nifti file at all")
    write_nifti(d / "flat.nii.gz", np.ones((8, 8), np.float32))
    write_nifti(d / "series.nii.gz", np.stack([head_like(seed=4)] * 3, -1))
    nan = head_like(seed=5)
    nan[3, 3, 3] = np.nan
    write_nifti(d / "nan.nii.gz", nan)
    write_nifti(d / "zeros.nii.gz", np.zeros((10, 10, 10), np.float32))
    write_nifti(d / "img_for_seg.nii.gz", head_like(seed=6))
    write_nifti(d / "seg_shape.nii.gz", np.zeros((20, 22, 17), np.float32))
    write_nifti(d / "seg_affine.nii.gz", np.zeros((20, 22, 18), np.float32), np.diag([1.0, 1.0, 1.2, 1.0]))
    (d / "seg_corrupt.nii.gz").write_bytes(b"\x1f\x8b broken")
    vol = np.arange(5 * 6 * 7).reshape(5, 6, 7) + 1.0
    write_dicom_series(d / "dcm_mixed", vol, series_uid="1.2.9.1")
    other = write_dicom_series(d / "tmp_other", vol, series_uid="1.2.9.2")
    for i, p in enumerate(other):
        p.rename(d / "dcm_mixed" / f"other_{i}.dcm")
    write_dicom_series(d / "dcm_gap", vol)[2].unlink()
    rows = [
        ("good.nii.gz", None), ("singleton4d.nii.gz", None), ("trunc.nii.gz", None), ("garbage.nii", None),
        ("flat.nii.gz", None), ("series.nii.gz", None), ("nan.nii.gz", None), ("zeros.nii.gz", None),
        ("missing.nii.gz", None), ("img_for_seg.nii.gz", "seg_shape.nii.gz"),
        ("img_for_seg.nii.gz", "seg_affine.nii.gz"), ("img_for_seg.nii.gz", "seg_corrupt.nii.gz"),
        ("dcm_mixed", None), ("dcm_gap", None),
    ]  # fmt: skip
    pd.DataFrame(
        {
            "path": [r[0] for r in rows],
            "label_path": [r[1] for r in rows],
            "subject_id": [f"s{i}" for i in range(len(rows))],
        }
    ).to_csv(d / "list.csv", index=False)
    reasons = {
        "s2": "cannot read trunc.nii.gz (truncated or corrupt?)",
        "s3": "cannot read garbage.nii",
        "s4": "2D image of shape (8, 8)",
        "s5": "4D image of shape (20, 22, 18, 3) (3 volumes)",
        "s6": "1 voxels are NaN or Inf",
        "s7": "constant volume (every voxel = 0)",
        "s8": "file not found",
        "s9": "label grid (20, 22, 17) does not match image grid (20, 22, 18)",
        "s10": "label affine differs from the image affine",
        "s11": "label file unusable: cannot read seg_corrupt.nii.gz",
        "s12": "folder mixes 2 DICOM series (SeriesInstanceUID 1.2.9.1, 1.2.9.2)",
        "s13": "missing slices (InstanceNumber jumps from 2 to 4)",
    }
    return d / "list.csv", reasons


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_goes_on(tmp_path):
    csv, reasons = _bad_inputs(tmp_path)
    summary = _run(csv, tmp_path / "out")
    assert (summary.accepted, summary.rejected) == (2, len(reasons))
    assert sorted(pd.read_csv(tmp_path / "out/manifest.csv").subject_id) == ["s0", "s1"]
    rejected = pd.read_csv(tmp_path / "out/rejected.csv")
    assert list(rejected.columns) == ["subject_id", "source", "label_source", "reason"]
    assert list(rejected.subject_id.astype(str)) == list(reasons)
    sources = [
        s.source for s in find_scans(csv, **kwargs_for(find_scans, "preprocess")) if s.subject_id in reasons
    ]
    assert list(rejected.source) == sources  # input order, one row each
    for reason, (sid, expected) in zip(rejected.reason, reasons.items(), strict=True):
        assert expected in reason, (sid, reason)
    # rejections are cached too: an unchanged bad file is not read again
    again = _run(csv, tmp_path / "out")
    assert (again.processed, again.rejected) == (0, len(reasons))


def test_second_run_skips_and_changed_settings_or_source_recompute(tmp_path):
    for i in range(3):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    first = _run(tmp_path / "in", tmp_path / "out")
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "out/volumes").iterdir()}
    second = _run(tmp_path / "in", tmp_path / "out")
    assert (first.processed, second.processed, second.skipped, second.accepted) == (3, 0, 3, 3)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out/volumes").iterdir()} == cached
    write_nifti(tmp_path / "in/s1.nii.gz", head_like(shape=(24, 20, 18), seed=9))  # the scan was replaced
    assert _run(tmp_path / "in", tmp_path / "out").processed == 1
    changed = _run(
        tmp_path / "in", tmp_path / "out", settings=section_kwargs("preprocess", size=[20, 20, 20])
    )
    assert changed.processed == 3
    m = pd.read_csv(tmp_path / "out/manifest.csv")
    assert np.load(tmp_path / "out" / m.path[0]).shape == (1, 20, 20, 20)


def test_shards_are_disjoint_and_merge_gives_the_full_manifest(tmp_path):
    for i in range(6):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(shape=(10, 12, 9), seed=i))
    write_nifti(tmp_path / "in/zeros.nii.gz", np.zeros((10, 10, 10), np.float32))
    parts = [_run(tmp_path / "in", tmp_path / "out", shard=(i, 2)) for i in range(2)]
    m0, m1 = (pd.read_csv(tmp_path / f"out/manifest.shard-{i}-of-2.csv") for i in range(2))
    r0, r1 = (pd.read_csv(tmp_path / f"out/rejected.shard-{i}-of-2.csv") for i in range(2))
    assert set(m0.source).isdisjoint(m1.source)
    assert len(m0) + len(m1) == 6 and len(r0) + len(r1) == 1
    assert sum(p.selected for p in parts) == 7
    manifest, rejected = merge_shards(tmp_path / "out")
    merged = pd.read_csv(manifest)
    full = _run(tmp_path / "in", tmp_path / "out")  # a final run without --shard recomputes nothing
    assert full.processed == 0
    expected = pd.read_csv(tmp_path / "out/manifest.csv")
    assert sorted(merged.source) == sorted(expected.source) and len(pd.read_csv(rejected)) == 1
    assert sorted(merged.path) == sorted(expected.path)


def test_merge_needs_every_shard(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", head_like())
    _run(tmp_path / "in", tmp_path / "out", shard=(1, 3))
    with pytest.raises(FileNotFoundError, match="shard 0/3 has not finished"):
        merge_shards(tmp_path / "out")


def test_parallel_workers_match_serial(tmp_path):
    for i in range(3):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    _run(tmp_path / "in", tmp_path / "serial")
    summary = _run(tmp_path / "in", tmp_path / "pool", workers=2)
    assert summary.accepted == 3
    a, b = pd.read_csv(tmp_path / "serial/manifest.csv"), pd.read_csv(tmp_path / "pool/manifest.csv")
    assert list(a.path) == list(b.path)
    for p in a.path:
        np.testing.assert_array_equal(np.load(tmp_path / "serial" / p), np.load(tmp_path / "pool" / p))


def test_whole_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        _run(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scans found in .*empty"):
        _run(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "m.csv").write_text("file,age\na.nii,3\n")
    with pytest.raises(ValueError, match=r"manifest .*m.csv has no 'path' column \(columns: file, age\)"):
        _run(tmp_path / "m.csv", tmp_path / "out")
    with pytest.raises(ValueError, match="--shard i/n needs 0 <= i < n, got '2/2'"):
        parse_shard("2/2")
