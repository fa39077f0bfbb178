"""Hostile-but-fair inputs to preprocessing: each must give a clear one-line reason naming the file
(in rejected.csv for a batch) or the right result, never a silent wrong cube, a lost scan, a huge
allocation or a traceback. Every input is built here, small and fast."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from volta3d.data.io import ScanError, read_volume
from volta3d.data.pipeline import PreprocessSettings, preprocess_scan
from volta3d.data.preprocess import preprocess_dataset

from ..config_kwargs import kwargs_for, section, section_kwargs
from .scan_factory import head_like, write_nifti

SMALL = section_kwargs("preprocess", size=[16, 16, 16])
MAX_VOXELS = section("preprocess")["max_voxels"]


def _run(src, out, settings=None, **kw):
    return preprocess_dataset(src, out, settings or SMALL, progress=False, **kw)


def _rejected(out) -> dict[str, str]:
    table = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    return {src.rsplit("/", 1)[-1]: reason for src, reason in zip(table.source, table.reason, strict=True)}


def _header_only_nifti(path, shape, dtype=np.uint8) -> None:
    """A few-KB file whose header declares ``shape``: the voxels are not there."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4000)


# declared and resampled sizes are checked before allocating


def test_a_header_declaring_more_voxels_than_the_limit_is_refused_before_reading(tmp_path):
    _header_only_nifti(tmp_path / "huge.nii", (1200, 1200, 1200))
    with pytest.raises(ScanError, match=r"huge.nii: declares 1200 x 1200 x 1200 = 1,728,000,000 voxels"):
        read_volume(tmp_path / "huge.nii", MAX_VOXELS)
    _header_only_nifti(tmp_path / "giant.nii", (32767, 32767, 32767))
    with pytest.raises(ScanError, match="over the limit of 134,217,728"):
        read_volume(tmp_path / "giant.nii", MAX_VOXELS)
    write_nifti(tmp_path / "small.nii", head_like())  # 20 x 22 x 18 = 7920 voxels
    with pytest.raises(
        ScanError, match="small.nii: declares 20 x 22 x 18 = 7,920 voxels, over the limit of 1,000"
    ):
        read_volume(tmp_path / "small.nii", max_voxels=1000)


def test_a_huge_voxel_size_is_refused_before_resampling(tmp_path):
    image = head_like()[None]
    meta = {"affine": np.diag([1e4, 1e4, 1e4, 1.0]), "spacing": (1e4, 1e4, 1e4)}
    with pytest.raises(ScanError, match="big.nii: resampled to 1 mm would be 200000 x 220000 x 180000"):
        preprocess_scan(
            image,
            meta,
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16))),
            name="big.nii",
        )


def test_over_the_limit_is_rejected_in_the_batch_and_retried_when_the_limit_rises(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", head_like(seed=1))
    _header_only_nifti(tmp_path / "in/huge.nii", (1200, 1200, 1200))
    write_nifti(tmp_path / "in/coarse.nii.gz", head_like(seed=2), np.diag([1e4, 1e4, 1e4, 1.0]))
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary.accepted, summary.rejected) == (1, 2)
    reasons = _rejected(tmp_path / "out")
    assert "declares 1200 x 1200 x 1200" in reasons["huge.nii"]
    assert "resampled to 1 mm would be" in reasons["coarse.nii.gz"]
    limited = _run(tmp_path / "in", tmp_path / "out2", {**SMALL, "max_voxels": 5000})
    assert limited.accepted == 0
    raised = _run(tmp_path / "in", tmp_path / "out2", {**SMALL, "max_voxels": 10**6})
    assert raised.accepted == 1 and raised.skipped == 0  # the limit rejection was not cached
    assert json.loads(next((tmp_path / "out2/records").glob("a-*.json")).read_text())["status"] == "ok"


# a cached volume counts only when it is intact and under the cache


def _one_scan_cache(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", head_like(seed=1))
    _run(tmp_path / "in", tmp_path / "out")
    record_file = next((tmp_path / "out/records").glob("a-*.json"))
    return record_file, json.loads(record_file.read_text())


def test_a_truncated_cached_volume_is_recomputed(tmp_path):
    record_file, record = _one_scan_cache(tmp_path)
    volume = tmp_path / "out" / record["path"]
    volume.write_bytes(volume.read_bytes()[:100])
    again = _run(tmp_path / "in", tmp_path / "out")
    assert (again.skipped, again.processed, again.accepted) == (0, 1, 1)
    assert np.load(volume).shape == (1, 16, 16, 16)


def test_a_same_size_corrupt_header_is_recomputed(tmp_path):
    record_file, record = _one_scan_cache(tmp_path)
    volume = tmp_path / "out" / record["path"]
    data = bytearray(volume.read_bytes())
    data[:6] = b"garbag"
    volume.write_bytes(bytes(data))
    assert _run(tmp_path / "in", tmp_path / "out").processed == 1


@pytest.mark.parametrize("path", ["../elsewhere.npy", "/etc/passwd", "volumes/../../x.npy", 3])
def test_a_record_pointing_outside_the_cache_is_not_trusted(tmp_path, path):
    record_file, record = _one_scan_cache(tmp_path)
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((1, 16, 16, 16), np.float16))
    record["path"] = path
    record["sizes"] = {str(path): outside.stat().st_size}
    record_file.write_text(json.dumps(record))
    again = _run(tmp_path / "in", tmp_path / "out")
    assert again.processed == 1
    manifest = pd.read_csv(tmp_path / "out/manifest.csv")
    assert list(manifest.path) == [json.loads(record_file.read_text())["path"]]
    assert manifest.path[0].startswith("volumes/")


@pytest.mark.parametrize("content", ["[]", "null", "3", '"text"'])
def test_a_record_that_is_not_an_object_is_recomputed(tmp_path, content):
    record_file, _ = _one_scan_cache(tmp_path)
    record_file.write_text(content)
    again = _run(tmp_path / "in", tmp_path / "out")
    assert (again.processed, again.accepted) == (1, 1)


# inputs that preprocessing refuses with a reason instead of accepting silently


def test_one_extreme_voxel_is_rejected_not_stored_as_a_cube_of_zeros(tmp_path):
    image = head_like()
    image[10, 10, 9] = 1e30
    write_nifti(tmp_path / "in/outlier.nii.gz", image)
    write_nifti(tmp_path / "in/good.nii.gz", head_like(seed=3))
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary.accepted, summary.rejected) == (1, 1)
    reason = _rejected(tmp_path / "out")["outlier.nii.gz"]
    assert reason.startswith("outlier.nii.gz: only 1 of 4096 voxels differ") and "1e+30" in reason
    assert _run(tmp_path / "in", tmp_path / "pct", {**SMALL, "intensity": "percentile"}).accepted == 2


def _mask_manifest(tmp_path, mask: np.ndarray):
    write_nifti(tmp_path / "img.nii.gz", head_like())
    write_nifti(tmp_path / "seg.nii.gz", mask)
    (tmp_path / "m.csv").write_text("subject_id,path,label_path\ns1,img.nii.gz,seg.nii.gz\n")
    return tmp_path / "m.csv"


def test_a_0_255_mask_is_rejected_naming_the_mask_and_its_labels(tmp_path):
    mask = np.zeros((20, 22, 18), np.uint8)
    mask[8:12, 8:12, 8:12] = 255
    summary = _run(_mask_manifest(tmp_path, mask), tmp_path / "out")
    assert summary.rejected == 1
    reason = _rejected(tmp_path / "out")["img.nii.gz"]
    assert reason.startswith("seg.nii.gz: label values 0, 255 are not a small contiguous set")


def test_a_mask_missing_one_class_is_accepted(tmp_path):
    mask = np.zeros((20, 22, 18), np.uint8)
    mask[8:12, 8:12, 8:12] = 1
    mask[4:7, 4:7, 4:7] = 3  # class 2 absent in this subject
    assert _run(_mask_manifest(tmp_path, mask), tmp_path / "out").accepted == 1


def test_complex_voxels_are_rejected(tmp_path):
    data = head_like().astype(np.complex64) * (1 + 1j)
    write_nifti(tmp_path / "c.nii", data)
    with pytest.raises(ScanError, match=r"c.nii: complex-valued voxels \(complex64\)"):
        read_volume(tmp_path / "c.nii", MAX_VOXELS)


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0)])
def test_bad_voxel_size_without_an_sform_is_rejected_not_patched(tmp_path, pixdim):
    img = nib.Nifti1Image(head_like(), None)
    img.header["pixdim"][1:4] = pixdim
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "p.nii"))
    with pytest.raises(ScanError, match=r"p.nii: voxel size \(pixdim\) .* is not positive"):
        read_volume(tmp_path / "p.nii", MAX_VOXELS)


def test_a_dicom_series_in_a_nifti_folder_is_preprocessed(tmp_path):
    from .scan_factory import write_dicom_series

    write_nifti(tmp_path / "in/a.nii.gz", head_like(seed=1))
    write_dicom_series(tmp_path / "in/series1", np.arange(5 * 6 * 7).reshape(5, 6, 7) * 2 + 1.0)
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary.found, summary.accepted) == (2, 2)
    assert sorted(pd.read_csv(tmp_path / "out/manifest.csv").subject_id) == ["a", "series1"]


def test_dangling_and_looping_symlinks_are_rejected_by_name(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", head_like(seed=1))
    (tmp_path / "in/gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (tmp_path / "in/loop1.nii").symlink_to(tmp_path / "in/loop2.nii")
    (tmp_path / "in/loop2.nii").symlink_to(tmp_path / "in/loop1.nii")
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary.found, summary.accepted, summary.rejected) == (4, 1, 3)
    reasons = _rejected(tmp_path / "out")
    assert reasons["gone.nii.gz"].startswith("gone.nii.gz: dangling symbolic link")
    assert reasons["loop1.nii"] == "loop1.nii: symbolic link loop"


# a killed worker costs only the scan that killed it


def _kill_on_killer(monkeypatch) -> None:
    """Workers are forked, so they inherit this: reading a scan named 'killer' kills the worker with
    SIGKILL, as the out-of-memory killer would."""
    import os
    import signal

    from volta3d.data import preprocess as prep

    real = prep.read_volume

    def read(path, *args, **kwargs):
        if "killer" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prep, "read_volume", read)


def test_a_killed_worker_blames_only_its_scan_and_the_rest_are_preprocessed(tmp_path, monkeypatch):
    _kill_on_killer(monkeypatch)
    for i in range(5):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(shape=(10, 10, 10), seed=i))
    write_nifti(tmp_path / "in/killer.nii.gz", head_like(shape=(10, 10, 10)))
    summary = _run(tmp_path / "in", tmp_path / "out", workers=2)
    assert (summary.accepted, summary.rejected, summary.errors) == (5, 1, 1)
    reasons = _rejected(tmp_path / "out")
    assert list(reasons) == ["killer.nii.gz"]
    assert reasons["killer.nii.gz"].startswith("worker process died while preprocessing this scan alone")


def test_the_cli_exits_non_zero_when_a_scan_errored(tmp_path, monkeypatch):
    from volta3d.cli import main

    _kill_on_killer(monkeypatch)
    write_nifti(tmp_path / "in/s0.nii.gz", head_like(shape=(10, 10, 10)))
    write_nifti(tmp_path / "in/killer.nii.gz", head_like(shape=(10, 10, 10)))
    args = [
        "preprocess",
        "-o",
        str(tmp_path / "out"),
        "--no-progress",
        "--workers",
        "2",
        str(tmp_path / "in"),
    ]
    assert main([*args, "preprocess.size=[8,8,8]"]) == 1
    assert len(pd.read_csv(tmp_path / "out/manifest.csv")) == 1


# messages that name the right file and line, on one line


def test_a_mask_on_another_grid_is_named_by_the_mask_and_rejected_csv_has_subject_and_mask(tmp_path):
    write_nifti(tmp_path / "img.nii.gz", head_like())
    write_nifti(tmp_path / "seg.nii.gz", np.zeros((20, 22, 17), np.uint8))
    (tmp_path / "m.csv").write_text("subject_id,path,label_path\n007,img.nii.gz,seg.nii.gz\n")
    _run(tmp_path / "m.csv", tmp_path / "out")
    table = pd.read_csv(tmp_path / "out/rejected.csv", dtype=str)
    assert list(table.columns) == ["subject_id", "source", "label_source", "reason"]
    assert table.subject_id[0] == "007" and table.label_source[0].endswith("seg.nii.gz")
    assert table.reason[0].startswith("seg.nii.gz: label grid")


def test_csv_line_numbers_count_blank_lines(tmp_path):
    from volta3d.data.sources import find_scans

    write_nifti(tmp_path / "a.nii.gz", head_like())
    (tmp_path / "m.csv").write_text("path,age\na.nii.gz,3\n\n\n,4\n")
    scans = find_scans(tmp_path / "m.csv", **kwargs_for(find_scans, "preprocess"))
    assert len(scans) == 2
    assert scans[1].source == "m.csv: line 5 (empty 'path')"


@pytest.mark.parametrize("text", ['path,age\n"a.nii.gz,3\n', b"path\n\xff\xfe\x00bad\n"])
def test_an_unparsable_csv_is_named(tmp_path, text):
    from volta3d.data.sources import find_scans

    csv = tmp_path / "m.csv"
    csv.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ValueError, match=f"cannot parse {csv}"):
        find_scans(csv, **kwargs_for(find_scans, "preprocess"))


def test_an_unreadable_cached_volume_is_named_by_the_dataset(tmp_path):
    from volta3d.data.dataset import VolumeDataset

    write_nifti(tmp_path / "in/a.nii.gz", head_like())
    _run(tmp_path / "in", tmp_path / "out")
    volume = next((tmp_path / "out/volumes").glob("*.npy"))
    volume.write_bytes(volume.read_bytes()[:90])
    with pytest.raises(ValueError, match=rf"cannot read cached volume {volume} \(subject a\)"):
        VolumeDataset(tmp_path / "out")[0]


def test_a_truncated_dicom_header_is_not_called_a_mixed_series(tmp_path):
    from .scan_factory import write_dicom_series

    for cut in (300, 550):
        folder = tmp_path / f"cut{cut}"
        paths = write_dicom_series(folder, np.arange(5 * 6 * 7).reshape(5, 6, 7) + 1.0)
        paths[2].write_bytes(paths[2].read_bytes()[:cut])
        with pytest.raises(ScanError, match=f"cut{cut}: slice_002.dcm is truncated or incomplete"):
            read_volume(folder, MAX_VOXELS)


def test_a_reason_is_one_line(tmp_path, monkeypatch):
    from volta3d.data import preprocess as prep

    def read(path, *args, **kwargs):
        raise ScanError("first line\nsecond line")

    monkeypatch.setattr(prep, "read_volume", read)
    write_nifti(tmp_path / "in/a.nii.gz", head_like())
    _run(tmp_path / "in", tmp_path / "out")
    assert _rejected(tmp_path / "out")["a.nii.gz"] == "first line second line"


def test_a_bug_keeps_its_traceback_in_the_log(tmp_path, monkeypatch):
    from volta3d.data import preprocess as prep

    def read(path, *args, **kwargs):
        raise KeyError("a programming error")

    monkeypatch.setattr(prep, "read_volume", read)
    write_nifti(tmp_path / "in/a.nii.gz", head_like())
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert summary.errors == 1
    assert "unexpected error: KeyError" in _rejected(tmp_path / "out")["a.nii.gz"]
    assert "Traceback (most recent call last)" in (tmp_path / "out/preprocess.log").read_text()
