"""Read one scan into the project's I/O contract: ``(array[C, D, H, W] float32, meta)``.

``meta`` holds ``affine`` (4x4 voxel -> RAS world, mm), ``spacing`` (3 voxel sizes, mm) and
``orientation`` (axis codes such as ``"PSR"``). Everything downstream (reorientation, resampling,
cropping) works from this one shape, whatever the file format was.

Bad files raise :class:`ScanError` whose message a person can act on ("4D image with 3 volumes"),
so the batch preprocessor can record it in ``rejected.csv`` and go on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pydicom
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from volta3d.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The voxel limit is preprocess.max_voxels (512^3 in default.yaml): headers declaring more are refused
# before any voxel is read (a 4 KB file can declare terabytes).
# Bytes a voxel may take on disk under the limit: a float32 volume of max_voxels is read whole, a
# float64 one of as many voxels would need twice the bytes for its raw data plus the float32 copy.
MAX_BYTES_PER_VOXEL = 4
# Deflate (gzip) inflates at most 1032-fold: a header declaring more than that many times the file's
# size describes voxels the file cannot hold, and nibabel would allocate them before finding out.
MAX_DEFLATE_RATIO = 1032


class ScanError(InputError):
    """A scan that cannot be used; the message is the reason written to ``rejected.csv``."""


class ScanTooLarge(ScanError):
    """A scan over the configured voxel limit: rejected, but not cached, so raising the limit retries it."""


def check_voxel_count(shape: tuple[int, ...], name: str, max_voxels: int, what: str = "declares") -> None:
    """Refuse a grid of more than ``max_voxels`` voxels before anything of that size is allocated."""
    count = int(np.prod([int(n) for n in shape], dtype=object))
    if count > max_voxels:
        raise ScanTooLarge(
            f"{name}: {what} {' x '.join(str(int(n)) for n in shape)} = {count:,} voxels, over the limit of "
            f"{max_voxels:,} (preprocess.max_voxels)"
        )


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128; ``.dcm`` files without it are still tried."""
    return path.suffix.lower() == ".dcm" or pydicom.misc.is_dicom(path)


def make_meta(affine: np.ndarray) -> dict[str, Any]:
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"invalid voxel-to-world affine {np.round(affine, 3).tolist()}")
    return {
        "affine": affine,
        "spacing": tuple(float(s) for s in spacing),
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
    }


def read_volume(path: str | Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a NIfTI file or a DICOM series folder.

    Returns ``(array, meta)`` with ``array`` of shape ``(1, D, H, W)`` float32 (file axis order;
    reorientation happens later, from ``meta['affine']``). Raises :class:`ScanError`, also for a grid of
    more than ``max_voxels`` (``preprocess.max_voxels``) voxels.
    """
    path = Path(path)
    _check_openable(path)
    if path.is_symlink() and not path.exists():
        raise ScanError(_broken_link_reason(path))
    if not path.exists():
        raise ScanError(f"file not found: {path}")
    if path.is_dir():
        return read_dicom_series(path, max_voxels)
    if path.suffix.lower() == ".dcm":
        raise ScanError(f"{path.name} is a single DICOM file; give the folder that holds the whole series")
    return read_nifti(path, max_voxels)


def _check_openable(path: Path) -> None:
    """A path the system refuses outright (longer than it allows, a looping folder) is rejected with the
    reason, not a traceback that stops the batch; a very long path is named by its length."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # named by the checks that follow ("file not found")
    except OSError as err:
        what = f"a path of {len(str(path)):,} characters" if len(str(path)) > 255 else str(path)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ScanError(f"cannot open {what}: {reason}") from None


def _broken_link_reason(path: Path) -> str:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return f"{path.name}: symbolic link loop"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path.name}: symbolic link loop"
    return f"{path.name}: dangling symbolic link (to {os.readlink(path)}, which does not exist)"


def _one_line(err: BaseException) -> str:
    """An exception as one line for rejected.csv (some libraries put newlines in messages)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_nifti(path: Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """NIfTI (or any format nibabel reads): ``(1, D, H, W)`` float32 + meta."""
    try:
        # nib.load is annotated as returning any file-based image; NIfTI / MGH / Analyze are spatial
        img = cast(SpatialImage, nib.load(str(path)))
    except Exception as err:
        raise ScanError(f"cannot read {path.name} (truncated or corrupt?): {_one_line(err)}") from None
    check_voxel_count(img.shape, path.name, max_voxels)
    _check_nifti_header(img, path)
    _check_declared_bytes(img, path, max_voxels)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, ...)
        raise ScanError(f"cannot read {path.name} (truncated or corrupt?): {_one_line(err)}") from None
    return _as_channel_first(data, path.name), make_meta(img.affine)


def _check_nifti_header(img: Any, path: Path) -> None:
    """Refuse what nibabel would otherwise convert silently: complex or RGB voxels (a float32 cast
    drops the imaginary part), and voxel sizes of 0 or < 0 that the affine depends on (nibabel
    patches them to 1 / abs on load, so the raw header is read again, unchecked)."""
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise ScanError(f"{path.name}: complex-valued voxels ({dtype}); give a magnitude (real) image")
    if dtype.fields is not None:
        raise ScanError(f"{path.name}: structured voxels ({dtype}, e.g. RGB); give a single-channel image")
    header = img.header
    if not isinstance(header, nib.Nifti1Header) or int(header["sform_code"]) > 0:
        return  # an sform affine does not use pixdim
    with ImageOpener(str(path)) as f:
        raw = type(header).from_fileobj(f, check=False)
    ndim = min(3, int(raw["dim"][0]))
    pixdim = [float(v) for v in raw["pixdim"][1 : 1 + ndim]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise ScanError(
            f"{path.name}: voxel size (pixdim) {pixdim} is not positive and the header has no sform "
            "affine to take it from"
        )


def _check_declared_bytes(img: Any, path: Path, max_voxels: int) -> None:
    """Refuse, before nibabel allocates the buffer the header declares, voxel data over the byte limit
    (``max_voxels`` float32 voxels) and data the file cannot hold: an uncompressed file shorter than
    its header says, or a gzip file too small to inflate to it."""
    dtype = img.get_data_dtype()
    n_bytes = int(np.prod([int(n) for n in img.shape], dtype=object)) * dtype.itemsize
    limit = max_voxels * MAX_BYTES_PER_VOXEL
    shape = " x ".join(str(int(n)) for n in img.shape)
    if n_bytes > limit:
        raise ScanTooLarge(
            f"{path.name}: declares {shape} {dtype} voxels = {n_bytes:,} bytes, over the limit of {limit:,} "
            f"(preprocess.max_voxels x {MAX_BYTES_PER_VOXEL} bytes)"
        )
    image_file = img.file_map["image"].filename if "image" in img.file_map else None
    offset = getattr(img.header, "get_data_offset", None)
    if image_file is None or offset is None:
        return
    needed, stored = int(offset()) + n_bytes, Path(image_file).stat().st_size
    name = Path(image_file).name
    if name.lower().endswith(".gz") and needed > MAX_DEFLATE_RATIO * stored:
        raise ScanError(
            f"cannot read {name} (truncated or corrupt?): its header declares {needed:,} bytes, more than "
            f"{MAX_DEFLATE_RATIO} times the {stored:,}-byte compressed file can inflate to"
        )
    if not name.lower().endswith((".gz", ".bz2", ".zst")) and needed > stored:
        raise ScanError(
            f"cannot read {name} (truncated or corrupt?): its header declares {needed:,} bytes, the file "
            f"holds {stored:,}"
        )


def _as_channel_first(data: np.ndarray, name: str) -> np.ndarray:
    """(X, Y, Z[, 1, ...]) -> (1, X, Y, Z); 2D images and true 4D series are rejected."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:  # e.g. NIfTI (X, Y, Z, 1): a 3D volume in a 4D header
        data = data[..., 0]
    if data.ndim > 3:
        raise ScanError(
            f"{name}: {data.ndim}D image of shape {shape} ({int(np.prod(shape[3:]))} volumes); "
            "give one 3D volume per scan"
        )
    if data.ndim < 3 or min(data.shape) == 1:
        raise ScanError(f"{name}: 2D image of shape {shape}; a 3D volume is needed")
    return np.ascontiguousarray(data)[None]


def read_dicom_series(folder: Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One folder = one DICOM series: validate, sort slices along their normal, stack.

    Hand-written rather than MONAI's ``PydicomReader`` because that reader orders slices by
    ``InstanceNumber`` and takes the slice step from the z coordinate alone, which is wrong for
    sagittal or oblique series (common for T1) and cannot detect the defects rejected here:
    several series in one folder, missing slices, uneven slice positions.

    Output ``(1, columns, rows, slices)`` so the affine columns are (row direction, column
    direction, slice normal), converted from DICOM's LPS to RAS.
    """
    headers = _read_headers(folder)
    _check_series_headers(folder, headers)

    orient = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    for f, ds in headers:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-4):
            raise ScanError(f"{folder.name}: slice {f.name} has a different ImageOrientationPatient")
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    order = np.argsort(positions @ normal)
    headers = [headers[i] for i in order]
    positions = positions[order]
    _check_instance_numbers(folder, headers)
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise ScanError(f"{folder.name}: two slices share the same position (duplicate slices)")
    if steps.max() - steps.min() > 0.01 * np.median(steps) + 1e-3:
        raise ScanError(
            f"{folder.name}: uneven slice positions (gaps from {steps.min():.2f} to {steps.max():.2f} mm): "
            "missing or extra slices"
        )

    first = headers[0][1]
    check_voxel_count(
        (getattr(first, "Rows", 0), getattr(first, "Columns", 0), len(headers)), folder.name, max_voxels
    )
    slices = []
    for f, _ in headers:
        try:
            ds = pydicom.dcmread(f)
            slices.append(apply_rescale(ds.pixel_array.astype(np.float32), ds).astype(np.float32))
        except Exception as err:
            raise ScanError(
                f"{folder.name}: cannot read pixels of {f.name} (truncated or corrupt?): {err}"
            ) from None
    if len({s.shape for s in slices}) > 1:
        raise ScanError(f"{folder.name}: slices have different sizes {sorted({s.shape for s in slices})}")
    volume = np.stack(slices, axis=-1)  # (rows, cols, slices)
    volume = np.transpose(volume, (1, 0, 2))  # -> (cols, rows, slices): axis 0 runs along a row

    row_spacing, col_spacing = (float(v) for v in headers[0][1].PixelSpacing)  # between rows, between columns
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
    return np.ascontiguousarray(volume)[None], make_meta(affine)


def _check_series_headers(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]) -> None:
    """One series, at least two slices, the geometry tags present. A header cut short loses its
    last tags or has them truncated, so before blaming the series the files are checked for that."""
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")).strip() for _, ds in headers})
    if len(uids) > 1 or uids == [""]:
        _raise_if_truncated(folder, headers)
        if "" in uids:
            f = next(f for f, ds in headers if not str(getattr(ds, "SeriesInstanceUID", "")).strip())
            raise ScanError(f"{folder.name}: DICOM header of {f.name} has no SeriesInstanceUID")
        raise ScanError(
            f"{folder.name}: folder mixes {len(uids)} DICOM series (SeriesInstanceUID {', '.join(uids)}); "
            "put one series per folder"
        )
    if len(headers) < 2:
        raise ScanError(f"{folder.name}: a single DICOM slice is a 2D image; a 3D series is needed")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [f.name for f, ds in headers if tag not in ds]
        if missing:
            _raise_if_truncated(folder, headers)
            raise ScanError(f"{folder.name}: DICOM tag {tag} missing in {missing[0]}")


def _raise_if_truncated(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Name the first file whose pixel data is missing or shorter than its header declares (a file
    cut short). Reads whole files, so it runs only on the way to another error."""
    for f, _ in headers:
        try:
            ds = pydicom.dcmread(f)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
            complete = "PixelData" in ds and len(ds.PixelData) >= expected * frames
        except Exception:  # any failure to parse the whole file means it is not complete
            complete = False
        if not complete:
            raise ScanError(f"{folder.name}: {f.name} is truncated or incomplete (no complete pixel data)")


def _read_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    headers: list[tuple[Path, pydicom.Dataset]] = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            headers.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except InvalidDicomError:
            if f.suffix.lower() == ".dcm":
                raise ScanError(f"{folder.name}: {f.name} is not a readable DICOM file") from None
        except Exception as err:
            raise ScanError(
                f"{folder.name}: cannot read DICOM header of {f.name}: {_one_line(err)}"
            ) from None
    if not headers:
        raise ScanError(f"{folder.name}: no DICOM files in folder")
    return headers


def _check_instance_numbers(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]) -> None:
    numbers = [getattr(ds, "InstanceNumber", None) for _, ds in headers]
    if any(n is None for n in numbers):
        return  # optional tag: the position check alone decides
    ordered = sorted(int(n) for n in numbers if n is not None)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b - a != 1:
            what = "repeats" if a == b else "jumps"
            raise ScanError(f"{folder.name}: missing slices (InstanceNumber {what} from {a} to {b})")
