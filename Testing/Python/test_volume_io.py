"""Reading volumes (files, DICOM series, in-memory images), CT checks and 2-D slice images."""

from __future__ import annotations

import locale
import re

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import geometry
from CovidCTDiagnosisLib.errors import InputNotFoundError, NotACTError, UnreadableInputError
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.volume_io import (
    LUNG_WINDOW_LEVEL,
    NO_DATA_BELOW_HU,
    NO_DATA_HU,
    SINGLE_SLICE_MESSAGE,
    check_ct,
    has_data,
    hu_pixel_type,
    read_image_2d,
    read_volume,
)

SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.1"
OTHER_SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.2"


@pytest.fixture(scope="module")
def small_ct() -> sitk.Image:
    """A small phantom CT (64 x 56 x 12 voxels) with flipped i and j axes (right-handed, as DICOM
    slices always are: the slice axis is row x column)."""
    return make_chest_phantom(
        size=(64, 56, 12), spacing=(5.0, 5.0, 10.0), origin=(160.0, 140.0, -60.0),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    ).image


def write_dicom_series(image, folder, uid=SERIES_UID, modality="CT", skip=(), duplicate=(), prefix="slice", extra_tags=None):
    """Write `image` as one int16 DICOM file per axial slice, with position/orientation tags and
    `extra_tags` (with rescale tags ITK stores (value - intercept) / slope). ITK's GDCM writer sets the
    process's locale to C (ASCII text I/O for every later test): it is put back."""
    locale_before = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(image, folder, uid, modality, skip, duplicate, prefix, extra_tags)
    finally:
        locale.setlocale(locale.LC_ALL, locale_before)


def _write_dicom_series(image, folder, uid, modality, skip, duplicate, prefix, extra_tags):
    folder.mkdir(parents=True, exist_ok=True)
    pixels = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
    d = image.GetDirection()
    series_tags = {
        "0008|0060": modality,
        "0020|000e": uid,
        "0020|000d": uid + ".0",
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0008|0008": "DERIVED\\SECONDARY",
        **(extra_tags or {}),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetSize()[2]):
        if k in skip:
            continue
        for copy in range(2 if k in duplicate else 1):
            plane = pixels[:, :, k]
            for tag, value in series_tags.items():
                plane.SetMetaData(tag, value)
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            plane.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
            plane.SetMetaData("0020|0013", str(k + 1))
            plane.SetMetaData("0008|0018", f"{uid}.{k + 1}.{copy}")
            name = folder / f"{prefix}{k:03d}-{copy}.dcm"
            writer.SetFileName(str(name))
            writer.Execute(plane)
            files.append(name)
    return files


# ---- volume files and in-memory images -------------------------------------------------------


@pytest.mark.parametrize("suffix, fmt", [(".nii.gz", "nifti"), (".nrrd", "nrrd"), (".mha", "mha")])
def test_volume_files(tmp_path, small_ct, suffix, fmt):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(small_ct, str(path))
    loaded = read_volume(path)
    assert loaded.image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image), sitk.GetArrayViewFromImage(small_ct))
    assert loaded.image.GetOrigin() == pytest.approx(small_ct.GetOrigin(), abs=1e-4)
    assert loaded.image.GetDirection() == pytest.approx(small_ct.GetDirection(), abs=1e-6)
    info = loaded.info
    assert (info.format, info.path, info.size) == (fmt, str(path), (64, 56, 12))
    assert info.spacing == pytest.approx((5.0, 5.0, 10.0))
    assert info.direction == pytest.approx(small_ct.GetDirection())
    check_ct(loaded.image)


def test_in_memory_image_is_not_modified(small_ct):
    int_image = sitk.Cast(small_ct, sitk.sitkInt16)
    before = sitk.GetArrayFromImage(int_image)
    loaded = read_volume(int_image)
    assert (loaded.info.format, loaded.info.path) == ("image", None)
    assert loaded.image.GetPixelID() == sitk.sitkInt16
    assert int_image.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(int_image), before)


@pytest.mark.parametrize("values, dtype, expected", [
    ([-1024, 0, 3071], np.int16, sitk.sitkInt16),  # CT as stored
    ([0, 1024, 4095], np.uint16, sitk.sitkInt16),  # unsigned storage, values in range
    ([0, 40000, 10], np.uint16, sitk.sitkFloat32),  # beyond int16: kept exactly as float32
    ([-1000.0, 35.0, 500.0], np.float32, sitk.sitkInt16),  # whole HU in a float file
    ([-1000.0, 35.5, 500.0], np.float32, sitk.sitkFloat32),  # fractional HU (resampled data)
    ([-1000.0, np.nan, 500.0], np.float32, sitk.sitkFloat32),
])
def test_hu_pixel_type_holds_every_value_exactly(values, dtype, expected):
    """int16 (half of float32's memory) only where it holds every HU exactly."""
    image = sitk.GetImageFromArray(np.array(values, dtype=dtype).reshape(1, 1, 3))
    assert hu_pixel_type(image) == expected
    if expected == sitk.sitkInt16:
        assert np.array_equal(sitk.GetArrayViewFromImage(sitk.Cast(image, expected)).ravel(), np.array(values))


def test_colour_and_4d_volumes_are_not_ct():
    rgb = sitk.GetImageFromArray(np.zeros((10, 16, 16, 3), dtype=np.uint8), isVector=True)
    with pytest.raises(NotACTError, match="3 values per voxel"):
        read_volume(rgb)
    series = sitk.Image([16, 16, 10, 3], sitk.sitkInt16)
    with pytest.raises(NotACTError, match="4-D image"):
        read_volume(series)
    with pytest.raises(NotACTError, match="4-D image"):
        check_ct(series)


# ---- DICOM series -----------------------------------------------------------------------------


def test_dicom_series(tmp_path, small_ct):
    write_dicom_series(small_ct, tmp_path / "series")
    loaded = read_volume(tmp_path / "series")
    assert (loaded.info.format, loaded.info.series_uid, loaded.info.notes) == ("dicom", SERIES_UID, [])
    assert loaded.image.GetSize() == small_ct.GetSize()
    assert loaded.image.GetSpacing() == pytest.approx(small_ct.GetSpacing(), abs=1e-3)
    assert loaded.image.GetOrigin() == pytest.approx(small_ct.GetOrigin(), abs=1e-3)
    assert loaded.image.GetDirection() == pytest.approx(small_ct.GetDirection(), abs=1e-5)
    expected = sitk.GetArrayFromImage(sitk.Cast(sitk.Round(small_ct), sitk.sitkInt16))
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image), expected)


def test_missing_slice(tmp_path, small_ct):
    write_dicom_series(small_ct, tmp_path / "gap", skip={5})
    with pytest.raises(NotACTError, match="missing slices: a gap of 20.00 mm"):
        read_volume(tmp_path / "gap")


def test_duplicate_slice(tmp_path, small_ct):
    write_dicom_series(small_ct, tmp_path / "dup", duplicate={4})
    with pytest.raises(NotACTError, match="two images at the same position: slice004-0.dcm and slice004-1.dcm"):
        read_volume(tmp_path / "dup")


def test_mr_is_not_ct(tmp_path, small_ct):
    write_dicom_series(small_ct, tmp_path / "mr", modality="MR")
    with pytest.raises(NotACTError, match="not a CT: modality MR"):
        read_volume(tmp_path / "mr")


def test_dicom_files_named_without_a_dicom_extension_are_read_as_dicom(tmp_path, small_ct):
    """A PACS's files are often named by their UID or have no extension: read as DICOM all the same (before, as a
    format named after the last dotted part, without the modality check), so an MR slice is refused and a CT
    slice reads exactly as under a .dcm name."""
    for kind in ("CT", "MR"):
        named = write_dicom_series(small_ct[:, :, 6:7], tmp_path / kind, modality=kind)[0]
        (tmp_path / kind / f"{SERIES_UID}.7").write_bytes(named.read_bytes())
        (tmp_path / kind / "IM0007").write_bytes(named.read_bytes())
    for name in (f"{SERIES_UID}.7", "IM0007"):
        assert read_volume(tmp_path / "CT" / name).info.format == "dicom"
        assert np.array_equal(read_image_2d(tmp_path / "CT" / name), read_image_2d(tmp_path / "CT" / "slice000-0.dcm"))
        with pytest.raises(NotACTError, match="not a CT: modality MR"):
            read_volume(tmp_path / "MR" / name)


def test_two_series_in_one_folder(tmp_path, small_ct):
    folder = tmp_path / "two"
    write_dicom_series(small_ct, folder, prefix="a")
    write_dicom_series(small_ct[:, :, :9], folder, uid=OTHER_SERIES_UID, prefix="b")
    loaded = read_volume(folder)
    assert loaded.info.series_uid == SERIES_UID and loaded.image.GetSize()[2] == 12
    assert loaded.info.notes == [
        f"2 series found; analysed {SERIES_UID} (12 images), chosen for its larger number of images; "
        f"the others: {OTHER_SERIES_UID} (9 images); use --series UID for another"
    ]
    chosen = read_volume(folder, series_uid=OTHER_SERIES_UID)
    assert chosen.image.GetSize()[2] == 9 and chosen.info.notes == []
    with pytest.raises(UnreadableInputError, match=OTHER_SERIES_UID):
        read_volume(folder, series_uid="1.2.3")


def _edit_series(folder, edit, names=None):
    """Apply `edit(dataset)` to the DICOM files of `folder` (or those named), in place, with pydicom."""
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        if names is None or path.name in names:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path)


@pytest.mark.parametrize("tag, message", [
    ("ImagePositionPatient", "have no (valid) ImagePositionPatient"),  # ITK stacked them upside down at 0.5 mm
    ("ImageOrientationPatient", "have no (valid) ImageOrientationPatient"),
    ("PixelSpacing", "have no (valid) PixelSpacing"),  # ITK took 1 mm: lungs 79 % larger
])
def test_a_series_without_its_geometry_tags_is_refused(tmp_path, small_ct, tag, message):
    """Found by a hospital-input trial: a series without these type-1 tags was read with made-up geometry, no warning."""
    write_dicom_series(small_ct, tmp_path / "s")
    _edit_series(tmp_path / "s", lambda ds: delattr(ds, tag), names={"slice005-0.dcm"} if tag != "PixelSpacing" else None)
    with pytest.raises(NotACTError, match=re.escape(message)):
        read_volume(tmp_path / "s")


def test_monochrome1_and_one_image_of_another_modality_are_refused(tmp_path, small_ct):
    write_dicom_series(small_ct, tmp_path / "m1")
    _edit_series(tmp_path / "m1", lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    with pytest.raises(NotACTError, match="MONOCHROME1"):  # ITK inverts it: the values were not HU
        read_volume(tmp_path / "m1")
    write_dicom_series(small_ct, tmp_path / "mixed")
    _edit_series(tmp_path / "mixed", lambda ds: setattr(ds, "Modality", "MR"), names={"slice006-0.dcm"})
    with pytest.raises(NotACTError, match="not a CT: modality MR .*slice006-0.dcm"):  # only the first was checked
        read_volume(tmp_path / "mixed")


def test_a_series_split_between_a_folder_and_its_subfolders_is_read_whole(tmp_path, small_ct):
    """Files directly in the folder no longer hide the series' files in folders below it (the slices there were
    left out: a coarser or shorter volume without a warning)."""
    folder = tmp_path / "export"
    write_dicom_series(small_ct, folder)
    (folder / "more").mkdir()
    for k in range(1, 12, 2):
        (folder / f"slice{k:03d}-0.dcm").rename(folder / "more" / f"slice{k:03d}-0.dcm")
    loaded = read_volume(folder)
    assert loaded.image.GetSize() == small_ct.GetSize()
    assert loaded.image.GetSpacing() == pytest.approx(small_ct.GetSpacing(), abs=1e-3)


@pytest.mark.parametrize("slice_name", ["slice011-0.dcm", "slice005-0.dcm"])  # the last slice, one in the middle
def test_a_truncated_image_of_the_series_is_named_not_dropped(tmp_path, small_ct, slice_name):
    """GDCM's series scan skips a file it cannot read: the last slice was dropped without a word and a middle one
    was refused as "missing slices". Now the file is named (exit 3)."""
    write_dicom_series(small_ct, tmp_path / "s")
    damaged = tmp_path / "s" / slice_name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(UnreadableInputError, match=f"cannot read {re.escape(str(damaged))}: an image of series"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("slice_name", ["slice011-0.dcm", "slice005-0.dcm"])  # the last slice, one in the middle
def test_an_image_cut_within_its_header_is_named(tmp_path, small_ct, slice_name):
    """A file cut before its SeriesInstanceUID cannot be given to a series: a middle one was refused as "missing
    slices" without a word about it, the last one left out silently. Now the refusal names it, and a read that
    goes on notes it."""
    write_dicom_series(small_ct, tmp_path / "s")
    damaged = tmp_path / "s" / slice_name
    damaged.write_bytes(damaged.read_bytes()[:300])
    if slice_name == "slice005-0.dcm":
        with pytest.raises(NotACTError, match=f"missing slices.*1 DICOM file.*cannot be read at all.*{slice_name}"):
            read_volume(tmp_path / "s")
    else:
        notes = read_volume(tmp_path / "s").info.notes
        assert any("cannot be read at all" in n and slice_name in n for n in notes), notes


def test_an_enhanced_ct_is_read_only_when_its_frames_are_in_order(tmp_path, small_ct):
    """A multi-frame image is stacked in file order at one step whatever its frames' positions say: frames out of
    order or with a gap were read silently wrong (a hospital-input trial: P001 shuffled scored 0.30 instead of 0.72);
    now refused. In order (either way along the normal), as a file or alone in a folder, it reads exactly."""
    from dicom_series import enhanced_ct

    enhanced = enhanced_ct(small_ct, tmp_path)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    (tmp_path / "folder").mkdir()
    enhanced.save_as(tmp_path / "folder" / "IM1")
    series = geometry.orient_to_lps(read_volume(tmp_path / "series").image)  # the single-frame images it was made of
    for given in (tmp_path / "enhanced.dcm", tmp_path / "folder"):
        image = geometry.orient_to_lps(read_volume(given).image)
        for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(image, get)() == pytest.approx(getattr(series, get)(), abs=1e-4), get
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(series))
        assert read_volume(given).info.series_uid == enhanced.SeriesInstanceUID  # in report.json too (was "")
    frames = enhanced.PerFrameFunctionalGroupsSequence
    step = np.subtract(frames[1].PlanePositionSequence[0].ImagePositionPatient, frames[0].PlanePositionSequence[0].ImagePositionPatient)
    import copy

    swapped, gap = copy.deepcopy(enhanced), copy.deepcopy(enhanced)
    a, b = (swapped.PerFrameFunctionalGroupsSequence[n].PlanePositionSequence[0] for n in (3, 4))
    a.ImagePositionPatient, b.ImagePositionPatient = b.ImagePositionPatient, a.ImagePositionPatient
    for frame in gap.PerFrameFunctionalGroupsSequence[6:]:  # a frame missing after the sixth
        plane = frame.PlanePositionSequence[0]
        plane.ImagePositionPatient = [float(v) for v in np.add(plane.ImagePositionPatient, step)]
    for name, variant in (("swapped", swapped), ("gap", gap)):
        variant.save_as(tmp_path / f"{name}.dcm")
        with pytest.raises(NotACTError, match="frames are not one after the other"):
            read_volume(tmp_path / f"{name}.dcm")


# ---- pixel padding (no data outside the field of view) ---------------------------------------


def write_padded_series(hu: sitk.Image, folder, slope: float, intercept: float, padding: tuple[int, ...], outside):
    """`hu` as a DICOM series with the given rescale and PixelPaddingValue (+ RangeLimit) tags,
    its voxels where `outside` ([j, i]) set to the HU of the padding's stored values (cycled).

    ITK's writer stores (HU - intercept) / slope, so a padded voxel's stored value is the tag's."""
    array = sitk.GetArrayFromImage(hu).astype(np.float32)
    stored = np.arange(padding[0], padding[-1] + 1)
    array[:, outside] = np.resize(stored * slope + intercept, (array.shape[0], int(outside.sum())))
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(hu)
    tags = {"0028|1052": f"{intercept:g}", "0028|1053": f"{slope:g}", "0028|0120": str(padding[0])}
    if len(padding) > 1:
        tags["0028|0121"] = str(padding[1])
    return write_dicom_series(padded, folder, extra_tags=tags)


def outside_circle(size_ij: tuple[int, int], radius_fraction: float) -> np.ndarray:
    """bool [j, i]: outside a centred reconstruction circle of radius_fraction * half the width."""
    j, i = np.mgrid[: size_ij[1], : size_ij[0]]
    centre = (np.array(size_ij) - 1) / 2
    return np.hypot(i - centre[0], j - centre[1]) > radius_fraction * size_ij[0] / 2


# stored padding -2000 at intercept -1024 (GE style, -3024 HU), and a padding range whose HU
# look like air (stored 0..5 at slope 2: -1024..-1014 HU), told apart from air only by the tags
PADDINGS = {"GE-style": (1.0, -1024.0, (-2000,)), "air-like range": (2.0, -1024.0, (0, 5))}


@pytest.mark.parametrize("name", list(PADDINGS))
def test_dicom_pixel_padding_is_no_data(tmp_path, small_ct, name):
    slope, intercept, padding = PADDINGS[name]
    hu = sitk.Clamp(small_ct, lowerBound=-1000.0)  # only the padding is stored as the padding values
    outside = outside_circle(small_ct.GetSize()[:2], 0.9)
    write_padded_series(hu, tmp_path / "padded", slope, intercept, padding, outside)
    loaded = read_volume(tmp_path / "padded")
    array = sitk.GetArrayViewFromImage(loaded.image)
    assert np.all(array[:, outside] == NO_DATA_HU)
    assert np.abs(array[:, ~outside] - sitk.GetArrayViewFromImage(hu)[:, ~outside]).max() <= 0.5 + slope / 2  # two roundings
    assert not has_data(array[:, outside]).any() and has_data(array[:, ~outside]).all()
    percent = 100 * outside.mean()
    assert loaded.info.notes == [
        f"{percent:.2g} % of voxels are padding outside the scanner's field of view (below {NO_DATA_BELOW_HU:.0f} HU "
        "or DICOM pixel padding): no data, never counted as air"
    ]
    check_ct(loaded.image)


def test_padding_of_a_real_ct(tmp_path, shared_data):
    """Slices of P001 (stored 0 = -1024 HU is air there) rewritten with a reconstruction circle."""
    hu = read_volume(shared_data / "ct" / "covid-ct-md" / "P001-covid").image[:, :, 60:100:5]
    outside = outside_circle(hu.GetSize()[:2], 0.94)
    clamped = sitk.Clamp(hu, lowerBound=-1023.0)
    write_padded_series(clamped, tmp_path / "p001", 1.0, -1024.0, (0,), outside)
    loaded = read_volume(tmp_path / "p001")
    array = sitk.GetArrayViewFromImage(loaded.image)
    assert np.all(array[:, outside] == NO_DATA_HU)
    assert np.array_equal(array[:, ~outside], sitk.GetArrayViewFromImage(clamped)[:, ~outside])  # air stays air
    assert loaded.info.notes[0].startswith(f"{100 * outside.mean():.2g} % of voxels are padding")


def test_no_data_never_counts_as_air(small_ct):
    """Raw stored values (no rescale: air at about +24) with padding below -1100 HU are still not CT."""
    array = sitk.GetArrayFromImage(small_ct) + 1024.0
    array[:, outside_circle(small_ct.GetSize()[:2], 0.8)] = NO_DATA_HU
    with pytest.raises(NotACTError, match="Hounsfield"):
        check_ct(with_values(small_ct, array))


# ---- unreadable and missing input -------------------------------------------------------------


def one_line(error: Exception) -> bool:
    return "\n" not in str(error) and "ITK ERROR" not in str(error)


def test_corrupt_file_and_folders(tmp_path):
    corrupt = tmp_path / "corrupt" / "x.dcm"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty").mkdir()
    for source in (corrupt, corrupt.parent, tmp_path / "empty"):
        with pytest.raises(UnreadableInputError) as caught:
            read_volume(source)
        assert one_line(caught.value)
    with pytest.raises(InputNotFoundError, match="input not found"):
        read_volume(tmp_path / "nothing-here")


# ---- check_ct ---------------------------------------------------------------------------------


def with_values(reference: sitk.Image, values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("change, message", [
    (lambda a: np.where(a > 0, np.nan, a), "NaN"),
    (lambda a: np.full_like(a, 40.0), "constant"),
    (lambda a: a + 1024.0, "Hounsfield"),  # raw stored values, rescale not applied
    (lambda a: a - 2000.0, "Hounsfield"),  # nothing above 0
])
def test_check_ct_rejects_bad_values(small_ct, change, message):
    bad = with_values(small_ct, change(sitk.GetArrayFromImage(small_ct)))
    with pytest.raises(NotACTError, match=message):
        check_ct(bad)


def test_check_ct_rejects_bad_shapes(tmp_path, small_ct):
    png = tmp_path / "slice.png"
    cv2.imwrite(str(png), np.full((32, 32), 100, dtype=np.uint8))
    with pytest.raises(NotACTError, match="3-D CT volume"):
        check_ct(read_volume(png).image)
    with pytest.raises(NotACTError, match="at least 8"):
        check_ct(small_ct[:, :, :5])
    fine = sitk.Image(small_ct)
    fine.SetSpacing((0.05, 0.05, 1.0))
    with pytest.raises(NotACTError, match="spacing"):
        check_ct(fine)
    coarse = sitk.Image(small_ct)
    coarse.SetSpacing((1.0, 1.0, 25.0))
    with pytest.raises(NotACTError, match="spacing"):
        check_ct(coarse)


# ---- 2-D images -------------------------------------------------------------------------------


def test_read_image_2d(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "c.jpg"), np.dstack([gray] * 3))
    assert np.array_equal(read_image_2d(tmp_path / "g.png"), gray)
    colour = read_image_2d(tmp_path / "c.jpg")
    assert colour.shape == gray.shape and colour.dtype == np.uint8


def test_read_image_2d_windows_a_dicom_slice(tmp_path, small_ct):
    plane = sitk.Cast(small_ct[:, :, 6], sitk.sitkInt16) * 0 + int(LUNG_WINDOW_LEVEL)
    plane.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(plane, str(tmp_path / "one.dcm"))
    gray = read_image_2d(tmp_path / "one.dcm")
    assert gray.shape == (56, 64) and gray.dtype == np.uint8
    assert np.all(np.abs(gray.astype(int) - 128) <= 1)  # the window's centre


def test_read_image_2d_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    for bad in ("notes.txt", "broken.png"):
        with pytest.raises(UnreadableInputError) as caught:
            read_image_2d(tmp_path / bad)
        assert one_line(caught.value)
    with pytest.raises(InputNotFoundError):
        read_image_2d(tmp_path / "missing.png")


# ---- real data --------------------------------------------------------------------------------


def test_real_dicom_series(shared_data):
    loaded = read_volume(shared_data / "ct" / "covid-ct-md" / "P001-covid")
    assert loaded.image.GetSize() == (512, 512, 148)
    assert loaded.image.GetSpacing() == pytest.approx((0.75, 0.75, 2.0), abs=0.01)
    assert np.percentile(sitk.GetArrayViewFromImage(loaded.image)[::4], 1) == pytest.approx(-1000, abs=50)
    assert loaded.info.format == "dicom" and loaded.info.series_uid
    check_ct(loaded.image)


def test_real_nifti(shared_data):
    loaded = read_volume(shared_data / "ct" / "totalsegmentator-example" / "example_ct_sm.nii.gz")
    assert loaded.info.format == "nifti" and loaded.image.GetDimension() == 3
    check_ct(loaded.image)


def test_real_single_slice(shared_data):
    path = shared_data / "ct" / "lidc-slice" / "lidc_slice.dcm"
    gray = read_image_2d(path)
    assert gray.shape == (512, 512) and gray.dtype == np.uint8 and gray.std() > 10
    loaded = read_volume(path)
    assert loaded.info.format == "dicom"
    with pytest.raises(NotACTError, match="3-D CT volume") as caught:
        check_ct(loaded.image)
    assert str(caught.value) == SINGLE_SLICE_MESSAGE


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
                                       (1.0, 0, 0, 0, 0.0, 1.0, 0, -1.0, 0.0)])  # axial, flipped, coronal
def test_a_series_read_in_parts_equals_one_reader(tmp_path, monkeypatch, direction):
    """Runs of slices decoded side by side, pasted into one volume: the same voxels and geometry as one
    ImageSeriesReader over all the files."""
    from dicom_series import write_ct_series

    from CovidCTDiagnosisLib import volume_io

    image = make_chest_phantom(size=(48, 40, 37), spacing=(7.0, 7.5, 6.5), origin=(-160.0, -150.0, -120.0), direction=direction).image
    write_ct_series(image, tmp_path / "ct")
    monkeypatch.setattr(volume_io, "READ_PARTS", 1)
    whole = read_volume(tmp_path / "ct").image
    monkeypatch.setattr(volume_io, "READ_PARTS", 2)
    parts = read_volume(tmp_path / "ct").image
    assert np.array_equal(sitk.GetArrayViewFromImage(parts), sitk.GetArrayViewFromImage(whole))
    assert (parts.GetOrigin(), parts.GetDirection()) == (whole.GetOrigin(), whole.GetDirection())
    assert parts.GetSpacing() == pytest.approx(whole.GetSpacing(), rel=1e-12)


def test_a_truncated_nifti_is_refused_not_zero_filled(tmp_path, small_ct):
    """ITK reads a NIfTI cut short (an interrupted download) and fills the missing voxels with 0 HU: a trial's P001
    cut to 40 MB scored 0.62 instead of 0.72 with exit 0. Now refused (exit 3), .nii and .nii.gz; a whole file,
    and one gzip-compressed in two members (its trailer gives the last member's size only), still read."""
    import gzip

    sitk.WriteImage(small_ct, str(tmp_path / "ct.nii"))
    sitk.WriteImage(small_ct, str(tmp_path / "ct.nii.gz"), True)
    raw, packed = (tmp_path / "ct.nii").read_bytes(), (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 5000])
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    for name in ("ct.nii", "ct.nii.gz", "two.nii.gz"):
        image = read_volume(tmp_path / name).image
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(small_ct)), name
    for name in ("cut.nii", "cut.nii.gz"):
        with pytest.raises(UnreadableInputError, match=f"cannot read .*{name}: the file is truncated: its image data end after"):
            read_volume(tmp_path / name)
