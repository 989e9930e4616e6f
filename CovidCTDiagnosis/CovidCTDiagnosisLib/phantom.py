"""A synthetic chest CT in Hounsfield units with known lungs and COVID-like lesions, for tests and demos.

The anatomy is defined in physical space: every voxel's LPS position is computed from the image
geometry and the shapes are evaluated there, so an oblique, flipped or permuted grid still holds
an anatomically correct chest (patient right at -L, anterior at -P, head at +S). Shapes are
given in a reference frame of millimetres centred on the volume's physical centre; the frame is
scaled down uniformly when the volume's extent is smaller than the reference chest needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

DEFAULT_SIZE = (160, 128, 48)  # voxels along i, j, k
DEFAULT_SPACING = (2.0, 2.0, 5.0)  # mm
DEMO_SIZE = (256, 256, 80)  # a more CT-like volume for demos
DEMO_SPACING = (1.4, 1.4, 4.0)
REFERENCE_EXTENT_MM = np.array([320.0, 256.0, 240.0])  # L, P, S extent the reference chest fits

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_BONE = 700.0
HU_TABLE = 200.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
NOISE_SD_HU = 10.0
LUNG_NOISE_SD_HU = 30.0  # parenchyma texture

# Reference frame (mm): x to patient left, y to posterior, z to head; origin at the volume centre.
BODY_CENTER_Y = -15.0
BODY_SEMI_AXES = (148.0, 100.0)  # x, y of the elliptic body outline
FAT_THICKNESS = 10.0
TABLE_Y_RANGE = (95.0, 110.0)  # below (posterior to) the body, with an air gap
TABLE_HALF_WIDTH = 150.0
RIB_RING_SEMI_AXES = (132.0, 86.0)  # ellipse through the rib cross-sections, centred like the body
RIB_HALF_THICKNESS = 4.0
RIB_PITCH = 25.0  # mm between ribs along z
RIB_WIDTH = 10.0
RIB_SLOPE = 0.3  # ribs descend anteriorly: z offset per mm of y
RIB_Z_RANGE = (-105.0, 105.0)
RIB_GAP_HALF_ANGLE = (25.0, 20.0)  # degrees without ribs around the anterior and posterior midline
SPINE_CENTER = (0.0, 50.0)
SPINE_RADIUS = 16.0
SPINOUS_PROCESS = ((-5.0, 5.0), (66.0, 82.0))  # x range, y range
THORAX_INNER_SEMI_AXES = (122.0, 76.0)  # lungs stay inside this ellipse (inside the ribs)
LUNG_CENTER = (70.0, -12.0, 0.0)  # left lung; the right lung mirrors x
LUNG_SEMI_AXES = (50.0, 68.0, 85.0)
HEART_CENTER = (15.0, -35.0, -35.0)
HEART_SEMI_AXES = (45.0, 45.0, 50.0)
TRACHEA_CENTER = (0.0, -20.0)
TRACHEA_RADIUS = 9.0
TRACHEA_BOTTOM_Z = 35.0  # the carina; the trachea runs from here to the top of the volume
VESSEL_HILUM = (30.0, -5.0, 5.0)  # left side; mirrored for the right
VESSEL_ENDS = ((95.0, -40.0, 40.0), (100.0, 20.0, 30.0), (90.0, -45.0, -40.0),
               (85.0, 30.0, -50.0), (60.0, 0.0, 70.0), (70.0, -20.0, -65.0))
VESSEL_RADIUS = 2.5
BRANCH_RADIUS = 1.5
BRANCH_OFFSET = (0.0, 15.0, 10.0)  # a side branch leaves each vessel's midpoint towards here


@dataclass(frozen=True)
class LesionSpec:
    """A lesion in the reference frame: a sphere painted only inside the lung it lies in."""

    offset_mm: tuple[float, float, float]  # from the volume centre, x to the patient's left
    radius_mm: float
    hu: float


DEFAULT_LESIONS = (
    LesionSpec((-75.0, -35.0, 40.0), 15.0, -450.0),  # ground glass, right upper anterior
    LesionSpec((-80.0, 20.0, -40.0), 15.0, -350.0),  # ground glass, right lower posterior
    LesionSpec((85.0, -10.0, 20.0), 12.0, -400.0),  # ground glass, left
    LesionSpec((70.0, 40.0, -30.0), 15.0, -50.0),  # consolidation touching the left posterior wall
)


@dataclass
class Lesion:
    """A lesion as placed in one phantom."""

    center_lps: tuple[float, float, float]
    radius_mm: float
    hu: float
    lung: str  # "right" or "left"
    center_ijk: tuple[int, int, int]


@dataclass
class Phantom:
    """A synthetic CT with its truth: the drawn lungs and the lesions as placed."""

    image: sitk.Image  # float32 HU
    lung_labels: sitk.Image  # uint8: 0 none, 1 right lung, 2 left lung; same geometry
    lesions: list[Lesion]


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse with semi-axes a, b."""
    return (u / a) ** 2 + (v / b) ** 2


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each point (N x 3, float32) to the segment start-end."""
    d = (end - start).astype(np.float32)
    rel = points - start.astype(np.float32)
    t = np.clip(rel @ d / (d @ d), 0.0, 1.0)
    rel -= t[:, None] * d
    return np.sqrt(np.einsum("nc,nc->n", rel, rel))


def _lung_region(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: float) -> np.ndarray:
    """One lung (side -1 right, +1 left): ellipsoid inside the ribs, minus the heart."""
    cx, cy, cz = LUNG_CENTER
    ax, ay, az = LUNG_SEMI_AXES
    ellipsoid = _ellipse(x - side * cx, y - cy, ax, ay) + ((z - cz) / az) ** 2 < 1
    inside_ribs = _ellipse(x, y - BODY_CENTER_Y, *THORAX_INNER_SEMI_AXES) < 1
    hx, hy, hz = HEART_CENTER
    heart = _ellipse(x - hx, y - hy, *HEART_SEMI_AXES[:2]) + ((z - hz) / HEART_SEMI_AXES[2]) ** 2 < 1
    return ellipsoid & inside_ribs & ~heart


def _ribs(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Rib cross-sections: arc segments of an ellipse, in sloping bands along z."""
    yc = y - BODY_CENTER_Y
    a, b = RIB_RING_SEMI_AXES
    ring = np.abs(np.sqrt(_ellipse(x, yc, a, b)) - 1) * min(a, b) < RIB_HALF_THICKNESS
    angle = np.degrees(np.arctan2(yc, x))  # -90 anterior, +90 posterior
    anterior_gap, posterior_gap = RIB_GAP_HALF_ANGLE
    arcs = (np.abs(angle + 90) > anterior_gap) & (np.abs(angle - 90) > posterior_gap)
    bands = np.mod(z - RIB_SLOPE * yc, RIB_PITCH) < RIB_WIDTH
    in_chest = (z > RIB_Z_RANGE[0]) & (z < RIB_Z_RANGE[1])
    return ring & arcs & bands & in_chest


def _vessel_segments() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(start, end, radius) of the vessel tree of both lungs in the reference frame."""
    segments = []
    for side in (-1.0, 1.0):
        mirror = np.array([side, 1.0, 1.0])
        hilum = np.array(VESSEL_HILUM) * mirror
        for end in VESSEL_ENDS:
            tip = np.array(end) * mirror
            middle = (hilum + tip) / 2
            segments.append((hilum, tip, VESSEL_RADIUS))
            segments.append((middle, middle + np.array(BRANCH_OFFSET) + (tip - hilum) / 4, BRANCH_RADIUS))
    return segments


def make_chest_phantom(
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    lesions: Sequence[LesionSpec] = DEFAULT_LESIONS,
    seed: int = 0,
) -> Phantom:
    """A chest CT phantom with the given geometry (size i, j, k; direction 3x3 row-major)."""
    size = tuple(int(n) for n in size)
    spacing_arr = np.asarray(spacing, dtype=float)
    direction_m = np.asarray(direction, dtype=float).reshape(3, 3)
    axes = direction_m * spacing_arr  # column a: LPS step of one voxel along axis a
    center = np.asarray(origin, dtype=float) + axes @ ((np.array(size) - 1) / 2)
    extent_lps = np.abs(direction_m) @ (np.array(size) * spacing_arr)
    scale = min(1.0, float(np.min(extent_lps / REFERENCE_EXTENT_MM)))

    # reference-frame coordinates of every voxel, arrays indexed [k, j, i], float32 throughout
    steps = [(axes[:, a] / scale)[:, None] * np.arange(size[a]) for a in range(3)]  # 3 x n per axis
    start = (np.asarray(origin, dtype=float) - center) / scale
    x, y, z = (
        np.float32(start[c]) + steps[2][c].astype(np.float32)[:, None, None]
        + steps[1][c].astype(np.float32)[None, :, None] + steps[0][c].astype(np.float32)[None, None, :]
        for c in range(3)
    )

    hu = np.full(x.shape, HU_AIR, dtype=np.float32)
    hu[(y > TABLE_Y_RANGE[0]) & (y < TABLE_Y_RANGE[1]) & (np.abs(x) < TABLE_HALF_WIDTH)] = HU_TABLE
    body = _ellipse(x, y - BODY_CENTER_Y, *BODY_SEMI_AXES) < 1
    # everything else lies inside the body: evaluate it on the body's voxels only
    x, y, z = x[body], y[body], z[body]
    body_hu = np.full(x.shape, HU_FAT, dtype=np.float32)
    body_a, body_b = BODY_SEMI_AXES
    body_hu[_ellipse(x, y - BODY_CENTER_Y, body_a - FAT_THICKNESS, body_b - FAT_THICKNESS) < 1] = HU_SOFT_TISSUE
    spine = _ellipse(x - SPINE_CENTER[0], y - SPINE_CENTER[1], SPINE_RADIUS, SPINE_RADIUS) < 1
    (sx0, sx1), (sy0, sy1) = SPINOUS_PROCESS
    spine |= (x > sx0) & (x < sx1) & (y > sy0) & (y < sy1)
    body_hu[spine | _ribs(x, y, z)] = HU_BONE

    body_labels = np.zeros(x.shape, dtype=np.uint8)
    for label, side in ((1, -1.0), (2, 1.0)):
        body_labels[_lung_region(x, y, z, side)] = label
    lung = body_labels > 0
    body_hu[lung] = HU_LUNG

    # vessels and lesions, evaluated on lung voxels only
    lung_points = np.stack([x[lung], y[lung], z[lung]], axis=1)
    lung_hu = body_hu[lung]
    for seg_start, seg_end, radius in _vessel_segments():
        lung_hu[_segment_distance(lung_points, seg_start, seg_end) < radius] = HU_VESSEL
    image_geometry = sitk.Image(size, sitk.sitkUInt8)
    image_geometry.SetSpacing(tuple(spacing_arr))
    image_geometry.SetOrigin(tuple(float(o) for o in origin))
    image_geometry.SetDirection(tuple(direction_m.ravel()))
    placed = []
    for spec in lesions:
        offset = np.array(spec.offset_mm, dtype=np.float32)
        lung_hu[np.einsum("nc,nc->n", lung_points - offset, lung_points - offset) < spec.radius_mm**2] = spec.hu
        center_lps = tuple(float(c) for c in center + offset * scale)
        placed.append(Lesion(
            center_lps=center_lps,
            radius_mm=spec.radius_mm * scale,
            hu=spec.hu,
            lung="right" if offset[0] < 0 else "left",
            center_ijk=tuple(image_geometry.TransformPhysicalPointToIndex(center_lps)),
        ))
    body_hu[lung] = lung_hu
    trachea = _ellipse(x - TRACHEA_CENTER[0], y - TRACHEA_CENTER[1], TRACHEA_RADIUS, TRACHEA_RADIUS) < 1
    body_hu[trachea & (z > TRACHEA_BOTTOM_Z)] = HU_AIR
    hu[body] = body_hu
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[body] = body_labels
    noise_sd = np.where(labels > 0, np.float32(LUNG_NOISE_SD_HU), np.float32(NOISE_SD_HU))

    rng = np.random.default_rng(seed)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * noise_sd

    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(image_geometry)
    lung_labels = sitk.GetImageFromArray(labels)
    lung_labels.CopyInformation(image_geometry)
    return Phantom(image=image, lung_labels=lung_labels, lesions=placed)


def make_demo_phantom(seed: int = 0) -> Phantom:
    """The phantom on a CT-like grid (DEMO_SIZE at DEMO_SPACING) for demos and benchmarks."""
    return make_chest_phantom(size=DEMO_SIZE, spacing=DEMO_SPACING, seed=seed)
