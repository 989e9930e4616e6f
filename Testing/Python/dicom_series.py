"""Writing a volume as a CT DICOM series (CT Image Storage, one file per slice) with pydicom, for tests."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_ct_series(image: sitk.Image, folder: Path, *, patient_id: str = "PHANTOM-001") -> list[Path]:
    """`image` (HU) as int16 CT images, one per k slice of its grid, in `folder` (CT Image IOD, PS3.3 A.3):
    the image plane from the grid (ImagePositionPatient of voxel (0, 0, k), the i and j directions as
    ImageOrientationPatient), one study, series and frame of reference. Files are named in reverse slice order
    so that readers must sort by position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    hu = np.round(sitk.GetArrayFromImage(image)).astype(np.int16)  # [k, j, i]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    files = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Chest", patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study, "1", today, "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = "CT", series, 2, "phantom lung"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.Manufacturer, ds.PatientPosition = "phantom", "HFS"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{image.GetSpacing()[1]:g}", f"{image.GetSpacing()[0]:g}"]  # rows apart, columns apart
        ds.SliceThickness = f"{image.GetSpacing()[2]:g}"
        ds.KVP, ds.AcquisitionNumber = "120", 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = hu[k].tobytes()
        path = folder / f"image{hu.shape[0] - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def enhanced_ct(image: sitk.Image, folder: Path):
    """`image` as one multi-frame Enhanced CT dataset (highdicom's legacy conversion of `write_ct_series`'s
    series, written to folder/series); save it with `save_as`."""
    import highdicom as hd
    import pydicom

    datasets = [pydicom.dcmread(f) for f in write_ct_series(image, folder / "series")]
    return hd.legacy.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=hd.UID(), series_number=9,
                                                     sop_instance_uid=hd.UID(), instance_number=1)
