"""On-the-fly augmentation of prepared slices (uint8 image + lung mask, already cropped).

The paper fills the blank around the segmented lungs with copies of the lung region rotated by
different angles, so the network cannot learn the lung outline or the empty background and must
look at lung texture. Inference sees zeroed background (preprocessing.py), so here the fill is
applied with probability FILL_PROBABILITY: the network learns both views. Then a horizontal flip,
a small rotation and an intensity jitter (gain, offset, gamma); everything stays in [0, 1].
With `scanner=True`, also what differs between scanners and reconstructions: the kernel's
sharpness (a Gaussian blur, or an unsharp mask as a sharp lung kernel gives) and image noise
(the dose), each with probability SCANNER_PROBABILITY.
"""

from __future__ import annotations

import cv2
import numpy as np

FILL_PROBABILITY = 0.5
FILL_ANGLES = (90.0, 180.0, 270.0, 45.0, 135.0, 225.0, 315.0)  # tried in a random order until the blank is full
FLIP_PROBABILITY = 0.5
MAX_ROTATION_DEG = 10.0
GAIN_RANGE = (0.9, 1.1)
OFFSET_RANGE = (-0.05, 0.05)
GAMMA_RANGE = (0.85, 1.15)
SCANNER_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.4, 1.2)  # model-input pixels: a smooth (soft-tissue) kernel
SHARPEN_AMOUNT_RANGE = (0.3, 1.0)  # unsharp mask over a 1-pixel Gaussian: a sharp (lung) kernel
NOISE_SD_RANGE = (0.005, 0.03)  # fraction of the window width: about 8-45 HU in the 1500 HU lung window


def _rotate(array: np.ndarray, angle: float, interpolation: int) -> np.ndarray:
    h, w = array.shape
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)
    return cv2.warpAffine(array, matrix, (w, h), flags=interpolation, borderValue=0)


def fill_blank(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fill pixels outside the lung mask with rotated copies of the lung region; lung pixels are unchanged."""
    if not mask.any():
        return image.copy()
    out = image.copy()
    filled = mask.copy()
    lungs = np.where(mask, image, 0).astype(image.dtype)
    mask_u8 = mask.astype(np.uint8)
    for angle in rng.permutation(FILL_ANGLES):
        rotated_mask = _rotate(mask_u8, float(angle), cv2.INTER_NEAREST).astype(bool)
        new = rotated_mask & ~filled
        if new.any():
            out[new] = _rotate(lungs, float(angle), cv2.INTER_LINEAR)[new]
            filled |= new
        if filled.all():
            break
    return out


def scanner_variation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, S) float32 in [0, 1] -> the same slice as another kernel and dose might give: blurred or
    sharpened (each half the time, together with probability SCANNER_PROBABILITY), then noise added
    (probability SCANNER_PROBABILITY); zeros outside the lungs stay zero."""
    outside = x == 0
    if rng.random() < SCANNER_PROBABILITY:
        if rng.random() < 0.5:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*BLUR_SIGMA_RANGE))
        else:
            x = x + rng.uniform(*SHARPEN_AMOUNT_RANGE) * (x - cv2.GaussianBlur(x, (0, 0), 1.0))
    if rng.random() < SCANNER_PROBABILITY:
        x = x + rng.normal(0.0, rng.uniform(*NOISE_SD_RANGE), x.shape).astype(np.float32)
    return np.where(outside, 0.0, np.clip(x, 0.0, 1.0)).astype(np.float32)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scanner: bool = False, with_mask: bool = False):
    """(S, S) uint8 image and bool lung mask -> augmented (S, S) float32 in [0, 1] (`scanner`: add
    `scanner_variation`); `with_mask`: also the (S, S) bool lung mask flipped and rotated with it
    (the filled blank is not lung). The same random draws either way."""
    out = fill_blank(image, mask, rng) if rng.random() < FILL_PROBABILITY else image
    flip = rng.random() < FLIP_PROBABILITY
    if flip:
        out = out[:, ::-1]
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    out = _rotate(np.ascontiguousarray(out), angle, cv2.INTER_LINEAR)
    x = out.astype(np.float32) / 255.0
    x = np.clip(x * rng.uniform(*GAIN_RANGE) + rng.uniform(*OFFSET_RANGE), 0.0, 1.0)
    x = x ** rng.uniform(*GAMMA_RANGE)
    x = scanner_variation(x, rng) if scanner else x
    if not with_mask:
        return x
    m = np.ascontiguousarray(mask[:, ::-1] if flip else mask).astype(np.uint8)
    return x, _rotate(m, angle, cv2.INTER_NEAREST).astype(bool)
