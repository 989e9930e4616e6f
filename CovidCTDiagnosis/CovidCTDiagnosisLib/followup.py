"""A follow-up CT against a baseline: the change in measured lung involvement, per lung and zone.

Both analyses' report.json `severity` blocks (measured from HU, not predicted; see severity.py) are compared row by
row: each zone (upper, middle, lower third of each lung), each lung and both lungs, with the involved share in
percentage points, the ground-glass and consolidation volumes in mL and the scores (a zone's 0-5, a lung's the sum of
its zones', both lungs' the 6-zone CT severity score 0-30). Measured involvement of the same patient at two times is
what radiologists compare on follow-up CT; the patient-level probability is not compared (it is not a quantity).

The two CTs are taken to be of the same patient, the baseline first: report.json holds no patient identity or
date to check (the same CT twice is said). Differences
that make volumes less comparable are said in `notes`: other HU bands or method, partial lung coverage, very
different slice spacing (partial-volume effects grow with slice thickness).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass, field, fields
from os import PathLike
from typing import Any

from .errors import OutputError, UnreadableInputError
from .geometry import VoxelGrid
from .outputs import write_csv_file

SPACING_RATIO_NOTED = 1.5  # slice spacings further apart than this ratio are said to make volumes less comparable
CHANGE_NOTED_POINTS = 1.0  # zones whose involved share changes by at least this many percentage points are named


@dataclass
class InvolvementChange:
    """One region at baseline and follow-up: a zone, a whole lung (zone "all") or both lungs (lung "both")."""

    lung: str  # "right", "left" or "both"
    zone: str  # "upper", "middle", "lower" or "all"
    baseline_percent: float  # involved share (ground-glass + consolidation), % of the region's lung volume
    followup_percent: float
    change_points: float  # followup - baseline, percentage points
    ground_glass_change_ml: float
    consolidation_change_ml: float
    baseline_score: int  # zone 0-5, lung 0-15, both lungs 0-30
    followup_score: int


@dataclass
class FollowUp:
    """The change per region, zones first (right upper ... left lower), then right, left and both lungs."""

    rows: list[InvolvementChange]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> InvolvementChange:
        return next(r for r in self.rows if r.lung == "both")

    def summary(self) -> str:
        """One line: the involved share and score at both times, and the zones that changed most."""
        t = self.total
        moved = sorted((r for r in self.rows if r.zone != "all" and abs(r.change_points) >= CHANGE_NOTED_POINTS),
                       key=lambda r: -abs(r.change_points))
        zones = "; ".join(f"{r.lung} {r.zone} {r.change_points:+.1f} points" for r in moved) or "no zone changed by " \
            f"{CHANGE_NOTED_POINTS:g} point or more"
        return (f"involvement {t.baseline_percent:.1f} % -> {t.followup_percent:.1f} % ({t.change_points:+.1f} points), "
                f"6-zone CT severity score {t.baseline_score} -> {t.followup_score} ({t.followup_score - t.baseline_score:+d}); "
                f"{zones}")

    def write_csv(self, path: str | PathLike) -> None:
        """One row per region, the columns of InvolvementChange; written whole or not at all (OutputError)."""
        write_csv_file(path, [x.name for x in fields(InvolvementChange)],
                       ([round(v, 2) if isinstance(v, float) else v for v in astuple(row)] for row in self.rows))


def read_analysis(folder: str | PathLike) -> dict[str, Any]:
    """The report.json of a covidct result folder, as an input: UnreadableInputError (exit 3) when it is not one."""
    from .outputs import read_report

    try:
        return read_report(folder)
    except OutputError as exc:
        raise UnreadableInputError(f"{folder} is not a covidct result folder ({exc})") from exc


def _severity(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    severity = report.get("severity")
    if not severity:
        raise UnreadableInputError(f"the {name} analysis has no measured involvement (only CT volumes analysed with "
                                   "report schema 1.3 or later have one; slice images have none)")
    return severity


def compare_involvement(baseline: Mapping[str, Any], followup: Mapping[str, Any]) -> FollowUp:
    """The change from `baseline` to `followup` (report.json dicts of two CTs of one patient).

    Raises UnreadableInputError when either lacks `severity`.
    """
    before, after = _severity(baseline, "baseline"), _severity(followup, "follow-up")
    notes = []
    if (before["method"], before["bands_hu"]) != (after["method"], after["bands_hu"]):
        notes.append("the two analyses measured involvement differently (HU bands or method): the change is not only "
                     "the patient's")
    for name, severity in (("baseline", before), ("follow-up", after)):
        if severity["partial_coverage"]:
            notes.append(f"the {name} CT covers the lungs only in part: its involvement describes the scanned part")
    source = [r["input"].get("series_uid") or r["input"].get("path") for r in (baseline, followup)]  # None: in memory
    if source[0] is not None and source[0] == source[1]:
        notes.append("both analyses are of the same CT (the same DICOM series or file): this is not a follow-up")
    spacings = sorted(float(r["input"]["spacing"][VoxelGrid.from_report(r).axial_axis()]) for r in (baseline, followup))
    if spacings[1] > SPACING_RATIO_NOTED * spacings[0]:
        notes.append(f"slice spacings differ ({spacings[0]:g} and {spacings[1]:g} mm): partial-volume effects differ, "
                     "so the volumes are less comparable")

    def row(lung: str, zone: str, b: Mapping[str, Any], a: Mapping[str, Any], b_score: int, a_score: int):
        return InvolvementChange(
            lung=lung, zone=zone, baseline_percent=b["involved_percent"], followup_percent=a["involved_percent"],
            change_points=a["involved_percent"] - b["involved_percent"],
            ground_glass_change_ml=a["ground_glass_ml"] - b["ground_glass_ml"],
            consolidation_change_ml=a["consolidation_ml"] - b["consolidation_ml"],
            baseline_score=b_score, followup_score=a_score,
        )

    zones_after = {(z["lung"], z["zone"]): z for z in after["zones"]}
    rows = [row(z["lung"], z["zone"], z, zones_after[z["lung"], z["zone"]], z["score"], zones_after[z["lung"], z["zone"]]["score"])
            for z in before["zones"] if (z["lung"], z["zone"]) in zones_after]

    def lung_score(severity: Mapping[str, Any], lung: str) -> int:
        return sum(z["score"] for z in severity["zones"] if z["lung"] == lung)

    for lung in ("right", "left"):
        rows.append(row(lung, "all", before["lungs"][lung], after["lungs"][lung], lung_score(before, lung), lung_score(after, lung)))
    rows.append(row("both", "all", before["lungs"]["both"], after["lungs"]["both"], before["score"], after["score"]))
    return FollowUp(rows, notes)
