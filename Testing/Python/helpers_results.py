"""A hand-made `Result` with realistic content, for testing the output writers only."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from CovidCTDiagnosisLib.result import (
    UNTRAINED_WARNING,
    InputInfo,
    LesionBox,
    ModelInfo,
    PatientResult,
    Result,
    SliceResult,
)

CLASSES = ["normal", "pneumonia", "COVID-19"]
POSITIVE = "COVID-19"
SIZE = (48, 40, 12)  # i, j, k
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-20.0, -15.0, -140.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # i runs L->R, j runs P->A (as from RAS files)
MIRRORED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # left-handed grid: i runs L->R only
LAS = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # left-handed: i to the left, j anterior (an LAS NIfTI)


def left_handed_oblique_direction() -> tuple[float, ...]:
    """The oblique grid with its k axis reversed: left-handed and oblique."""
    return tuple((np.reshape(oblique_direction(), (3, 3)) @ np.diag([1.0, 1.0, -1.0])).ravel())


def slicer_right_handed(ijk_to_ras, size) -> np.ndarray:
    """The IJK-to-RAS matrix Slicer's volume reader gives a left-handed grid
    (ForceRightHandedIJKCoordinateSystem): the same voxels, the k axis reversed, the origin at the last slice."""
    m = np.array(ijk_to_ras, dtype=float)
    m[:3, 3] += m[:3, 2] * (size[2] - 1)
    m[:3, 2] *= -1
    return m


def oblique_direction(degrees: float = 20.0) -> tuple[float, ...]:
    """A rotation about S by `degrees` then about L by half that: an oblique, right-handed grid."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rx @ rz).ravel())


def make_image(array_kji: np.ndarray, direction=IDENTITY, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def make_box(image: sitk.Image, rank: int, score: float, ijk_min, ijk_max) -> LesionBox:
    """A box with centre and size computed from its voxel range, as the pipeline does."""
    return LesionBox.from_voxel_range(image, rank, score, ijk_min, ijk_max)


def make_result(direction=IDENTITY, trained: bool = True) -> tuple[Result, sitk.Image]:
    """(result, ct image): a small chest-like CT, lung labels, Grad-CAM on 3 analysed slices with boxes."""
    nk, nj, ni = SIZE[2], SIZE[1], SIZE[0]
    ct = np.full((nk, nj, ni), 40, dtype=np.int16)  # soft tissue
    labels = np.zeros((nk, nj, ni), dtype=np.uint8)
    labels[1:11, 8:32, 4:22] = 1  # right lung: low i (patient's right for an identity direction)
    labels[1:11, 8:32, 26:44] = 2
    ct[labels > 0] = -850
    ct_image = make_image(ct, direction)
    lung_labels = make_image(labels, direction)

    analysed = {4: [0.2, 0.3, 0.5], 6: [0.05, 0.15, 0.8], 8: [0.6, 0.3, 0.1]}
    box_ranges = {
        4: [((6, 10, 4), (12, 16, 4)), ((9, 14, 4), (15, 20, 4))],  # these two overlap
        6: [((28, 12, 6), (35, 21, 6)), ((30, 15, 6), (40, 25, 6)), ((6, 20, 6), (10, 28, 6))],
        8: [((14, 9, 8), (20, 13, 8))],
    }
    box_scores = {4: [0.7, 0.3], 6: [0.91, 0.06, 0.03], 8: [1.0]}
    cam = np.zeros((nk, nj, ni), dtype=np.float32)
    slices = []
    for k, probs in analysed.items():
        cam[k] = np.linspace(0, 1, ni, dtype=np.float32)[None, :] * (labels[k] > 0)
        boxes = [
            make_box(ct_image, rank + 1, score, lo, hi)
            for rank, ((lo, hi), score) in enumerate(zip(box_ranges[k], box_scores[k]))
        ]
        z = ct_image.TransformContinuousIndexToPhysicalPoint(((ni - 1) / 2, (nj - 1) / 2, float(k)))[2]
        slices.append(
            SliceResult(
                index=k,
                z_mm=float(z),
                lung_fraction=0.8 + 0.02 * k,
                probabilities=dict(zip(CLASSES, probs)),
                boxes=boxes,
            )
        )
    patient_probs = dict(zip(CLASSES, np.mean(list(analysed.values()), axis=0).tolist()))
    result = Result(
        input=InputInfo(
            path="/data/P001.nii.gz",
            format="nifti",
            size=SIZE,
            spacing=SPACING,
            origin=ORIGIN,
            direction=tuple(direction),
        ),
        model=ModelInfo(
            name="drenet-resnet50",
            file="/models/drenet.pt" if trained else None,
            sha256="ab" * 32 if trained else None,
            classes=list(CLASSES),
            backbone="resnet50",
            input_size=224,
            trained=trained,
        ),
        device="cpu",
        patient=PatientResult(label=max(patient_probs, key=patient_probs.get), probabilities=patient_probs, aggregation="mean"),
        slices=slices,
        top_slices=[6, 4, 8],
        positive_class=POSITIVE,
        timings={"read": 0.12, "lungs": 0.3, "network": 1.5},
        lung_labels=lung_labels,
        gradcam=make_image(cam, direction),
        warnings=[] if trained else [UNTRAINED_WARNING],
    )
    return result, ct_image
