"""Model input from a slice: lung window, square crop around the lungs, resize, 3 channels.

Inference and training both call these functions, so the network sees in use exactly what it
saw in training. Pixels outside the lung mask are zeroed, as in the authors' pipeline: the
network is asked about the lungs, not about the patient's size or the scanner table.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_MARGIN = 0.04  # fraction of the lung box added on each side


@dataclass(frozen=True)
class CropTransform:
    """Maps model-input pixels (x, y) to slice pixels (column i, row j): i = x0 + x * scale."""

    x0: float
    y0: float
    scale: float  # slice pixels per model-input pixel

    def to_slice(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x0 + np.asarray(x) * self.scale, self.y0 + np.asarray(y) * self.scale

    def matrix(self) -> np.ndarray:
        """2x3 affine taking slice pixels to model-input pixels (for cv2.warpAffine)."""
        s = 1.0 / self.scale
        return np.array([[s, 0.0, -self.x0 * s], [0.0, s, -self.y0 * s]], dtype=np.float64)


def lung_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> [0, 1] float32 in the given window (the paper's lung window: level -700, width 1500)."""
    lo = level - width / 2
    return np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)


def square_lung_box(mask: np.ndarray, margin: float = CROP_MARGIN) -> tuple[float, float, float]:
    """(x0, y0, side) of a square around the mask's bounding box, or around the whole image if empty."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        h, w = mask.shape
        y0, y1, x0, x1 = 0, h, 0, w
    else:
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def crop_square(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, CropTransform]:
    """Zero outside the mask, crop the square lung box and resize to (size, size), float32."""
    x0, y0, side = square_lung_box(mask)
    transform = CropTransform(x0, y0, side / size)
    masked = np.where(mask, image, 0).astype(np.float32) if mask.any() else image.astype(np.float32)
    out = cv2.warpAffine(masked, transform.matrix(), (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return out, transform


def crop_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A slice's (H, W) lung mask -> the model input's (size, size) bool lung mask: cropped and
    resized exactly as its image (`crop_square`, pixels over half lung); all True without lungs."""
    if not mask.any():
        return np.ones((size, size), bool)
    return crop_square(mask.astype(np.float32), mask, size)[0] > 0.5


def prepare_slice(hu: np.ndarray, lung_mask: np.ndarray, size: int, level: float, width: float) -> tuple[np.ndarray, CropTransform]:
    """An axial HU slice (J, I) and its lung mask -> (size, size) float32 in [0, 1], and the crop."""
    return crop_square(lung_window(hu, level, width), lung_mask, size)


def prepare_image_2d(gray: np.ndarray, lung_mask: np.ndarray, size: int) -> tuple[np.ndarray, CropTransform]:
    """An 8-bit slice image already in a lung window (H, W) and its lung mask -> model input."""
    return crop_square(gray.astype(np.float32) / 255.0, lung_mask, size)


def to_three_channels(batch: np.ndarray) -> np.ndarray:
    """(N, S, S) -> (N, 3, S, S): CT is grey; ImageNet backbones expect 3 channels."""
    return np.repeat(batch[:, None], 3, axis=1)
