"""Batch inputs for the batch tests: phantom cases as volume files, and summary.csv's rows."""

from __future__ import annotations

import csv
from pathlib import Path

import SimpleITK as sitk


def phantom_cases(folder: Path, phantom, names) -> Path:
    """`folder` holding the phantom CT once per name (.nrrd, .mha, ...: each name is one case)."""
    for name in names:
        sitk.WriteImage(phantom.image, str(folder / name))
    return folder


def summary_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
