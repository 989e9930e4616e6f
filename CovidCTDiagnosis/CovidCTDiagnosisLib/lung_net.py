"""A small U-Net that outlines the lungs on a lung-window axial slice, lesions included.

Threshold-based lung extraction finds air-like lung; ground-glass opacity, consolidation and
juxta-pleural lesions are as dense as the chest wall and the heart, so a threshold cuts them out
exactly where the disease is. This network was trained (training/lung_model.py) to output the
whole lung inside the pleura on slices where synthetic lesions of those kinds were painted into
healthy lungs, with tight crops, rotations, flips and field-of-view circles, so it also serves
8-bit slice images. It ships with the package (Resources/Models/lung-unet.pt, about 2 MB).

Input: lung-window 8-bit slices (`volume_io.hu_to_u8`), any size; output: lung
probability per pixel at the input's size.
"""

from __future__ import annotations

from functools import lru_cache
import cv2
import numpy as np
import torch
from torch import nn

from .bundled_model import MODELS_DIR
from .volume_io import hu_to_u8

LUNG_NET_SIZE = 128  # slices are resized to this square for the network
LUNG_NET_CHANNELS = (16, 32, 64, 128)
LUNG_NET_FILE = MODELS_DIR / "lung-unet.pt"
LUNG_NET_FORMAT = "covidct-lung-unet"
LUNG_PROBABILITY_THRESHOLD = 0.5
_BATCH = 64
INTERPOLATE_MAX_SPACING_MM = 2.5  # thinner slices: the network reads every other one


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class LungUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) behind a stride-2 stem, one logit per pixel: (N, 1, S, S) -> (N, 1, S, S).

    The stem halves the resolution first, so the U-Net's levels run at S/2 ... S/16: a quarter
    of the cost of a full-resolution U-Net, which the CPU budget of a whole volume needs.
    """

    def __init__(self, channels=LUNG_NET_CHANNELS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList()
        cin = channels[0]
        for c in channels:
            self.down.append(_DoubleConv(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.merge.append(_DoubleConv(2 * c, c))
            cin = c
        self.head = nn.Sequential(nn.ConvTranspose2d(cin, cin, 2, stride=2), nn.ReLU(inplace=True), nn.Conv2d(cin, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C0, S/2, S/2)
        skips = []
        for n, block in enumerate(self.down):
            x = block(x if n == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)  # (N, 1, S, S)


def to_network_input(gray_u8: np.ndarray) -> np.ndarray:
    """(H, W) uint8 lung-window slice -> (S, S) float32 in [0, 1] (area resampling)."""
    return cv2.resize(gray_u8, (LUNG_NET_SIZE, LUNG_NET_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@lru_cache(maxsize=1)
def load_lung_net(path: str = str(LUNG_NET_FILE)) -> LungUNet:
    """The shipped lung network in eval mode on the CPU, channels-last (loaded once per process)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != LUNG_NET_FORMAT:
        raise ValueError(f"{path} is not a {LUNG_NET_FORMAT} file")
    net = LungUNet(tuple(payload["channels"]))
    net.load_state_dict(payload["state_dict"])
    return net.eval().to(memory_format=torch.channels_last)


def _probability_small(inputs: np.ndarray) -> np.ndarray:
    """(N, S, S) float32 network inputs -> (N, S, S) lung probability, in batches on the CPU.

    Channels-last: oneDNN's native layout on the CPU, 2-3x faster than NCHW here; the
    probabilities differ from NCHW's by float rounding only (at most about 3e-6).
    """
    net = load_lung_net()
    out = np.empty(inputs.shape, np.float32)
    with torch.inference_mode():
        for start in range(0, len(inputs), _BATCH):
            chunk = torch.from_numpy(np.ascontiguousarray(inputs[start:start + _BATCH]))[:, None]
            chunk = chunk.contiguous(memory_format=torch.channels_last)  # (n, 1, S, S)
            out[start:start + _BATCH] = torch.sigmoid(net(chunk))[:, 0].numpy()
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
