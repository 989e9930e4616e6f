"""Reading CT volumes and 2-D slice images, and checking that a volume is a usable CT.

Volumes come back in Hounsfield units as float32 with the input's own geometry (never
reoriented: `geometry.orient_to_lps` does that on a copy). Voxels without data (DICOM pixel
padding outside the reconstruction circle) are set to NO_DATA_HU; any value below
NO_DATA_BELOW_HU is no data, never air or tissue (`has_data`). Every failure is a one-line
`CovidCTError` a user can act on; SimpleITK's multi-line exception text is not passed on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputNotFoundError, NotACTError, UnreadableInputError, UsageError
from .nifti_header import qform_sform_notes
from .result import InputInfo

VOLUME_FORMATS = {
    ".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha",
}
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
TAG_MODALITY = "0008|0060"
TAG_POSITION = "0020|0032"  # ImagePositionPatient
TAG_ORIENTATION = "0020|0037"  # ImageOrientationPatient
TAG_PADDING_VALUE = "0028|0120"  # PixelPaddingValue, in stored (pre-rescale) units
TAG_PADDING_LIMIT = "0028|0121"  # PixelPaddingRangeLimit: padding is the stored range value..limit
TAG_RESCALE_INTERCEPT = "0028|1052"
TAG_RESCALE_SLOPE = "0028|1053"
NO_DATA_HU = -3024.0  # what padded voxels are set to
NO_DATA_BELOW_HU = -1100.0  # air is about -1000 HU: lower values are no data, never air or tissue
CT_MODALITY = "CT"
MAX_GAP_FACTOR = 1.5  # a step between slices this much above the usual one means missing slices
DUPLICATE_TOLERANCE_MM = 1e-3
LUNG_WINDOW_LEVEL = -700.0  # DICOM slices are shown to read_image_2d's callers in this window
LUNG_WINDOW_WIDTH = 1500.0
MIN_SLICES = 8
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
AIR_PERCENTILE = 1.0  # CT has air: this percentile of the voxels must be below AIR_PERCENTILE_MAX_HU
AIR_PERCENTILE_MAX_HU = -500.0
HU_SAMPLE_VOXELS = 2_000_000  # percentiles are estimated on about this many voxels
SINGLE_SLICE_MESSAGE = "analyze needs a 3-D CT volume; for single slices use `covidct score-images`"


@dataclass
class LoadedVolume:
    image: sitk.Image  # float32 HU, the input's geometry
    info: InputInfo


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. "No Series were found") where the caller reports instead."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _unreadable(path: Path | str, what: str) -> UnreadableInputError:
    return UnreadableInputError(f"cannot read {path}: {what}")


def _check_modality(modality: str | None, where: Path) -> None:
    """NotACTError for a DICOM modality other than CT (files without the tag are accepted)."""
    if modality and modality.strip().upper() != CT_MODALITY:
        raise NotACTError(f"not a CT: modality {modality.strip()} ({where})")


def _header(path: str) -> sitk.ImageFileReader:
    """A reader that has read the file's header (not its pixels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise _unreadable(path, "not a readable image file (corrupt or unsupported format)") from None
    return reader


def _tag(reader: sitk.ImageFileReader, tag: str) -> str | None:
    return reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else None


def _check_slice_positions(files: list[str], folder: Path) -> None:
    """NotACTError when slices are duplicated or missing: positions along the slice normal must
    be evenly spaced (files sorted by position, as GDCM returns them)."""
    positions, normal = [], None
    for name in files:
        header = _header(name)
        position, orientation = _tag(header, TAG_POSITION), _tag(header, TAG_ORIENTATION)
        if position is None or orientation is None:
            return  # no geometry to check (not a cross-sectional series)
        try:
            if normal is None:
                cosines = np.array(orientation.split("\\"), dtype=float)
                normal = np.cross(cosines[:3], cosines[3:])
            positions.append(np.array(position.split("\\"), dtype=float) @ normal)
        except ValueError:
            return  # malformed tags: leave the geometry to the reader
    steps = np.abs(np.diff(positions))
    if len(steps) == 0:
        return
    duplicate = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if len(duplicate):
        at = positions[duplicate[0]]
        raise NotACTError(
            f"duplicate slices: {len(duplicate) + 1} or more slices at position {at:.2f} mm in {folder}"
        )
    usual = float(np.median(steps))
    gaps = np.flatnonzero(steps > MAX_GAP_FACTOR * usual)
    if len(gaps):
        g = gaps[0]
        raise NotACTError(
            f"missing slices: a gap of {steps[g]:.2f} mm between slice positions {positions[g]:.2f} and "
            f"{positions[g + 1]:.2f} mm (usual spacing {usual:.2f} mm) in {folder}"
        )


def _padding_hu(tags: Callable[[str], str | None]) -> tuple[float, float] | None:
    """The HU range [low, high] of a DICOM image's pixel padding, or None without PixelPaddingValue.

    Padding is given in stored values (an integer, or the range value..PixelPaddingRangeLimit);
    the rescale maps stored s to s * slope + intercept, so neighbouring stored values lie |slope|
    HU apart and the range is widened by half that to match exactly the padded stored values.
    """
    value = tags(TAG_PADDING_VALUE)
    if value is None or not value.strip():
        return None
    try:
        stored = [float(value.split("\\")[0])]
        limit = tags(TAG_PADDING_LIMIT)
        if limit is not None and limit.strip():
            stored.append(float(limit.split("\\")[0]))
        slope = float(tags(TAG_RESCALE_SLOPE) or 1.0)
        intercept = float(tags(TAG_RESCALE_INTERCEPT) or 0.0)
    except ValueError:
        return None  # malformed tags: no padding is known
    hu = [s * slope + intercept for s in stored]
    half_step = abs(slope) / 2
    return min(hu) - half_step, max(hu) + half_step


def _mark_padding(image: sitk.Image, paddings: list[tuple[float, float] | None]) -> sitk.Image:
    """A float32 copy of `image` with NO_DATA_HU where slice n's HU lie in paddings[n] (numpy's
    first axis; one entry for a 2-D image), or `image` itself when no slice has padding."""
    if not any(paddings):
        return image
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    planes = array if image.GetDimension() == 3 else array[None]
    for plane, padding in zip(planes, paddings):
        if padding is not None:
            plane[(plane >= padding[0]) & (plane <= padding[1])] = NO_DATA_HU
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(image)
    return marked


def has_data(hu: np.ndarray) -> np.ndarray:
    """True where a voxel holds a measurement (HU >= NO_DATA_BELOW_HU), False for padding / no data."""
    return hu >= NO_DATA_BELOW_HU


def _no_data_note(image: sitk.Image) -> list[str]:
    """A note on how much of the volume is padding (no data), or none when all voxels hold data."""
    array = sitk.GetArrayViewFromImage(image)
    missing = array.size - int(np.count_nonzero(has_data(array)))
    if missing == 0:
        return []
    return [
        f"{100 * missing / array.size:.2g} % of voxels are padding outside the scanner's field of view "
        f"(below {NO_DATA_BELOW_HU:.0f} HU or DICOM pixel padding): no data, never counted as air"
    ]


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, str, list[str]]:
    """The chosen series of a DICOM folder, its uid, and notes."""
    try:
        with _itk_warnings_off():
            uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        uids = []
    if not uids:
        raise _unreadable(folder, "no DICOM series in this folder (empty, or not DICOM files)")
    files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    notes = []
    if series_uid is not None:
        if series_uid not in files:
            raise _unreadable(folder, f"no series {series_uid}; the series here are: {', '.join(uids)}")
        uid = series_uid
    else:
        is_ct = {u: (_tag(_header(files[u][0]), TAG_MODALITY) or "").strip().upper() == CT_MODALITY for u in uids}
        uid = max(uids, key=lambda u: (is_ct[u], len(files[u])))
        if len(uids) > 1:
            others = ", ".join(f"{u} ({len(files[u])} files)" for u in uids if u != uid)
            notes.append(
                f"{len(uids)} series found; analysed {uid} ({len(files[uid])} slices); use --series UID for another: {others}"
            )
    _check_modality(_tag(_header(files[uid][0]), TAG_MODALITY), folder)
    _check_slice_positions(files[uid], folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[uid])
    reader.MetaDataDictionaryArrayUpdateOn()  # per-file tags: padding and rescale may differ by slice
    try:
        image = reader.Execute()
    except RuntimeError:
        raise _unreadable(folder, f"the DICOM series {uid} is corrupt or uses an unsupported encoding") from None
    paddings = [  # file n is the image's slice n
        _padding_hu(lambda tag, n=n: reader.GetMetaData(n, tag) if reader.HasMetaDataKey(n, tag) else None)
        for n in range(len(files[uid]))
    ]
    return _mark_padding(image, paddings), uid, notes


def _read_file(path: Path) -> tuple[sitk.Image, str]:
    """One image file and its format name."""
    suffix = _suffix(path)
    reader = _header(str(path))
    is_dicom = reader.GetImageIO() == "GDCMImageIO" or suffix in DICOM_SUFFIXES
    if is_dicom:
        _check_modality(_tag(reader, TAG_MODALITY), path)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise _unreadable(path, "the file is corrupt or uses an unsupported encoding") from None
    if is_dicom and image.GetNumberOfComponentsPerPixel() == 1:
        padding = _padding_hu(lambda tag: _tag(reader, tag))
        image = _mark_padding(image, [padding] * (image.GetSize()[2] if image.GetDimension() == 3 else 1))
    fmt = "dicom" if is_dicom else VOLUME_FORMATS.get(suffix) or IMAGE_FORMATS.get(suffix) or suffix.lstrip(".")
    return image, fmt


def _too_many_dimensions(image: sitk.Image) -> str:
    return f"a {image.GetDimension()}-D image (a time series?); a CT volume is 3-D"


def _padded(values: tuple, fill: float) -> tuple:
    return tuple(values) + (fill,) * (3 - len(values))


def _info(image: sitk.Image, path: Path | None, fmt: str, uid: str | None, notes: list[str]) -> InputInfo:
    dimension = image.GetDimension()
    direction = np.eye(3)
    direction[:dimension, :dimension] = np.array(image.GetDirection()).reshape(dimension, dimension)
    return InputInfo(
        path=None if path is None else str(path),
        format=fmt,
        size=tuple(int(n) for n in _padded(image.GetSize(), 1)),
        spacing=tuple(float(s) for s in _padded(image.GetSpacing(), 1.0)),
        origin=tuple(float(o) for o in _padded(image.GetOrigin(), 0.0)),
        direction=tuple(float(d) for d in direction.ravel()),
        series_uid=uid,
        notes=notes,
    )


def read_volume(source: str | Path | sitk.Image, series_uid: str | None = None) -> LoadedVolume:
    """A CT from a DICOM folder, a volume file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), a single
    DICOM or 2-D image file, or an in-memory SimpleITK image; float32 HU in its own geometry.

    Several DICOM series in a folder: the largest CT series, unless `series_uid` names one.
    Raises InputNotFoundError, UnreadableInputError, or NotACTError (not CT, colour, missing or
    duplicate slices). Whether the volume is usable for analysis is `check_ct`'s job.
    """
    uid, notes = None, []
    if isinstance(source, sitk.Image):
        image, path, fmt = source, None, "image"
    else:
        path = Path(source)
        if not path.exists():
            raise InputNotFoundError(f"input not found: {path}")
        if path.is_dir():
            image, uid, notes = _read_dicom_series(path, series_uid)
            fmt = "dicom"
        else:
            if series_uid is not None:
                raise UsageError(f"--series picks a series of a DICOM folder; {path} is a file (leave --series out)")
            image, fmt = _read_file(path)
            if fmt == "nifti":
                notes = qform_sform_notes(path, image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotACTError(
            f"not a CT: {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour image?); a CT has one"
        )
    if image.GetDimension() > 3:
        raise NotACTError(_too_many_dimensions(image))
    image = sitk.Cast(image, sitk.sitkFloat32)
    return LoadedVolume(image=image, info=_info(image, path, fmt, uid, notes + _no_data_note(image)))


def _sample(array: np.ndarray) -> np.ndarray:
    """About HU_SAMPLE_VOXELS voxels spread evenly over the array."""
    step = max(1, int(np.ceil(array.size / HU_SAMPLE_VOXELS)))
    return array.ravel()[::step]


def check_ct(image: sitk.Image) -> None:
    """NotACTError unless the image is a 3-D CT volume in HU that the analysis can use."""
    if image.GetDimension() > 3:
        raise NotACTError(_too_many_dimensions(image))
    if image.GetDimension() < 3 or min(image.GetSize()) <= 1:
        raise NotACTError(SINGLE_SLICE_MESSAGE)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotACTError("not a CT: more than one value per voxel (a colour image?)")
    spacing = image.GetSpacing()
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise NotACTError(
            f"implausible voxel spacing {tuple(round(s, 4) for s in spacing)} mm "
            f"(each must be {MIN_SPACING_MM} to {MAX_SPACING_MM} mm)"
        )
    slices = image.GetSize()[geometry.axial_axis(image)]
    if slices < MIN_SLICES:
        raise NotACTError(f"only {slices} axial slices; analyze needs at least {MIN_SLICES}")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise NotACTError("the volume contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise NotACTError(f"the volume is constant ({low:g} everywhere)")
    sample = _sample(array)
    sample = sample[has_data(sample)]  # padding is not air
    air = float(np.percentile(sample, AIR_PERCENTILE)) if sample.size else low  # no data at all: high < 0 below
    if air > AIR_PERCENTILE_MAX_HU or high < 0:
        raise NotACTError(
            f"values do not look like CT Hounsfield units ({AIR_PERCENTILE:g}st percentile {air:.0f}, "
            f"maximum {high:.0f}; air should be near -1000)"
        )


def hu_to_u8(hu: np.ndarray) -> np.ndarray:
    """HU -> uint8 in the lung window (level LUNG_WINDOW_LEVEL, width LUNG_WINDOW_WIDTH), as slice
    images are shown to `read_image_2d`'s callers and to the lung network."""
    low = LUNG_WINDOW_LEVEL - LUNG_WINDOW_WIDTH / 2
    scaled = (np.asarray(hu, np.float32) - low) * (255.0 / LUNG_WINDOW_WIDTH)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def read_image_2d(path: str | Path) -> np.ndarray:
    """A 2-D slice as 8-bit grayscale (H, W): PNG, JPEG or BMP as stored, a single-slice DICOM in
    HU windowed to the lung window (level LUNG_WINDOW_LEVEL, width LUNG_WINDOW_WIDTH)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"input not found: {path}")
    if path.is_dir():
        raise _unreadable(path, "a folder, not a slice image")
    suffix = _suffix(path)
    if suffix in IMAGE_FORMATS:
        gray = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise _unreadable(path, f"not a valid {IMAGE_FORMATS[suffix].upper()} image")
        return gray
    image, fmt = _read_file(path)
    if fmt != "dicom":
        raise _unreadable(path, "not a PNG, JPEG, BMP or DICOM slice")
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1:  # a colour (secondary capture) DICOM
        return cv2.cvtColor(array.reshape(array.shape[-3:]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if array.ndim == 3 and array.shape[0] != 1:
        raise _unreadable(path, f"{array.shape[0]} slices in one file; give a single slice")
    return hu_to_u8(array.reshape(array.shape[-2:]))
