"""How much of the lungs is affected: ground-glass and consolidation volumes, per lung and zone, and a
6-zone CT severity score. Measured from HU inside the lung mask, not predicted by the network.

Bands (HU, lower bound inclusive, upper exclusive; sources in docs/report-schema.md "severity"):
ground-glass GROUND_GLASS_HU = [-700, -300), consolidation CONSOLIDATION_HU = [-300, +50). Aerated
lung lies below -700 HU; denser voxels (bone, calcification, contrast) count as neither.

Vessels and airway walls are as dense as consolidation, and their partial-volume rims fall in the
ground-glass band: on each axial slice the mask of band voxels is opened (erosion then dilation)
with a disk of VESSEL_OPENING_RADIUS_MM, which removes every structure narrower than the disk's
diameter in the slice (vessels and bronchi up to ~6 mm across, airway walls, the lung mask's
partial-volume rim at the pleura); lesions wider than that keep their shape. Voxels whose slices
above or below are not lung there are left out too: the partial-volume layer where the diaphragm's
dome or the apex cuts through a slice (on normal001 it added 33 mL of "consolidation").

Zones: each lung's axial extent (slices holding that lung) is cut into three equal heights along
the patient's S axis: lower, middle, upper (by slice; a slice belongs to the zone of its centre).
A zone scores 0-5 by the share of its lung volume involved (ground-glass + consolidation):
0 below NONE_BELOW_PERCENT, 1 below 5 %, 2 up to 25 %, 3 up to 50 %, 4 up to 75 %, 5 above
(the 6-zone score of e.g. Yang et al., Radiology: Cardiothoracic Imaging 2020, with zones instead of
lobes, which need a lobe model). 0-30 in total.

Arrays are on the LPS-oriented grid (`geometry.orient_to_lps`): numpy [k, j, i], k inferior->superior.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from .lungs import GROUND_GLASS_MAX_HU, LEFT, MM3_PER_ML, RIGHT, Lungs

GROUND_GLASS_HU = (-700.0, GROUND_GLASS_MAX_HU)  # [low, high)
CONSOLIDATION_HU = (GROUND_GLASS_MAX_HU, 50.0)  # [low, high)
VESSEL_OPENING_RADIUS_MM = 3.0  # per-slice opening disk: structures narrower than 6 mm are left out
NONE_BELOW_PERCENT = 0.5  # zone involvement below this scores 0 (normal001's zones all lie below; see tests)
SCORE_UPPER_PERCENT = (5.0, 25.0, 50.0, 75.0)  # score 1: < 5 %; 2: <= 25 %; 3: <= 50 %; 4: <= 75 %; 5: above
SCORE_NAME = "6-zone CT severity score (0-30)"
ZONES = ("upper", "middle", "lower")  # thirds of each lung's height along S, superior first
LUNG_NAMES = {RIGHT: "right", LEFT: "left"}
NO_FINDING, GROUND_GLASS, CONSOLIDATION = 0, 1, 2  # labels of `Severity.labels`
METHOD = (
    "HU bands inside the lung mask; vessels and airway walls left out by a per-slice morphological opening "
    f"(disk of radius {VESSEL_OPENING_RADIUS_MM:g} mm)"
)


@dataclass
class Involvement:
    """Volumes (mL) of one region (a lung, both lungs or a zone) and its share involved (%)."""

    lung_ml: float
    ground_glass_ml: float
    consolidation_ml: float
    ground_glass_percent: float
    consolidation_percent: float
    involved_percent: float  # ground-glass + consolidation


@dataclass
class Zone(Involvement):
    lung: str = ""  # "right" or "left"
    zone: str = ""  # "upper", "middle", "lower"
    z_range_mm: tuple[float, float] = (0.0, 0.0)  # LPS S of the zone's lowest and highest slice centres
    score: int = 0  # 0-5


@dataclass
class Severity:
    """The measured involvement of one CT. `to_report()` is report.json's `severity` block."""

    lungs: dict[str, Involvement]  # "right", "left", "both"
    zones: list[Zone]  # right upper, middle, lower, then left upper, middle, lower
    score: int  # 0-30: the sum of the zones' scores
    partial_coverage: bool  # the scan ends inside the lungs: only the scanned part was measured
    notes: list[str] = field(default_factory=list)
    labels: np.ndarray | None = field(default=None, repr=False)  # uint8 [k, j, i]: NO_FINDING, GROUND_GLASS, CONSOLIDATION
    slice_involved_ml: np.ndarray | None = field(default=None, repr=False)  # float [k]: ground-glass + consolidation per slice

    def to_report(self) -> dict:
        return {
            "method": METHOD,
            "bands_hu": {"ground_glass": list(GROUND_GLASS_HU), "consolidation": list(CONSOLIDATION_HU)},
            "lungs": {name: asdict(v) for name, v in self.lungs.items()},
            "zones": [asdict(z) for z in self.zones],
            "score": self.score,
            "score_name": SCORE_NAME,
            "partial_coverage": self.partial_coverage,
            "notes": list(self.notes),
        }


def zone_score(percent: float) -> int:
    """0-5 for a zone's involved share (%): 0 (none), under 5, 5 to 25, over 25 to 50, over 50 to 75, over 75."""
    if percent < NONE_BELOW_PERCENT:
        return 0
    five, quarter, half, three_quarters = SCORE_UPPER_PERCENT
    return 1 + int(percent >= five) + int(percent > quarter) + int(percent > half) + int(percent > three_quarters)


def _involvement(counts: np.ndarray, voxel_ml: float) -> dict:
    """counts [3]: lung voxels that are no finding, ground-glass, consolidation."""
    total = float(counts.sum())
    share = (lambda n: 100.0 * float(n) / total) if total else (lambda n: 0.0)
    return dict(
        lung_ml=total * voxel_ml,
        ground_glass_ml=float(counts[GROUND_GLASS]) * voxel_ml,
        consolidation_ml=float(counts[CONSOLIDATION]) * voxel_ml,
        ground_glass_percent=share(counts[GROUND_GLASS]),
        consolidation_percent=share(counts[CONSOLIDATION]),
        involved_percent=share(counts[GROUND_GLASS] + counts[CONSOLIDATION]),
    )


def _lung_box(lungs: Lungs) -> tuple[slice, slice, slice]:
    """The lungs' bounding box on the [k, j, i] grid (the whole grid without lungs)."""
    mask = lungs.labels
    ks = np.flatnonzero(lungs.area_mm2 > 0)
    if ks.size == 0:
        return (slice(0, 0),) * 3
    rows = np.flatnonzero(mask[ks[0] : ks[-1] + 1].any(axis=(0, 2)))
    cols = np.flatnonzero(mask[ks[0] : ks[-1] + 1].any(axis=(0, 1)))
    return slice(ks[0], ks[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def band_labels(hu_kji: np.ndarray, lungs: Lungs, remove_vessels: bool = True, box: tuple | None = None) -> np.ndarray:
    """uint8 [k, j, i]: GROUND_GLASS / CONSOLIDATION inside the lungs, NO_FINDING elsewhere.

    remove_vessels False: the bands as they are, vessels and airway walls included (to measure them).
    """
    labels = np.zeros(hu_kji.shape, dtype=np.uint8)
    box = _lung_box(lungs) if box is None else box
    hu, lung = hu_kji[box], lungs.labels[box] > 0
    core = lung.copy()  # lung voxels with lung in the slices above and below: no partial-volume dome or apex layer
    core[1:] &= lung[:-1]
    core[:-1] &= lung[1:]
    dense = (hu >= GROUND_GLASS_HU[0]) & (hu < CONSOLIDATION_HU[1]) & core
    if remove_vessels:
        si, sj = lungs.spacing_ijk[0], lungs.spacing_ijk[1]
        ri, rj = VESSEL_OPENING_RADIUS_MM / si, VESSEL_OPENING_RADIUS_MM / sj
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(round(ri)) + 1, 2 * int(round(rj)) + 1))
        dense_u8 = dense.view(np.uint8)
        opened = np.empty_like(dense_u8)
        for n in range(dense_u8.shape[0]):
            cv2.morphologyEx(dense_u8[n], cv2.MORPH_OPEN, disk, dst=opened[n], borderType=cv2.BORDER_CONSTANT, borderValue=0)
        dense = opened.view(bool) & core
    out = labels[box]
    out[dense] = GROUND_GLASS
    out[dense & (hu >= CONSOLIDATION_HU[0])] = CONSOLIDATION
    return labels


def measure_severity(
    hu_kji: np.ndarray, lungs: Lungs, z_mm: np.ndarray, partial_coverage: bool = False, remove_vessels: bool = True
) -> Severity:
    """Ground-glass and consolidation per lung and zone, and the 6-zone score.

    hu_kji: HU [k, j, i] (int16 or float32) on the LPS-oriented grid; lungs on the same grid; z_mm: LPS S (mm) of
    each slice k's centre (ascending); partial_coverage: the scan ends inside the lungs
    (`preparation.check_coverage` warned), said in `notes`.
    """
    box = _lung_box(lungs)
    labels = band_labels(hu_kji, lungs, remove_vessels, box)
    voxel_ml = float(np.prod(lungs.spacing_ijk)) / MM3_PER_ML
    nk = lungs.labels.shape[0]
    # voxel counts [k, lung (0 none, 1 right, 2 left), class], one bincount per slice of the lungs' box
    code = lungs.labels[box] * np.uint8(3) + labels[box]
    counts = np.zeros((nk, 3, 3), dtype=np.int64)
    for n, k in enumerate(range(nk)[box[0]]):
        counts[k] = np.bincount(code[n].ravel(), minlength=9).reshape(3, 3)
    per_lung, zones = {}, []
    for label, name in LUNG_NAMES.items():
        per_slice = counts[:, label, :]
        per_lung[name] = Involvement(**_involvement(per_slice.sum(axis=0), voxel_ml))
        ks = np.flatnonzero(per_slice.sum(axis=1))
        if ks.size == 0:
            continue
        height = ks[-1] - ks[0] + 1
        third = np.minimum((np.arange(nk) - ks[0] + 0.5) * 3 // height, 2).astype(int)  # 0 lower, 2 upper
        for zone_name, t in zip(ZONES, (2, 1, 0)):
            in_zone = (third == t) & (np.arange(nk) >= ks[0]) & (np.arange(nk) <= ks[-1])
            values = _involvement(per_slice[in_zone].sum(axis=0), voxel_ml)
            zk = np.flatnonzero(in_zone)
            zones.append(Zone(**values, lung=name, zone=zone_name, z_range_mm=(float(z_mm[zk[0]]), float(z_mm[zk[-1]])),
                              score=zone_score(values["involved_percent"])))
    per_lung["both"] = Involvement(**_involvement(counts[:, 1:, :].sum(axis=(0, 1)), voxel_ml))
    notes = []
    if partial_coverage:
        notes.append("partial lung coverage: only the scanned part of the lungs was measured; the zones and the "
                     "score describe that part, and the true involvement and score may be higher")
    return Severity(
        lungs=per_lung,
        zones=zones,
        score=int(sum(z.score for z in zones)),
        partial_coverage=partial_coverage,
        notes=notes,
        labels=labels,
        slice_involved_ml=(counts[:, 1:, GROUND_GLASS] + counts[:, 1:, CONSOLIDATION]).sum(axis=1) * voxel_ml,
    )
