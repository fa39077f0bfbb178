"""Tiny synthetic scans for the ingest tests: NIfTI files, DICOM series (pydicom), BIDS trees."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def head_like(shape=(20, 22, 18), seed=0) -> np.ndarray:
    """An ellipsoid 'head' with texture on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    return (inside * (100 + 20 * rng.standard_normal(shape))).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    pixel_spacing=(0.9, 0.8),
    slice_step=2.0,
    origin=(-10.0, -20.0, 30.0),
    series_uid: str | None = None,
    file_order: list[int] | None = None,
    rescale=(2.0, -5.0),
) -> list[Path]:
    """``volume`` is (slices, rows, cols) of integers; slice k sits at origin + k * slice_step * normal (LPS).

    Pixel (r, c) of slice k is at IPP_k + c * pixel_spacing[1] * row_dir + r * pixel_spacing[0] * col_dir
    (DICOM PS3.3 C.7.6.2.1.1). Stored values are (volume - intercept) / slope.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(row_dir, col_dir)
    slope, intercept = rescale
    paths = []
    order = file_order if file_order is not None else list(range(volume.shape[0]))
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{len(paths):03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*row_dir, *col_dir]
        ds.ImagePositionPatient = list(np.asarray(origin) + k * slice_step * normal)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_step
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((volume[k] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_bids(root: Path) -> None:
    """sub-01 (two sessions) and sub-02 (no session), participants.tsv with age/sex (one n/a)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30.5\tF\nsub-02\tn/a\tM\n")
    write_nifti(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", head_like(seed=1))
    write_nifti(root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz", head_like(seed=2))
    write_nifti(root / "sub-02/anat/sub-02_T1w.nii", head_like(seed=3))
    write_nifti(root / "sub-02/anat/sub-02_T2w.nii", head_like(seed=4))  # not a T1w: ignored
