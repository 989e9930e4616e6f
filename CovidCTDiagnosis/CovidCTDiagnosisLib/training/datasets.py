"""Labelled slice sets, manifests of CT volumes, the patient-level split, and the prepared-image cache.

A labelled set is a CSV with columns `path,label[,patient_id]`; paths are relative to the CSV's
folder. A path is either a 2-D slice image (PNG/JPG/BMP/DICOM slice, already in a lung window) or
a CT volume (DICOM series folder, NIfTI, NRRD, MHA): a volume row stands for the slices the
analysis pipeline would score (`preparation.prepare_ct`, the pipeline's own path), each with the
row's label. Images and volumes without (enough) lung are skipped and counted, not fatal.
Rows without a patient id cannot be split by patient, so they are used for training only (never
validation or test). Each image is read, lung-masked and cropped ONCE at the model's input size
and kept as uint8 with its cropped lung mask; augmentation then works on these arrays.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import preparation
from ..batch import VOLUME_SUFFIXES
from ..drenet import DRENetConfig
from ..errors import InputNotFoundError, NoLungsError, UnreadableInputError
from ..preprocessing import crop_mask

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.1, 0.3)
DEFAULT_WINDOW = (DRENetConfig.window_level, DRENetConfig.window_width)
# dataset folder names -> the model's class names
LABEL_ALIASES = {
    "covid": "COVID-19",
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "noncovid": "Non-COVID-19",
    "non-covid": "Non-COVID-19",
    "non-covid-19": "Non-COVID-19",
    "non-covid19": "Non-COVID-19",
}


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str  # a model class name
    patient_id: str | None  # None: training only


@dataclass
class PreparedSet:
    """Images prepared for the model: (N, S, S) uint8 images and bool lung masks, labels as class indices."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    patients: list
    paths: list
    skipped: list = field(default_factory=list)  # "path: reason" of the items without (enough) lung

    def __len__(self) -> int:
        return len(self.labels)


def canonical_label(label: str, classes) -> str:
    """A dataset label as one of `classes` (exact, or via LABEL_ALIASES); ValueError otherwise."""
    if label in classes:
        return label
    alias = LABEL_ALIASES.get(label.strip().lower())
    if alias in classes:
        return alias
    raise ValueError(f"label {label!r} is not one of the classes {list(classes)}")


def read_labels(csv_path, classes, training_only: bool = False) -> list[LabelledImage]:
    """Rows of a `path,label[,patient_id]` CSV; `training_only` drops the patient ids."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputNotFoundError(f"labels file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]  # the line each row ends on (1 is the header)
    if not {"path", "label"} <= set(reader.fieldnames or ()):
        raise UnreadableInputError(f"{csv_path} needs a header with at least the columns path,label")
    if not rows:
        raise UnreadableInputError(f"{csv_path} has a header but no rows: no labelled images")
    items = []
    for line, row in rows:
        pid = (row.get("patient_id") or "").strip()
        try:
            label = canonical_label(row["label"] or "", classes)
        except ValueError as exc:
            raise UnreadableInputError(f"{csv_path} line {line}: {exc}") from None
        items.append(
            LabelledImage(
                path=(csv_path.parent / (row["path"] or "")).resolve(),
                label=label,
                patient_id=None if training_only or not pid else f"{csv_path.parent.name}/{pid}",
            )
        )
    return items


def split_by_patient(items, seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """Patient ids per split, stratified by each patient's majority label; seeded and reproducible."""
    by_patient = defaultdict(list)
    for item in items:
        if item.patient_id is not None:
            by_patient[item.patient_id].append(item.label)
    by_label = defaultdict(list)
    for pid in sorted(by_patient):
        labels = by_patient[pid]
        by_label[max(sorted(set(labels)), key=labels.count)].append(pid)
    rng = np.random.default_rng(seed)
    split = {name: [] for name in SPLIT_NAMES}
    for label in sorted(by_label):
        pids = list(by_label[label])
        rng.shuffle(pids)
        n_val = round(len(pids) * fractions[1])
        n_test = round(len(pids) * fractions[2])
        split["val"] += pids[:n_val]
        split["test"] += pids[n_val : n_val + n_test]
        split["train"] += pids[n_val + n_test :]
    return {name: sorted(pids) for name, pids in split.items()}


def subset(items, split: dict, name: str) -> list[LabelledImage]:
    """The items of split `name`; rows without a patient id belong to "train" only."""
    chosen = set(split[name])
    return [it for it in items if (it.patient_id in chosen) or (name == "train" and it.patient_id is None)]


def save_split(split: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1))
    return path


def load_split(path) -> dict[str, list[str]]:
    split = json.loads(Path(path).read_text())
    if set(split) != set(SPLIT_NAMES):
        raise UnreadableInputError(f"{path} is not a train/val/test patient split")
    return split


def is_volume(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def _as_u8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


def prepare_image(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One slice image -> (S, S) uint8 model input (lungs only, cropped) and its (S, S) bool lung mask.

    Raises NoLungsError for an image without lungs (`preparation.prepare_image`)."""
    image, mask, _ = preparation.prepare_image(path, size)
    return _as_u8(image), crop_mask(mask, size)


def prepare_volume(path: Path, size: int, window=DEFAULT_WINDOW) -> list[tuple[np.ndarray, np.ndarray]]:
    """A CT volume -> the pipeline's chosen slices, each prepared as in `prepare_image`.

    Raises NoLungsError when the volume holds too little lung (`preparation.check_coverage`)."""
    prepared = preparation.prepare_ct(path, size, *window)
    return [(_as_u8(image), mask) for image, mask in zip(prepared.inputs, prepared.masks)]


def prepare_set(items, classes, size: int, progress: bool = False, window=DEFAULT_WINDOW) -> PreparedSet:
    """Read and prepare every item once (a volume row gives several slices); items without lungs
    are skipped into `PreparedSet.skipped` (with `progress`, their count is printed on stderr)."""
    from tqdm import tqdm

    images, masks, labels, patients, paths, skipped = [], [], [], [], [], []
    for item in tqdm(items, desc="preparing images", disable=not progress, leave=False):
        try:
            slices = prepare_volume(item.path, size, window) if is_volume(item.path) else [prepare_image(item.path, size)]
        except NoLungsError as exc:
            skipped.append(f"{item.path}: {exc}")
            continue
        for n, (image, mask) in enumerate(slices):
            images.append(image)
            masks.append(mask)
            labels.append(list(classes).index(item.label))
            patients.append(item.patient_id)
            paths.append(f"{item.path}#{n}" if is_volume(item.path) else str(item.path))
    if skipped and progress:
        tqdm.write(f"skipped {len(skipped)} of {len(items)} items without lungs, e.g. {skipped[0]}", file=sys.stderr)
    empty = np.zeros((0, size, size))
    return PreparedSet(
        np.stack(images) if images else empty.astype(np.uint8),
        np.stack(masks) if masks else empty.astype(bool),
        np.array(labels, np.int64),
        patients,
        paths,
        skipped,
    )
