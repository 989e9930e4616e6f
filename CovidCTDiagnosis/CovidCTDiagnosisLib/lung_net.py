"""The lung network: a small U-Net that outlines the lungs on a lung-window axial slice, lesions included.

Threshold-based lung extraction finds air-like lung; ground-glass opacity, consolidation and
juxta-pleural lesions are as dense as the chest wall and the heart, so a threshold cuts them out
exactly where the disease is. The network (`training.lung_model.LungUNet`) was trained to output
the whole lung inside the pleura on slices where synthetic lesions of those kinds were painted into
healthy lungs, with tight crops, rotations, flips and field-of-view circles, so it also serves
8-bit slice images.

It runs here without PyTorch, on OpenCV's DNN module, from the ONNX file exported from the trained
weights (Resources/Models/lung-unet.onnx beside lung-unet.pt, about 2 MB each; a test checks that
both give the same probabilities): lung extraction then needs no torch import, so the command line
finds the lungs while it imports torch for the diagnosis model.

Input: lung-window 8-bit slices (`volume_io.hu_to_u8`), any size; output: lung
probability per pixel at the input's size.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .bundled_model import MODELS_DIR
from .errors import ModelFileError
from .volume_io import hu_to_u8

LUNG_NET_SIZE = 128  # slices are resized to this square for the network
LUNG_NET_FILE = MODELS_DIR / "lung-unet.onnx"  # exported from lung-unet.pt (`training.lung_model.export_onnx`)
LUNG_PROBABILITY_THRESHOLD = 0.5
_BATCH = 16  # slices per forward pass: OpenCV's fastest here on 2 threads (8-32 within 10 %)
INTERPOLATE_MAX_SPACING_MM = 2.5  # thinner slices: the network reads every other one
_forward_lock = threading.Lock()  # an OpenCV Net holds its input and outputs: one forward pass at a time


def to_network_input(gray_u8: np.ndarray) -> np.ndarray:
    """(H, W) uint8 lung-window slice -> (S, S) float32 in [0, 1] (area resampling)."""
    return cv2.resize(gray_u8, (LUNG_NET_SIZE, LUNG_NET_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@lru_cache(maxsize=1)
def load_lung_net(path: str = str(LUNG_NET_FILE)) -> cv2.dnn.Net:
    """The lung network as an OpenCV DNN net (ONNX: input (N, 1, S, S) float32 in [0, 1], output
    (N, 1, S, S) logits), loaded once per process. ModelFileError (exit 6) if the file is missing or not a
    readable ONNX model (a damaged installation)."""
    try:
        return cv2.dnn.readNetFromONNX(path)
    except cv2.error as error:
        reason = str(error).strip().splitlines()[-1] if Path(path).is_file() else "missing"
        raise ModelFileError(f"the lung network {path} is not a readable ONNX lung network ({reason}); reinstall the "
                             "package") from None


def _probability_small(inputs: np.ndarray) -> np.ndarray:
    """(N, S, S) float32 network inputs -> (N, S, S) lung probability, in batches on the CPU
    (OpenCV's threads: `cpu_threads.limit_threads`)."""
    net = load_lung_net()
    out = np.empty(inputs.shape, np.float32)
    with _forward_lock:
        for start in range(0, len(inputs), _BATCH):
            net.setInput(np.ascontiguousarray(inputs[start:start + _BATCH, None]))
            logits = net.forward()[:, 0]
            with np.errstate(over="ignore"):  # exp(-logit) of a very sure "no lung" is inf: probability 0
                out[start:start + _BATCH] = 1.0 / (1.0 + np.exp(-logits))
    return out


def to_slice_size(prob_small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) network-size probability -> (H, W), bilinear."""
    return cv2.resize(prob_small, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def lung_probability(slices_u8: np.ndarray) -> np.ndarray:
    """Lung probability of lung-window slices: (N, H, W) uint8 -> (N, H, W) float32 in [0, 1].

    The network sees each slice at LUNG_NET_SIZE; its output is resized back (bilinear) to H x W.
    """
    inputs = np.stack([to_network_input(s) for s in slices_u8])
    return np.stack([to_slice_size(p, slices_u8.shape[1:]) for p in _probability_small(inputs)])


def lung_probability_hu(hu_kji: np.ndarray, spacing_k_mm: float) -> np.ndarray:
    """Lung probability of a CT's axial slices at the network's size: (K, J, I) HU (int16 or float32) -> (K, S, S)
    float32 in [0, 1] (`to_slice_size` brings a slice's back to J x I).

    Each slice is reduced to twice the network's size before the lung window (the same input
    as `lung_probability` up to rounding, at a fraction of the cost). Where slices are at most
    INTERPOLATE_MAX_SPACING_MM apart, the network reads every other slice and the ones between
    get the mean of their neighbours' probabilities.
    """
    k_count = len(hu_kji)
    step = 2 if spacing_k_mm <= INTERPOLATE_MAX_SPACING_MM and k_count > 2 else 1
    read = np.unique(np.r_[np.arange(0, k_count, step), k_count - 1])
    half = (2 * LUNG_NET_SIZE, 2 * LUNG_NET_SIZE)
    inputs = np.stack([
        to_network_input(hu_to_u8(cv2.resize(hu_kji[k].astype(np.float32, copy=False), half, interpolation=cv2.INTER_AREA)))
        for k in read
    ])
    small = np.empty((k_count, LUNG_NET_SIZE, LUNG_NET_SIZE), np.float32)
    small[read] = _probability_small(inputs)
    between = np.setdiff1d(np.arange(k_count), read)
    small[between] = (small[between - 1] + small[between + 1]) / 2
    return small
