"""Reading CT volumes and 2-D slice images, and checking that a volume is a usable CT.

Volumes come back in Hounsfield units with the input's own geometry (never reoriented:
`geometry.orient_to_lps` does that). HU are int16 where every value is a whole number in its
range (CT as scanners store it: half the memory of float32, `hu_pixel_type`), else float32.
Voxels without data (DICOM pixel padding outside the reconstruction circle) are set to
NO_DATA_HU; any value below NO_DATA_BELOW_HU is no data, never air or tissue (`has_data`).
Every failure is a one-line `CovidCTError` a user can act on; SimpleITK's multi-line exception
text is not passed on.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import re

import cv2
import numpy as np
import SimpleITK as sitk

from . import geometry
from .cpu_threads import cpu_threads
from .display import LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH
from .errors import CovidCTError, InputNotFoundError, NotACTError, UnreadableInputError, UsageError
from .nifti_header import qform_sform_notes
from .result import InputInfo

VOLUME_FORMATS = {
    ".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha",
}
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
ZIP_SUFFIX = ".zip"  # a DICOM folder zipped, as PACS viewers export a study
DICOMDIR = "DICOMDIR"  # the index file of a DICOM CD or PACS export (PS3.10); its folder is read
MAX_ZIP_BYTES = 4 * 2**30  # unzipped: a MAX_VOLUME_SIZE CT of 16-bit voxels; more is refused before unzipping
TAG_MODALITY = "0008|0060"
TAG_IMAGE_TYPE = "0008|0008"
TAG_GANTRY_TILT = "0018|1120"  # GantryDetectorTilt, degrees
TAG_KERNEL = "0018|1210"  # ConvolutionKernel
TAG_SLICE_THICKNESS = "0018|0050"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_POSITION = "0020|0032"  # ImagePositionPatient
TAG_ORIENTATION = "0020|0037"  # ImageOrientationPatient
TAG_SERIES_UID = "0020|000e"  # SeriesInstanceUID
TAG_PIXEL_SPACING = "0028|0030"  # PixelSpacing: row spacing \ column spacing, mm
TAG_PHOTOMETRIC = "0028|0004"  # PhotometricInterpretation
TAG_PADDING_VALUE = "0028|0120"  # PixelPaddingValue, in stored (pre-rescale) units
TAG_PADDING_LIMIT = "0028|0121"  # PixelPaddingRangeLimit: padding is the stored range value..limit
TAG_RESCALE_INTERCEPT = "0028|1052"
TAG_RESCALE_SLOPE = "0028|1053"
NO_DATA_HU = -3024.0  # what padded voxels are set to
NO_DATA_BELOW_HU = -1100.0  # air is about -1000 HU: lower values are no data, never air or tissue
CT_MODALITY = "CT"
MAX_GAP_FACTOR = 1.5  # a step between slices this much above the usual one means missing slices
# Steps between slices may differ by this fraction of their mean (or by the precision the positions
# are written with, if coarser); more is uneven slice spacing, which one voxel grid cannot hold.
SPACING_TOLERANCE = 0.01
DUPLICATE_TOLERANCE_MM = 1e-3
LOCALIZER = "LOCALIZER"  # in ImageType: a scout image, left out of the volume
ORIENTATION_TOLERANCE_DEG = 0.5  # images whose rows or columns turn more from most images' are another orientation
# Among several series, the lungs are read on a thin lung-kernel reconstruction: a kernel is a lung
# kernel when its name or the series description says LUNG or PULM, or it is a sharp Siemens
# (B50f, Br59, Bl64, I70f: a sharpness of 50 or more) or Canon (FC50 to FC59) kernel.
THIN_SLICE_MM = 1.5
LUNG_KERNEL_WORDS = ("LUNG", "PULM")
SHARP_KERNEL = re.compile(r"^(?:[A-Z][a-z]?([5-9]\d)|FC5\d)")
# No chest CT has more voxels than this (i, j, k in any order: a 1024 x 1024 matrix, 2000 slices);
# larger volumes are refused from their header, before their pixels are read.
MAX_VOLUME_SIZE = (1024, 1024, 2000)
# An analysis holds about 12 bytes per voxel at its peak (int16 HU, labels, the float32 heat map,
# the writers' buffers) beside the model's 0.7 GB: this many voxels keep it under 4 GB (measured
# by `make benchmark`). A 512 x 512 CT of up to 915 slices (0.5 mm over 450 mm); a 1024 x 1024
# ultra-high-resolution CT only up to 228 slices (the 512 x 512 reconstruction serves the lungs).
MAX_VOXELS = 240_000_000
MIN_SLICES = 8
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
AIR_PERCENTILE = 1.0  # CT has air: this percentile of the voxels must be below AIR_PERCENTILE_MAX_HU
AIR_PERCENTILE_MAX_HU = -500.0
HU_SAMPLE_VOXELS = 2_000_000  # percentiles are estimated on about this many voxels
SINGLE_SLICE_MESSAGE = "analyze needs a 3-D CT volume; for single slices use `covidct score-images`"


@dataclass
class LoadedVolume:
    image: sitk.Image  # int16 or float32 HU (`hu_pixel_type`), the input's geometry
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


@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """What C++ code (ITK's MetaImage reader among it) writes to the process's stderr while inside is
    held back: written out after a success, dropped after a failure, which the caller reports in
    one line of its own."""
    import sys

    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if not failed:
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
        held.close()


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
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError:
        raise _unreadable(path, "not a readable image file (corrupt or unsupported format)") from None
    return reader


def _tag(reader: sitk.ImageFileReader, tag: str) -> str | None:
    return reader.GetMetaData(tag) if reader.HasMetaDataKey(tag) else None


def size_text(size) -> str:
    """A grid size as refusals print it: "512 x 512 x 916"."""
    return " x ".join(str(int(n)) for n in size)


def _check_size(size, where) -> None:
    """NotACTError, before any pixel is read, for a volume larger than MAX_VOLUME_SIZE (voxels, any
    axis order) or holding more than MAX_VOXELS voxels."""
    dims = sorted(tuple(int(n) for n in size[:3]) + (1,) * (3 - len(size[:3])))
    if any(n > m for n, m in zip(dims, MAX_VOLUME_SIZE)) or np.prod(size, dtype=float) > np.prod(MAX_VOLUME_SIZE, dtype=float):
        raise NotACTError(
            f"{size_text(size)} voxels, more than a chest CT has (at most {size_text(MAX_VOLUME_SIZE)} in any axis "
            f"order); not read ({where})"
        )
    if np.prod(size, dtype=float) > MAX_VOXELS:
        raise NotACTError(
            f"{size_text(size)} voxels ({np.prod(size, dtype=float) / 1e6:.1f} million), more than the "
            f"{MAX_VOXELS / 1e6:.0f} million that fit the analysis's 4 GB of memory; read a thicker or 512 x 512 "
            f"reconstruction of the series instead; not read ({where})"
        )


def _gantry_tilt(angle_deg: float, how: str, where) -> NotACTError:
    return NotACTError(
        f"gantry tilt of {angle_deg:.1f} degrees ({how}): a sheared voxel grid, which the analysis cannot follow; "
        f"resample it to an orthogonal grid first (e.g. dcm2niix's gantry-tilt correction) ({where})"
    )


def _check_grid(axes, size, spacing, where) -> None:
    """NotACTError for a sheared 3-D grid; axes: 3x3, column a along voxel axis a."""
    if len(size) != 3:
        return
    tilt = geometry.shear_deg(axes, [n * s for n, s in zip(size, spacing)], spacing)
    if tilt:
        raise _gantry_tilt(tilt, f"two voxel axes {90 - tilt:.1f} degrees apart, not 90", where)


def _check_nifti_complete(reader: sitk.ImageFileReader, path: Path) -> None:
    """UnreadableInputError for a NIfTI file shorter than its header says (a truncated download or copy):
    ITK reads what is there and fills the rest with zeros, 0 HU, without a word.

    The data end at vox_offset + the voxels' bytes (NIfTI-1/2: dim[1..dim[0]], bitpix). A .nii file must
    be at least that long; a .nii.gz must decompress to that many bytes, checked from gzip's trailer
    (ISIZE, RFC 1952: the size modulo 2^32) and, only where the trailer disagrees (a multi-member file),
    by decompressing it."""
    try:
        dims = [int(float(_tag(reader, f"dim[{n}]"))) for n in range(1, int(float(_tag(reader, "dim[0]"))) + 1)]
        expected = int(float(_tag(reader, "vox_offset"))) + int(np.prod(dims, dtype=np.int64)) * int(_tag(reader, "bitpix")) // 8
    except (TypeError, ValueError):
        return  # a header ITK read without these fields: nothing to compare
    if not path.name.lower().endswith(".gz"):
        found = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            found = int.from_bytes(f.read(4), "little")
        if found != expected % 2 ** 32:
            found = _gunzipped_size(path)
    if found < expected:
        raise _unreadable(path, f"the file is truncated: its image data end after {found} of the {expected} bytes its "
                                "header gives (an interrupted download or copy?)")


def _gunzipped_size(path: Path) -> int:
    """Bytes a gzip file (any number of members) decompresses to, as far as it can be read."""
    import gzip
    import zlib

    size = 0
    with gzip.open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 16):
                size += len(chunk)
        except (EOFError, OSError, zlib.error):  # truncated or corrupt: what was read
            pass
    return size


def _check_nifti_sform(reader: sitk.ImageFileReader, where) -> None:
    """NotACTError for a NIfTI whose sform is sheared (ITK would silently read a rotated grid instead)."""
    try:
        if int(_tag(reader, "sform_code") or 0) <= 0:
            return
        srow = np.array([_tag(reader, f"srow_{c}").split()[:3] for c in "xyz"], dtype=float)
    except (AttributeError, ValueError):
        return  # no or malformed sform: ITK's qform stands
    spacing = np.linalg.norm(srow, axis=0)
    if np.all(spacing > 0):
        _check_grid(srow, reader.GetSize()[:3], spacing, where)


@dataclass(eq=False)
class _SliceHeader:
    """One DICOM file's place in a series (position and cosines None when absent or malformed)."""

    name: str
    size: tuple[int, int, int]  # columns, rows, frames
    spacing: tuple[float, float]  # mm between columns, between rows
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    resolution_mm: float  # the rounding step of the least precise position coordinate as written
    cosines: np.ndarray | None  # ImageOrientationPatient: the row direction, then the column direction
    localizer: bool  # ImageType says LOCALIZER
    tilt_deg: float  # GantryDetectorTilt, 0 when absent
    has_pixel_spacing: bool  # PixelSpacing present (ITK takes 1 mm without it)
    modality: str | None
    photometric: str | None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.cosines[:3], self.cosines[3:])


def _slice_header(name: str) -> _SliceHeader:
    header = _header(name)

    def numbers(tag: str, count: int) -> np.ndarray | None:
        try:
            values = np.array([v.strip() for v in (_tag(header, tag) or "").split("\\")], dtype=float)
        except ValueError:
            return None
        return values if len(values) == count and np.isfinite(values).all() else None

    position, cosines, tilt = numbers(TAG_POSITION, 3), numbers(TAG_ORIENTATION, 6), numbers(TAG_GANTRY_TILT, 1)
    if cosines is not None:
        norms = np.linalg.norm(cosines.reshape(2, 3), axis=1)
        cosines = (cosines.reshape(2, 3) / norms[:, None]).ravel() if np.all(norms > 0) else None
    try:
        exponent = max(Decimal(v.strip()).as_tuple().exponent for v in _tag(header, TAG_POSITION).split("\\"))
        resolution = 10.0 ** exponent if isinstance(exponent, int) else 0.0
    except (AttributeError, InvalidOperation, TypeError, ValueError):
        resolution = 0.0
    size = tuple(header.GetSize()) + (1,) * (3 - header.GetDimension())
    return _SliceHeader(
        name=name,
        size=tuple(int(n) for n in size[:3]),
        spacing=tuple(float(v) for v in header.GetSpacing()[:2]),
        position=position,
        resolution_mm=resolution,
        cosines=cosines,
        localizer=LOCALIZER in (_tag(header, TAG_IMAGE_TYPE) or "").upper(),
        tilt_deg=0.0 if tilt is None else float(tilt[0]),
        has_pixel_spacing=numbers(TAG_PIXEL_SPACING, 2) is not None,
        modality=_tag(header, TAG_MODALITY),
        photometric=(_tag(header, TAG_PHOTOMETRIC) or "").strip().upper() or None,
    )


def _check_headers(headers: list[_SliceHeader], folder: Path) -> None:
    """NotACTError, from the headers, for what would be read silently wrong: an image of another modality than
    CT, without ImagePositionPatient or ImageOrientationPatient (ITK would make up the slices' order, spacing and
    direction) or PixelSpacing (ITK would take 1 mm), or stored as MONOCHROME1 (ITK inverts it: not HU)."""
    for h in headers:
        _check_modality(h.modality, Path(h.name))
    for what, lacking in (("ImagePositionPatient", [h for h in headers if h.position is None]),
                          ("ImageOrientationPatient", [h for h in headers if h.cosines is None]),
                          ("PixelSpacing", [h for h in headers if not h.has_pixel_spacing])):
        if lacking:
            raise NotACTError(f"{len(lacking)} of the series' {len(headers)} images have no (valid) {what}, e.g. "
                              f"{Path(lacking[0].name).name}: the volume's geometry would be a guess ({folder})")
    inverted = [h for h in headers if h.photometric == "MONOCHROME1"]
    if inverted:
        raise NotACTError(f"{Path(inverted[0].name).name} is stored as MONOCHROME1, which this reader inverts: its "
                          f"values would not be Hounsfield units; convert the series to MONOCHROME2 ({folder})")


def _leave_out_localizers(headers: list[_SliceHeader]) -> list[_SliceHeader]:
    """The images that are not localizers: not ImageType LOCALIZER, and (when every image has an
    orientation) in the orientation most images share, within ORIENTATION_TOLERANCE_DEG."""
    kept = [h for h in headers if not h.localizer] or headers
    if any(h.cosines is None for h in kept):
        return kept
    cosines = np.array([h.cosines for h in kept])
    least = np.cos(np.radians(ORIENTATION_TOLERANCE_DEG))
    same = (cosines[:, :3] @ cosines[:, :3].T >= least) & (cosines[:, 3:] @ cosines[:, 3:].T >= least)
    usual = same[int(np.argmax(same.sum(axis=1)))]
    return [h for h, keep in zip(kept, usual) if keep]


def _check_matrix(headers: list[_SliceHeader], folder: Path) -> None:
    """NotACTError naming the first image whose matrix size differs from most images'."""
    sizes = Counter(h.size[:2] for h in headers)
    usual, count = sizes.most_common(1)[0]
    odd = next((h for h in headers if h.size[:2] != usual), None)
    if odd is not None:
        raise NotACTError(
            f"{Path(odd.name).name} is {size_text(odd.size[:2])} pixels where the series' other {count} images are "
            f"{size_text(usual)}: one series must have one matrix size ({folder})"
        )


def _uneven(steps: np.ndarray, precision_mm: float = 0.0) -> bool:
    """Whether slice steps (mm, along the normal) differ by more than SPACING_TOLERANCE of their mean, or
    than the positions' precision where that is larger: missing slices or an irregular grid."""
    return float(steps.max() - steps.min()) > max(SPACING_TOLERANCE * float(steps.mean()), precision_mm)


def _check_slice_positions(headers: list[_SliceHeader], folder: Path) -> None:
    """NotACTError unless the images, sorted along the slice normal, form one regular grid: no two at
    one position, positions along the normal (no gantry tilt), steps even (no missing slices)."""
    if len(headers) < 2:
        return
    first = headers[0]
    normal = first.normal
    positions = np.array([h.position for h in headers])
    along = positions @ normal
    steps = np.diff(along)
    names = [Path(h.name).name for h in headers]
    duplicate = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if len(duplicate):
        d = duplicate[0]
        raise NotACTError(
            f"two images at the same position: {names[d]} and {names[d + 1]} at {along[d]:.2f} mm along the slice "
            f"normal, and {len(duplicate) - 1} more such pair(s) (a slice stored twice, or two reconstructions under "
            f"one series UID; choose one) in {folder}"
        )
    travel = positions[-1] - positions[0]
    length = float(np.linalg.norm(travel))
    columns, rows = first.size[0] * first.spacing[0], first.size[1] * first.spacing[1]
    spacing = (*first.spacing, length / (len(headers) - 1))
    if geometry.shear_deg(np.column_stack([first.cosines[:3], first.cosines[3:], travel]), (columns, rows, length), spacing):
        angle = float(np.degrees(np.arccos(min(1.0, abs(travel @ normal) / length))))
        raise _gantry_tilt(angle, "slice positions advance at that angle to the slice normal", folder)
    tag_tilt = max((h.tilt_deg for h in headers), key=abs)
    shown = float(np.degrees(np.arccos(min(1.0, np.abs(normal).max()))))  # the orientation's tilt from the patient axes
    mismatch = np.radians(abs(tag_tilt) - shown)
    implied = [[1.0, 0.0, 0.0], [0.0, np.cos(mismatch), 0.0], [0.0, np.sin(mismatch), 1.0]]  # columns: rows, tilted columns, table
    if tag_tilt and geometry.shear_deg(implied, (columns, rows, length), spacing):
        raise _gantry_tilt(abs(tag_tilt), "GantryDetectorTilt, which the image orientation does not show", folder)
    low, high, mean = float(steps.min()), float(steps.max()), float(steps.mean())
    if _uneven(steps, max(h.resolution_mm for h in headers)):
        message = (
            f"uneven slice spacing: steps from {low:.2f} to {high:.2f} mm (they may differ by at most "
            f"{100 * SPACING_TOLERANCE:g} % of their mean, {mean:.2f} mm)"
        )
        usual = float(np.median(steps))
        gaps = np.flatnonzero(steps > MAX_GAP_FACTOR * usual)
        if len(gaps):
            g = gaps[0]
            message += (
                f"; missing slices: a gap of {steps[g]:.2f} mm between slice positions {along[g]:.2f} and "
                f"{along[g + 1]:.2f} mm (usual spacing {usual:.2f} mm)"
            )
        raise NotACTError(f"{message} in {folder}")


def _series_files(names: list[str], folder: Path) -> tuple[list[str], list[str]]:
    """The files of one DICOM series to read as a volume, sorted along the slice normal, and notes.

    Localizers (ImageType LOCALIZER, or another orientation than most images) are left out with a
    note. NotACTError for what one regular voxel grid cannot hold (another matrix size, two images
    at one position, gantry tilt, missing slices, uneven spacing) and for volumes beyond MAX_VOLUME_SIZE.
    """
    headers = [_slice_header(name) for name in names]
    kept = _leave_out_localizers(headers)
    notes = []
    if len(kept) < len(headers):
        left_out = [Path(h.name).name for h in headers if h not in kept]
        notes.append(
            f"{len(left_out)} localizer image(s) left out (ImageType {LOCALIZER} or another orientation than the other "
            f"{len(kept)} images): {', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}"
        )
    _check_headers(kept, folder)
    _check_matrix(kept, folder)
    _check_size((*kept[0].size[:2], sum(h.size[2] for h in kept)), folder)
    normal = kept[0].normal
    kept = sorted(kept, key=lambda h: float(h.position @ normal))
    _check_slice_positions(kept, folder)
    return [h.name for h in kept], notes


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
    """A copy of `image` with NO_DATA_HU where slice n's HU lie in paddings[n] (numpy's first
    axis; one entry for a 2-D image), or `image` itself when no slice has padding. Integer pixel
    types that cannot hold NO_DATA_HU become float32."""
    if not any(paddings):
        return image
    array = sitk.GetArrayFromImage(image)
    if not (array.dtype.kind == "f" or (array.dtype.kind == "i" and array.dtype.itemsize >= 2)):
        array = array.astype(np.float32)
    planes = array if image.GetDimension() == 3 else array[None]
    for plane, padding in zip(planes, paddings):
        if padding is not None:
            plane[(plane >= padding[0]) & (plane <= padding[1])] = NO_DATA_HU
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(image)
    return marked


class _ImageVoxels:
    """Exposes a SimpleITK image's voxel buffer to numpy while holding the image (`voxel_view`)."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def voxel_view(image: sitk.Image) -> np.ndarray:
    """A read-only numpy view of the image's voxels, [k, j, i] for 3-D, that keeps the image alive.

    SimpleITK's own `GetArrayViewFromImage` does not: once the image is collected (e.g.
    `read_ct(path).hu`, whose image is a temporary), its view reads freed memory: zeros,
    another array's values, or a crash.
    """
    return np.asarray(_ImageVoxels(image))


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


@dataclass
class _Series:
    """What one DICOM series is, from its first image that is not a localizer."""

    uid: str
    images: int
    ct: bool
    axial: bool  # slice normal closest to the patient's feet-head axis (or no orientation given)
    kernel: str
    lung_kernel: bool
    thickness_mm: float | None

    def rank(self) -> tuple:
        """Larger is better: CT, axial, a lung kernel, thin slices, thinner slices, more images."""
        thickness = self.thickness_mm if self.thickness_mm is not None else float("inf")
        return (self.ct, self.axial, self.lung_kernel, thickness <= THIN_SLICE_MM, -thickness, self.images)

    def describe(self) -> str:
        thickness = "" if self.thickness_mm is None else f", {self.thickness_mm:g} mm"
        kernel = f", kernel {self.kernel}" if self.kernel else ""
        return f"{self.uid} ({self.images} images{thickness}{kernel})"


# why a series ranks above another, by the first element of `_Series.rank` that differs
RANK_REASONS = (
    "CT modality", "axial slices", "lung kernel", f"slices of at most {THIN_SLICE_MM:g} mm", "thinner slices", "larger number of images",
)


def _series_summary(uid: str, names: list[str]) -> _Series:
    header = next((h for h in map(_header, names) if LOCALIZER not in (_tag(h, TAG_IMAGE_TYPE) or "").upper()), None)
    header = header or _header(names[0])
    kernel = " ".join((_tag(header, TAG_KERNEL) or "").replace("\\", " ").split())
    words = f"{kernel} {_tag(header, TAG_SERIES_DESCRIPTION) or ''}".upper()
    try:
        cosines = np.array((_tag(header, TAG_ORIENTATION) or "").split("\\"), dtype=float)
        axial = int(np.argmax(np.abs(np.cross(cosines[:3], cosines[3:6])))) == geometry.AXIS_S
    except ValueError:
        axial = True
    try:
        thickness = float(_tag(header, TAG_SLICE_THICKNESS) or "")
    except ValueError:
        thickness = None
    return _Series(
        uid=uid,
        images=len(names),
        ct=(_tag(header, TAG_MODALITY) or "").strip().upper() == CT_MODALITY,
        axial=axial,
        kernel=kernel,
        lung_kernel=any(w in words for w in LUNG_KERNEL_WORDS) or bool(SHARP_KERNEL.match(kernel)),
        thickness_mm=thickness if thickness and thickness > 0 else None,
    )


def _choose_series(files: dict[str, list[str]]) -> tuple[str, str | None]:
    """The series to analyse among a folder's (uid -> files), and a note saying why when there are several.

    Preferred, in order: CT, axial, a lung kernel, slices of at most THIN_SLICE_MM, thinner slices,
    more images (`_Series.rank`).
    """
    if len(files) == 1:
        return next(iter(files)), None
    ranked = sorted((_series_summary(uid, names) for uid, names in files.items()), key=_Series.rank, reverse=True)
    chosen, runner_up = ranked[0], ranked[1]
    why = next((f"its {r}" for r, a, b in zip(RANK_REASONS, chosen.rank(), runner_up.rank()) if a != b), "being found first")
    others = "; ".join(s.describe() for s in ranked[1:])
    return chosen.uid, (
        f"{len(ranked)} series found; analysed {chosen.describe()}, chosen for {why}; the others: {others}; "
        "use --series UID for another"
    )


def _series_in(folder: Path) -> dict[str, list[str]]:
    """The files of each DICOM series directly in `folder` (no subfolders)."""
    try:
        with _itk_warnings_off():
            uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        uids = []
    return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}


def _dicom_files(folder: Path) -> dict[str, list[str]]:
    """The files of each DICOM series in `folder` and every folder below it (a CD or PACS export: a DICOMDIR
    beside folders of images; a series split across folders), a series' files gathered across folders."""
    files = _series_in(folder)
    for sub in sorted(p for p in folder.rglob("*") if p.is_dir()):
        for uid, names in _series_in(sub).items():
            files.setdefault(uid, []).extend(names)
    return files


@contextmanager
def _unzipped(path: Path) -> Iterator[Path]:
    """A zipped DICOM folder, unzipped into a temporary folder removed afterwards; refused before
    unzipping when it is not a zip file or would unzip to more than MAX_ZIP_BYTES."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise _unreadable(path, "not a readable zip file") from None
    with archive, tempfile.TemporaryDirectory(prefix="covidct-zip-") as tmp:
        size = sum(member.file_size for member in archive.infolist())
        if size > MAX_ZIP_BYTES:
            raise NotACTError(f"{path.name} would unzip to {size / 2**30:.1f} GiB, more than a chest CT's "
                              f"{MAX_ZIP_BYTES / 2**30:.0f} GiB; not unzipped ({path})")
        try:
            archive.extractall(tmp)  # member names are made safe by zipfile: nothing lands outside tmp
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            raise _unreadable(path, f"the zip file cannot be unzipped ({type(exc).__name__})") from None
        yield Path(tmp)


def is_dicom_series_input(path: str | Path) -> bool:
    """Whether `read_volume(path)` reads a DICOM series: a folder, a DICOMDIR or a zipped DICOM folder (not a file's volume)."""
    path = Path(path)
    return path.is_dir() or path.name.upper() == DICOMDIR or path.name.lower().endswith(ZIP_SUFFIX)


@contextmanager
def dicom_folder(path: str | Path) -> Iterator[Path]:
    """The folder a DICOM series input is read from: the folder itself, a DICOMDIR's folder, or a zipped
    folder unzipped into a temporary folder (removed afterwards); as `read_volume` reads them."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"input not found: {path}")
    if path.name.lower().endswith(ZIP_SUFFIX) and path.is_file():
        with _unzipped(path) as folder:
            yield folder
    else:
        yield path if path.is_dir() else path.parent


def _unread_members(folder: Path, files: dict[str, list[str]], uid: str) -> tuple[list[Path], list[Path]]:
    """Files under `folder` that GDCM's series scan skipped (a truncated or corrupt image): those whose DICOM
    header names series `uid` (without them the volume would silently lack those slices), and those whose
    series cannot be told (a file cut within its header: maybe one of this series' slices)."""
    import pydicom

    listed = {os.path.realpath(name) for names in files.values() for name in names}
    unread, unknown = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if os.path.realpath(path) in listed or path.name.upper() == DICOMDIR:
            continue
        with open(path, "rb") as f:
            if f.read(132)[128:] != b"DICM":
                continue
        try:
            found = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get("SeriesInstanceUID")
        except Exception:  # a header pydicom cannot parse either: its series is unknown
            found = None
        if found == uid:
            unread.append(path)
        elif not found:
            unknown.append(path)
    return unread, unknown


def dicom_series_files(folder: Path, series_uid: str | None) -> tuple[list[str], str, list[str]]:
    """The files of a DICOM folder's chosen series (`_choose_series`, or `series_uid`) in the order of the
    volume's slices (k), localizers left out; its uid; notes. The errors of `read_volume`, from the headers."""
    files = _dicom_files(folder)
    uids = sorted(files)
    if not uids:
        raise _unreadable(folder, "no DICOM series in this folder or below it (empty, or not DICOM files)")
    notes = []
    if series_uid is not None:
        if series_uid not in files:
            raise _unreadable(folder, f"no series {series_uid}; the series here are: {', '.join(uids)}")
        uid = series_uid
    else:
        uid, note = _choose_series(files)
        notes += [note] if note else []
    unread, unknown = _unread_members(folder, files, uid)
    if unread:
        raise _unreadable(unread[0], f"an image of series {uid} that cannot be read (truncated or corrupt; "
                                     f"{len(unread)} such file(s) in {folder}): the volume would lack its slice")
    if len(files[uid]) == 1 and dicom_frames(Path(files[uid][0])) > 1:  # one multi-frame image (Enhanced CT): read as a file
        return files[uid], uid, notes
    try:
        names, series_notes = _series_files(files[uid], folder)
    except NotACTError as error:
        if unknown and "missing slices" in str(error):  # name what may be the missing slice
            raise NotACTError(f"{error}; {len(unknown)} DICOM file(s) here cannot be read at all (cut within the header? "
                              f"e.g. {unknown[0]}): perhaps the missing slice") from None
        raise
    if unknown:
        notes.append(f"{len(unknown)} DICOM file(s) in the folder cannot be read at all (cut within the header? e.g. "
                     f"{unknown[0].name}); if one is a slice of the analysed series, the volume lacks it")
    return names, uid, notes + series_notes


def sort_series_files(names: list[str]) -> list[str]:
    """One DICOM series' files in the order of the volume's slices (k), localizers left out, as
    `read_volume` reads a folder holding only them; its errors, from the headers."""
    return _series_files([str(n) for n in names], Path(names[0]).parent)[0]


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, str, list[str]]:
    """The chosen series of a DICOM folder (or of the folders below it, `_dicom_files`), its uid, and notes."""
    names, uid, notes = dicom_series_files(folder, series_uid)
    if len(names) == 1 and dicom_frames(Path(names[0])) > 1:
        return _read_file(Path(names[0]))[0], uid, notes
    return read_dicom_files(names, folder, uid), uid, notes


def read_dicom_files(names: list[str], where: Path, uid: str = "") -> sitk.Image:
    """The volume of one series' files, in the given order (`dicom_series_files`), HU with pixel padding marked.

    The files are decoded in READ_PARTS runs of consecutive slices side by side (GDCM's decoding,
    JPEG lossless among others, runs on one core per reader and releases the GIL), each run pasted
    into the volume in place; its slice step is the first to the last slice's distance over their
    count, as one reader of all the files computes it (the slices are evenly spaced: uneven
    spacing was refused from the headers).
    """
    parts = _read_series_parts(names, where, uid)
    paddings = [  # file n is the image's slice n
        _padding_hu(lambda tag, reader=reader, n=n: reader.GetMetaData(n, tag) if reader.HasMetaDataKey(n, tag) else None)
        for reader, _ in parts for n in range(len(reader.GetFileNames()))
    ]
    images = [image for _, image in parts]
    if len({image.GetPixelID() for image in images}) > 1:  # a per-slice rescale made some runs float
        images = [sitk.Cast(image, sitk.sitkFloat32) for image in images]
    if len(images) == 1:
        return _mark_padding(images[0], paddings)
    volume = sitk.Image([*images[0].GetSize()[:2], len(names)], images[0].GetPixelID())
    start = 0
    for image in images:
        volume[:, :, start:start + image.GetSize()[2]] = image  # in place
        start += image.GetSize()[2]
    volume.SetOrigin(images[0].GetOrigin())
    volume.SetDirection(images[0].GetDirection())
    last = images[-1].TransformIndexToPhysicalPoint((0, 0, images[-1].GetSize()[2] - 1))
    step = float(np.linalg.norm(np.subtract(last, images[0].GetOrigin()))) / (len(names) - 1)  # as one reader of all
    volume.SetSpacing((*images[0].GetSpacing()[:2], step))
    return _mark_padding(volume, paddings)


READ_PARTS = 2  # runs of slices decoded side by side, at most (this machine's and a laptop's cores; `cpu_threads` limits them)
_MIN_PART_SLICES = 16  # shorter series are read by one reader


def _read_series_parts(names: list[str], where: Path, uid: str) -> list[tuple[sitk.ImageSeriesReader, sitk.Image]]:
    """(reader, image) of each run of consecutive files, read side by side."""
    parts = max(1, min(READ_PARTS, cpu_threads(), len(names) // _MIN_PART_SLICES))
    bounds = np.linspace(0, len(names), parts + 1).round().astype(int)

    def read(run: list[str]) -> tuple[sitk.ImageSeriesReader, sitk.Image]:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(run)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-file tags: padding and rescale may differ by slice
        return reader, reader.Execute()

    runs = [names[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    try:
        with _itk_warnings_off():
            if len(runs) == 1:
                return [read(runs[0])]
            with ThreadPoolExecutor(max_workers=len(runs)) as pool:
                return list(pool.map(read, runs))
    except RuntimeError:
        raise _unreadable(where, f"the DICOM series {uid} is corrupt or uses an unsupported encoding") from None


def is_dicom_file(path: str | Path) -> bool:
    """Whether a file is DICOM by its name (DICOM_SUFFIXES) or its content (a PACS's files are often named by
    their UID, or not at all): ITK's choice of reader for it."""
    path = Path(path)
    return _suffix(path) in DICOM_SUFFIXES or sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO"


def dicom_frames(path: Path) -> int:
    """The number of frames of a DICOM image file (1 for a single-frame image)."""
    header = _header(str(path))
    return header.GetSize()[2] if header.GetDimension() == 3 else 1


def _check_frames(path: Path) -> None:
    """NotACTError unless the frames of a multi-frame DICOM image (e.g. Enhanced CT) lie in file order along the
    slice normal, one per position, evenly spaced: the reader stacks them in file order at one step, whatever
    their positions say (per-frame functional groups, PS3.3 C.7.6.16)."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def value(group, sequence: str, keyword: str):
        for source in (group, shared):
            items = source.get(sequence) if source is not None else None
            if items and keyword in items[0]:
                return np.array(items[0].get(keyword), dtype=float)
        return None

    frames = int(ds.get("NumberOfFrames", 1))
    positions = [value(per_frame[n] if n < len(per_frame) else None, "PlanePositionSequence", "ImagePositionPatient")
                 for n in range(frames)]
    cosines = value(per_frame[0] if per_frame else None, "PlaneOrientationSequence", "ImageOrientationPatient")
    if cosines is None or any(p is None for p in positions):
        raise NotACTError(f"{path.name}: its {frames} frames do not all have a position and orientation (per-frame "
                          "functional groups): the volume's geometry would be a guess")
    along = np.array(positions) @ np.cross(cosines[:3], cosines[3:])
    steps = np.diff(along) * np.sign(along[-1] - along[0])
    if len(steps) and (steps.min() < DUPLICATE_TOLERANCE_MM or _uneven(steps)):
        raise NotACTError(f"{path.name}: its frames are not one after the other along the slice normal at one step "
                          f"(steps from {steps.min():.2f} to {steps.max():.2f} mm in file order: frames out of order, "
                          "repeated or missing); the reader would stack them in file order")


def _read_file(path: Path) -> tuple[sitk.Image, str]:
    """One image file and its format name."""
    suffix = _suffix(path)
    reader = _header(str(path))
    is_dicom = is_dicom_file(path)
    if is_dicom:
        _check_modality(_tag(reader, TAG_MODALITY), path)
        if reader.GetDimension() == 3 and reader.GetSize()[2] > 1:
            _check_frames(path)
    _check_size(reader.GetSize(), path)
    _check_grid(np.reshape(reader.GetDirection(), (reader.GetDimension(),) * 2), reader.GetSize(), reader.GetSpacing(), path)
    if VOLUME_FORMATS.get(suffix) == "nifti":
        _check_nifti_sform(reader, path)
        _check_nifti_complete(reader, path)
    try:
        with _itk_warnings_off(), _native_stderr_held():  # e.g. MetaImage's own lines on a short file
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
    """A CT from a DICOM folder (its files, or those in the folders below it, as on a CD with a
    DICOMDIR, which may be given instead of its folder), a zipped DICOM folder (.zip), a volume file
    (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), a single DICOM or 2-D image file, or an in-memory
    SimpleITK image; HU (int16 or float32, `hu_pixel_type`) in its own geometry.

    Several DICOM series in a folder: the thin lung-kernel axial CT series (`_choose_series`, with a
    note), unless `series_uid` names one; its localizer images are left out (with a note). Raises InputNotFoundError, UnreadableInputError,
    or NotACTError (not CT, colour, gantry tilt or another sheared grid, images of another matrix
    size, two images at one position, missing slices or uneven spacing, more than MAX_VOLUME_SIZE
    voxels: all found from the headers, before the pixels are read). Whether the volume is usable
    for analysis is `check_ct`'s job.
    """
    uid, notes = None, []
    if isinstance(source, sitk.Image):
        image, path, fmt = source, None, "image"
        dimension = image.GetDimension()
        _check_grid(np.reshape(image.GetDirection(), (dimension, dimension)), image.GetSize(), image.GetSpacing(), "the image")
    else:
        path = Path(source)
        if not path.exists():
            raise InputNotFoundError(f"input not found: {path}")
        if path.is_dir() or path.name.upper() == DICOMDIR:
            image, uid, notes = _read_dicom_series(path if path.is_dir() else path.parent, series_uid)
            fmt = "dicom"
        elif path.name.lower().endswith(ZIP_SUFFIX):
            with _unzipped(path) as folder:
                try:
                    image, uid, notes = _read_dicom_series(folder, series_uid)
                except CovidCTError as exc:  # name the zip file, not the temporary folder
                    raise type(exc)(str(exc).replace(str(folder), str(path))) from None
            fmt = "dicom"
        else:
            if series_uid is not None:
                raise UsageError(f"--series picks a series of a DICOM folder; {path} is a file (leave --series out)")
            image, fmt = _read_file(path)
            if fmt == "dicom" and image.HasMetaDataKey(TAG_SERIES_UID):  # one file: a multi-frame image's series
                uid = image.GetMetaData(TAG_SERIES_UID).strip()
            if fmt == "nifti":
                notes = qform_sform_notes(path, image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotACTError(
            f"not a CT: {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour image?); a CT has one"
        )
    if image.GetDimension() > 3:
        raise NotACTError(_too_many_dimensions(image))
    image = sitk.Cast(image, hu_pixel_type(image))
    return LoadedVolume(image=image, info=_info(image, path, fmt, uid, notes + _no_data_note(image)))


def hu_pixel_type(image: sitk.Image) -> int:
    """sitkInt16 when every voxel is a whole number of HU within int16's range, else sitkFloat32.

    CT is stored as 12- to 16-bit integers with an integer rescale (DICOM PS3.3 C.11.1.1.2), so
    its HU are whole numbers: int16 holds them exactly in half the memory of float32, which is
    what lets the largest accepted volume (MAX_VOXELS) fit the memory budget.
    """
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind in "iub":
        info = np.iinfo(np.int16)
        if array.dtype.itemsize < 2 or (array.dtype.itemsize == 2 and array.dtype.kind == "i"):
            return sitk.sitkInt16
        low, high = _chunked_range(array)
        return sitk.sitkInt16 if info.min <= low and high <= info.max else sitk.sitkFloat32
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start:start + _CHECK_CHUNK]
        if not (np.all(np.abs(chunk) <= np.iinfo(np.int16).max) and np.array_equal(chunk, np.rint(chunk))):
            return sitk.sitkFloat32
    return sitk.sitkInt16


_CHECK_CHUNK = 1 << 22  # voxels checked at once: a bounded temporary, not a copy of the volume


def _chunked_range(array: np.ndarray) -> tuple[int, int]:
    flat = array.reshape(-1)
    chunks = [flat[s:s + _CHECK_CHUNK] for s in range(0, flat.size, _CHECK_CHUNK)]
    return min(int(c.min()) for c in chunks), max(int(c.max()) for c in chunks)


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
