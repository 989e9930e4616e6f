"""NIfTI header checks that SimpleITK does not make: a qform and an sform that place the voxels differently.

A NIfTI file may carry two voxel-to-patient transforms, the qform (a rotation, spacing and
offset) and the sform (any affine). Converters and tools disagree on which one wins (ITK,
nibabel, FSL and Slicer have each chosen differently over the years), so when both are set and
disagree the same file can show the lungs in another place or on the other side in another
program. The analysis uses the transform SimpleITK read; the note says so and by how much the two differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry

DISAGREEMENT_MM = 0.1  # voxel positions further apart than this (at the volume's corners): the transforms disagree
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(reader: sitk.ImageFileReader, key: str) -> list[float] | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        return [float(v) for v in reader.GetMetaData(key).split()]
    except ValueError:
        return None


def _code(reader: sitk.ImageFileReader, key: str) -> int:
    values = _floats(reader, key)
    return int(values[0]) if values else 0


def qform_ras(reader: sitk.ImageFileReader) -> np.ndarray | None:
    """The qform as a 4x4 voxel (i, j, k) -> RAS mm matrix (NIfTI-1 quaternion convention), None if absent."""
    values = [_floats(reader, k) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                                           "pixdim[0]", "pixdim[1]", "pixdim[2]", "pixdim[3]")]
    if any(v is None or len(v) != 1 for v in values):
        return None
    b, c, d, x, y, z, qfac, dx, dy, dz = (v[0] for v in values)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([dx, dy, (-1.0 if qfac < 0 else 1.0) * dz])
    affine[:3, 3] = (x, y, z)
    return affine


def sform_ras(reader: sitk.ImageFileReader) -> np.ndarray | None:
    """The sform as a 4x4 voxel -> RAS mm matrix, None if absent."""
    rows = [_floats(reader, k) for k in ("srow_x", "srow_y", "srow_z")]
    if any(r is None or len(r) != 4 for r in rows):
        return None
    affine = np.eye(4)
    affine[:3] = np.array(rows)
    return affine


def _corners(size) -> np.ndarray:
    """(8, 4) homogeneous voxel indices of the volume's corner voxels."""
    n = [max(int(s), 1) - 1 for s in (tuple(size) + (1, 1, 1))[:3]]
    return np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])


def _apart_mm(first: np.ndarray, second: np.ndarray, corners: np.ndarray) -> float:
    return float(np.linalg.norm((corners @ first.T - corners @ second.T)[:, :3], axis=1).max())


def qform_sform_notes(path: str | Path, image: sitk.Image) -> list[str]:
    """A note when the file's qform and sform are both set and place the voxels more than
    DISAGREEMENT_MM apart, naming the transform SimpleITK used (`image`'s); [] otherwise."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return []
    if _code(reader, "qform_code") <= 0 or _code(reader, "sform_code") <= 0 or image.GetDimension() != 3:
        return []
    qform, sform = qform_ras(reader), sform_ras(reader)
    if qform is None or sform is None:
        return []
    corners = _corners(image.GetSize())
    apart = _apart_mm(qform, sform, corners)
    if apart <= DISAGREEMENT_MM:
        return []
    used = _LPS_TO_RAS @ geometry.ijk_to_lps_matrix(image)
    which = "sform" if _apart_mm(used, sform, corners) <= _apart_mm(used, qform, corners) else "qform"
    return [
        f"the NIfTI header's qform and sform disagree (voxel positions up to {apart:.1f} mm apart); analysed with the "
        f"{which}, as SimpleITK reads it; other programs may place or orient this volume differently: check the file"
    ]
