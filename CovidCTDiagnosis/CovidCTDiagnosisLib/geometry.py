"""Voxel grids, orientation and coordinate systems (IJK, LPS, RAS).

The pipeline works on the input volume reoriented to LPS by a pure permutation/flip of the voxel
grid (no resampling), so that its numpy array `[k, j, i]` has `k` inferior->superior, `j = 0`
anterior and `i = 0` at the patient's right: `array[k]` is an axial slice in radiological
display. Results computed on that grid go back to the input's own grid with `to_original_grid`,
voxel for voxel. `voxel_map` says whether two grids hold the same voxels at the same places (as a
left-handed file and the right-handed volume Slicer makes of it do) and maps indices and arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

LPS = "LPS"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # RAS (Slicer's scene) = LPS_TO_RAS @ LPS (DICOM, ITK), and back
GRID_TOLERANCE = 1e-4  # mm (origin, spacing) and direction cosines: two grids closer than this are the same
AXIS_S = 2  # index of the superior component in an LPS vector
SAME_PLACE_TOLERANCE = 0.01  # voxel centres closer than this fraction of the smallest spacing are at the same place
# A grid is sheared when taking its voxel axes as perpendicular would move a voxel by more than
# this fraction of the smallest spacing (gantry tilt stored as is: slices advance along the table).
SHEAR_TOLERANCE = 0.5


def orient_to_lps(image: sitk.Image) -> sitk.Image:
    """The image with its voxel axes permuted/flipped to be closest to L, P, S (no resampling); the
    image itself (no copy of its voxels) when its axes already are."""
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == LPS:
        return image
    return sitk.DICOMOrient(image, LPS)


@dataclass(frozen=True)
class VoxelMap:
    """Two grids holding the same voxels at the same places: voxel axis a of the first runs along
    axis `axes[a]` of the second, forwards (+1) or backwards (-1); `size` is the second's (i, j, k)."""

    axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    size: tuple[int, int, int]

    def index(self, ijk: Sequence[int]) -> tuple[int, int, int]:
        """The second grid's (i, j, k) of the voxel at `ijk` on the first."""
        out = [0, 0, 0]
        for a, (b, sign) in enumerate(zip(self.axes, self.signs)):
            out[b] = int(ijk[a]) if sign > 0 else self.size[b] - 1 - int(ijk[a])
        return tuple(out)

    def inverse_index(self, ijk: Sequence[int]) -> tuple[int, int, int]:
        """The first grid's (i, j, k) of the voxel at `ijk` on the second."""
        return tuple(
            int(ijk[b]) if sign > 0 else self.size[b] - 1 - int(ijk[b]) for b, sign in zip(self.axes, self.signs)
        )

    def slice_index(self, axis: int, index: int) -> int:
        """The second grid's index (along its axis `axes[axis]`) of slice `index` along the first grid's `axis`."""
        return int(index) if self.signs[axis] > 0 else self.size[self.axes[axis]] - 1 - int(index)

    def array(self, array_kji: np.ndarray) -> np.ndarray:
        """An array on the first grid ([k, j, i]) as the same voxels on the second grid: a numpy view, exact."""
        flipped = array_kji
        for a in np.flatnonzero(np.array(self.signs) < 0):
            flipped = np.flip(flipped, axis=2 - a)
        first_axis_of = np.argsort(self.axes)  # second grid's axis b -> first grid's axis
        # numpy axis m of the output is second-grid axis 2 - m, found on numpy axis 2 - a of the input
        return np.transpose(flipped, [2 - first_axis_of[2 - m] for m in range(3)])


def voxel_map(ijk_to_lps, size: Sequence[int], other_ijk_to_lps, other_size: Sequence[int]) -> VoxelMap | None:
    """The VoxelMap from one grid (4x4 IJK-to-LPS affine, size i, j, k) to another, or None unless both
    put the same voxels at the same places (voxel axes permuted or reversed, e.g. a left-handed grid
    made right-handed): every voxel centre within SAME_PLACE_TOLERANCE voxel of its counterpart."""
    first, second = np.asarray(ijk_to_lps, dtype=float), np.asarray(other_ijk_to_lps, dtype=float)
    mapping = np.round(np.linalg.solve(second, first)[:3, :3])  # [second axis, first axis]
    axes = np.argmax(np.abs(mapping), axis=0)
    signs = mapping[axes, np.arange(3)]
    if np.count_nonzero(mapping) != 3 or sorted(axes.tolist()) != [0, 1, 2] or not np.all(np.abs(signs) == 1):
        return None
    if [int(other_size[b]) for b in axes] != [int(n) for n in size]:
        return None
    result = VoxelMap(tuple(int(b) for b in axes), tuple(int(s) for s in signs), tuple(int(n) for n in other_size))
    tolerance = SAME_PLACE_TOLERANCE * np.linalg.norm(first[:3, :3], axis=0).min()
    # both affine: if the corner voxels are in place, every voxel between them is
    for corner in itertools.product(*((0, int(n) - 1) for n in size)):
        here = first @ np.append(corner, 1.0)
        there = second @ np.append(result.index(corner), 1.0)
        if np.linalg.norm(here - there) > tolerance:
            return None
    return result


@dataclass(frozen=True)
class VoxelGrid:
    """A voxel grid: size (i, j, k), spacing (mm), origin (LPS mm), direction (3x3 row-major, LPS: column a is voxel
    axis a). The one description of a grid that the engine, the file writers and the Slicer module share."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image) -> VoxelGrid:
        """The grid of a SimpleITK image."""
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> VoxelGrid:
        """The analysed volume's grid as report.json records it."""
        info = report["input"]
        return cls(tuple(info["size"]), tuple(info["spacing"]), tuple(info["origin"]), tuple(info["direction"]))

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras, size: Sequence[int]) -> VoxelGrid:
        """The grid of a Slicer volume node (its IJKToRAS matrix and image dimensions)."""
        m = np.asarray(ijk_to_ras, dtype=float)
        axes_lps = LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(axes_lps, axis=0)
        return cls(
            tuple(int(n) for n in size),
            tuple(float(s) for s in spacing),
            tuple(float(v) for v in LPS_TO_RAS @ m[:3, 3]),
            tuple(float(v) for v in (axes_lps / spacing).ravel()),
        )

    def ijk_to_lps(self) -> np.ndarray:
        """4x4: LPS = origin + direction @ diag(spacing) @ ijk."""
        m = np.eye(4)
        m[:3, :3] = np.reshape(self.direction, (3, 3)) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix of a Slicer volume node on this grid."""
        m = self.ijk_to_lps()
        m[:3] = LPS_TO_RAS @ m[:3]
        return m

    def rotation_lps(self) -> np.ndarray:
        """3x3, columns: the i, j, k axes in LPS as a proper rotation (k negated for a left-handed grid; a box is
        symmetric about its centre, so as the axes of a box this changes nothing)."""
        axes = np.reshape(self.direction, (3, 3)).copy()
        if np.linalg.det(axes) < 0:
            axes[:, 2] = -axes[:, 2]
        return axes

    def axial_axis(self) -> int:
        """The voxel axis (0 = i, 1 = j, 2 = k) closest to the patient's superior direction."""
        return int(np.argmax(np.abs(np.reshape(self.direction, (3, 3))[AXIS_S])))

    def slice_center_ras(self, index: int) -> tuple[float, float, float]:
        """RAS of the centre of axial slice `index`: mid-grid along the two in-plane axes."""
        ijk = (np.array(self.size, dtype=float) - 1) / 2
        ijk[self.axial_axis()] = index
        return tuple(float(v) for v in (self.ijk_to_ras() @ np.append(ijk, 1.0))[:3])

    def voxel_map(self, other: VoxelGrid) -> VoxelMap | None:
        """How this grid's voxels lie on `other`, or None unless both put the same voxels at the
        same places (axes may be permuted or reversed: see `geometry.voxel_map`)."""
        return voxel_map(self.ijk_to_lps(), self.size, other.ijk_to_lps(), other.size)

    def equals(self, other: VoxelGrid, tolerance: float = GRID_TOLERANCE) -> bool:
        """The same grid: size equal, and origin, spacing (mm) and direction cosines within `tolerance`."""
        return self.size == other.size and all(
            np.allclose(a, b, atol=tolerance) for a, b in ((self.origin, other.origin), (self.spacing, other.spacing),
                                                            (self.direction, other.direction))
        )

    def matches(self, other: VoxelGrid) -> bool:
        """Whether both grids put the same voxels at the same places, in any voxel order."""
        return self.voxel_map(other) is not None


def _axis_map(oriented: sitk.Image, original: sitk.Image) -> VoxelMap:
    """The VoxelMap from `oriented` to `original`, which must hold the same voxels (as `orient_to_lps` makes)."""
    mapping = voxel_map(ijk_to_lps_matrix(oriented), oriented.GetSize(), ijk_to_lps_matrix(original), original.GetSize())
    if mapping is None:
        raise ValueError("the two images are not a permutation/flip of the same voxel grid")
    return mapping


def to_original_grid(array_kji: np.ndarray, oriented: sitk.Image, original: sitk.Image) -> sitk.Image:
    """An array on the oriented grid as an image on the original grid: same voxels, original geometry.

    Exact (numpy flips and a transpose, no interpolation). The dtype is kept, except bool which
    becomes uint8 (SimpleITK has no bool pixels).
    """
    mapping = _axis_map(oriented, original)
    expected_shape = tuple(reversed(oriented.GetSize()))
    if array_kji.shape != expected_shape:
        raise ValueError(f"array shape {array_kji.shape} does not match the oriented grid {expected_shape}")
    # one explicit numpy copy: much faster than GetImageFromArray's own copy of a strided view
    out = np.ascontiguousarray(mapping.array(array_kji))
    if out.dtype == bool:
        out = out.view(np.uint8)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(original)
    return image


def slices_to_original_grid(
    planes: Mapping[int, np.ndarray], oriented: sitk.Image, original: sitk.Image, pixel_type: int = sitk.sitkFloat32
) -> sitk.Image:
    """Axial slices of the oriented grid (k -> (J, I) array) as an image on the original grid, zero
    elsewhere: exact, like `to_original_grid`, but the one volume in memory is the image itself
    (for a map that lives on a few slices, such as the Grad-CAM heat map)."""
    mapping = _axis_map(oriented, original)
    image = sitk.Image(original.GetSize(), pixel_type)
    image.CopyInformation(original)
    dtype = sitk.GetArrayViewFromImage(image).dtype
    for k, plane in planes.items():
        block = sitk.GetImageFromArray(np.ascontiguousarray(mapping.array(np.asarray(plane, dtype)[None])))
        region = [slice(None)] * 3
        at = mapping.slice_index(2, k)
        region[mapping.axes[2]] = slice(at, at + 1)
        image[tuple(region)] = block  # in place (sitk.Paste would copy the volume)
    return image


def oriented_to_original_index(
    oriented: sitk.Image, original: sitk.Image, ijk: Sequence[int]
) -> tuple[int, int, int]:
    """The original grid's (i, j, k) of the voxel at `ijk` on the oriented grid."""
    return _axis_map(oriented, original).index(ijk)


def original_to_oriented_index(
    oriented: sitk.Image, original: sitk.Image, ijk: Sequence[int]
) -> tuple[int, int, int]:
    """The oriented grid's (i, j, k) of the voxel at `ijk` on the original grid."""
    return _axis_map(oriented, original).inverse_index(ijk)


def shear_deg(axes, extents_mm: Sequence[float], spacing_mm: Sequence[float]) -> float:
    """How many degrees the grid's most oblique pair of voxel axes departs from perpendicular, or 0.0
    when taking every pair as perpendicular moves no voxel by more than SHEAR_TOLERANCE of the
    smallest spacing.

    axes: 3x3, column a along voxel axis a (LPS or RAS, any length); extents_mm: the grid's length
    along each axis; spacing_mm: the voxel spacing along each axis.
    """
    axes = np.asarray(axes, dtype=float)
    units = axes / np.linalg.norm(axes, axis=0)
    worst = 0.0
    for a, b in itertools.combinations(range(3), 2):
        cosine = min(1.0, abs(float(units[:, a] @ units[:, b])))
        if max(extents_mm[a], extents_mm[b]) * cosine > SHEAR_TOLERANCE * min(spacing_mm):
            worst = max(worst, float(np.degrees(np.arcsin(cosine))))
    return worst


def axial_axis(image: sitk.Image) -> int:
    """The voxel axis (0 = i, 1 = j, 2 = k) closest to the patient's superior direction."""
    return VoxelGrid.from_image(image).axial_axis()


def lps_to_ras(p: Sequence[float]) -> tuple[float, float, float]:
    """An LPS point in RAS (Slicer's scene): the first two signs flip."""
    return (-float(p[0]), -float(p[1]), float(p[2]))


def ras_to_lps(p: Sequence[float]) -> tuple[float, float, float]:
    """A RAS point in LPS (DICOM/ITK): the first two signs flip."""
    return (-float(p[0]), -float(p[1]), float(p[2]))


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """The 4x4 affine with LPS = origin + direction @ diag(spacing) @ ijk."""
    return VoxelGrid.from_image(image).ijk_to_lps()


def midline_column(oriented: sitk.Image) -> float:
    """The column i of an LPS-oriented image where LPS x is 0 at the grid's centre row and slice.

    Scanners put the patient on the table centre (x = 0); where a field of view holds one side
    only, this column, not the image's middle, separates the patient's right (x < 0) from left.
    """
    size = oriented.GetSize()
    centre = [(n - 1) / 2 for n in size]
    x_at = [oriented.TransformContinuousIndexToPhysicalPoint([i, centre[1], centre[2]])[0] for i in (0.0, 1.0)]
    return float(-x_at[0] / (x_at[1] - x_at[0]))
