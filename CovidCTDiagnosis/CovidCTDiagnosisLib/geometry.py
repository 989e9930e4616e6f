"""Voxel grids, orientation and coordinate systems (IJK, LPS, RAS).

The pipeline works on the input volume reoriented to LPS by a pure permutation/flip of the voxel
grid (no resampling), so that its numpy array `[k, j, i]` has `k` inferior->superior, `j = 0`
anterior and `i = 0` at the patient's right: `array[k]` is an axial slice in radiological
display. Results computed on that grid go back to the input's own grid with `to_original_grid`,
voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

LPS = "LPS"
AXIS_S = 2  # index of the superior component in an LPS vector
_ROUNDING_TOLERANCE = 1e-3  # |entry - round(entry)| allowed in the axis-mapping matrix


def orient_to_lps(image: sitk.Image) -> sitk.Image:
    """The image with its voxel axes permuted/flipped to be closest to L, P, S (no resampling)."""
    return sitk.DICOMOrient(image, LPS)


def _direction(image: sitk.Image) -> np.ndarray:
    """The 3x3 direction matrix; column a is voxel axis a in LPS."""
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3)


def _axis_map(oriented: sitk.Image, original: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """For each oriented axis a: the original axis it runs along, and +1/-1 if it runs forward/back.

    Derived from the direction matrices, so it holds for any pair of grids that differ by a
    permutation/flip of the same voxels (as `orient_to_lps` makes).
    """
    mapping = _direction(original).T @ _direction(oriented)  # [original axis, oriented axis]
    rounded = np.round(mapping)
    perm = np.argmax(np.abs(rounded), axis=0)
    signs = rounded[perm, np.arange(3)]
    is_signed_permutation = (
        np.abs(mapping - rounded).max() < _ROUNDING_TOLERANCE
        and sorted(perm.tolist()) == [0, 1, 2]
        and np.all(np.abs(signs) == 1)
    )
    sizes_match = [original.GetSize()[p] for p in perm] == list(oriented.GetSize())
    if not (is_signed_permutation and sizes_match):
        raise ValueError("the two images are not a permutation/flip of the same voxel grid")
    return perm, signs.astype(int)


def to_original_grid(array_kji: np.ndarray, oriented: sitk.Image, original: sitk.Image) -> sitk.Image:
    """An array on the oriented grid as an image on the original grid: same voxels, original geometry.

    Exact (numpy flips and a transpose, no interpolation). The dtype is kept, except bool which
    becomes uint8 (SimpleITK has no bool pixels).
    """
    perm, signs = _axis_map(oriented, original)
    expected_shape = tuple(reversed(oriented.GetSize()))
    if array_kji.shape != expected_shape:
        raise ValueError(f"array shape {array_kji.shape} does not match the oriented grid {expected_shape}")
    flipped = array_kji
    for axis in np.flatnonzero(signs < 0):
        flipped = np.flip(flipped, axis=2 - axis)
    oriented_axis_of = np.argsort(perm)  # original axis b -> oriented axis
    # numpy axis m of the output is original axis 2 - m, found on numpy axis 2 - a of the input
    order = [2 - oriented_axis_of[2 - m] for m in range(3)]
    # one explicit numpy copy: much faster than GetImageFromArray's own copy of a strided view
    out = np.ascontiguousarray(np.transpose(flipped, order))
    if out.dtype == bool:
        out = out.view(np.uint8)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(original)
    return image


def oriented_to_original_index(
    oriented: sitk.Image, original: sitk.Image, ijk: Sequence[int]
) -> tuple[int, int, int]:
    """The original grid's (i, j, k) of the voxel at `ijk` on the oriented grid."""
    perm, signs = _axis_map(oriented, original)
    size = original.GetSize()
    out = [0, 0, 0]
    for a in range(3):
        b = perm[a]
        out[b] = int(ijk[a]) if signs[a] > 0 else size[b] - 1 - int(ijk[a])
    return tuple(out)


def original_to_oriented_index(
    oriented: sitk.Image, original: sitk.Image, ijk: Sequence[int]
) -> tuple[int, int, int]:
    """The oriented grid's (i, j, k) of the voxel at `ijk` on the original grid."""
    perm, signs = _axis_map(oriented, original)
    size = original.GetSize()
    return tuple(
        int(ijk[perm[a]]) if signs[a] > 0 else size[perm[a]] - 1 - int(ijk[perm[a]]) for a in range(3)
    )


def axial_axis(image: sitk.Image) -> int:
    """The voxel axis (0 = i, 1 = j, 2 = k) closest to the patient's superior direction."""
    return int(np.argmax(np.abs(_direction(image)[AXIS_S])))


def lps_to_ras(p: Sequence[float]) -> tuple[float, float, float]:
    """An LPS point in RAS (Slicer's scene): the first two signs flip."""
    return (-float(p[0]), -float(p[1]), float(p[2]))


def ras_to_lps(p: Sequence[float]) -> tuple[float, float, float]:
    """A RAS point in LPS (DICOM/ITK): the first two signs flip."""
    return (-float(p[0]), -float(p[1]), float(p[2]))


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """The 4x4 affine with LPS = origin + direction @ diag(spacing) @ ijk."""
    affine = np.eye(4)
    affine[:3, :3] = _direction(image) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def midline_column(oriented: sitk.Image) -> float:
    """The column i of an LPS-oriented image where LPS x is 0 at the grid's centre row and slice.

    Scanners put the patient on the table centre (x = 0); where a field of view holds one side
    only, this column, not the image's middle, separates the patient's right (x < 0) from left.
    """
    size = oriented.GetSize()
    centre = [(n - 1) / 2 for n in size]
    x_at = [oriented.TransformContinuousIndexToPhysicalPoint([i, centre[1], centre[2]])[0] for i in (0.0, 1.0)]
    return float(-x_at[0] / (x_at[1] - x_at[0]))
